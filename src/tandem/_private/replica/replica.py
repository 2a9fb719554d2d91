"""The replica: one instance of a user's class (or function) and the rules around it.

It enforces ``max_ongoing_requests``, runs sync methods in its own thread pool
and async methods on the event loop, drives generators for streaming calls,
applies ``user_config`` through ``reconfigure``, answers health checks, and
drains before it stops. It knows nothing about where it lives: the backends
host it in the caller's process, in a child process or in a Ray actor.

A request whose caller gave up (cancelled it) may still run: a sync method in
a worker thread cannot be interrupted, and an async one may swallow the
CancelledError. It keeps its slot, since the work really goes on; once such a
request is older than ``health_check_timeout_s`` the health check fails, so
the controller replaces the replica instead of leaving it wedged.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import gc
import inspect
import time
import types
import weakref
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from tandem._private.app.options import DeploymentOptions
from tandem._private.calls.context import (
    HTTP_METHOD,
    DeploymentID,
    ReplicaContext,
    RequestMetadata,
    _replica_context,
    _request,
)
from tandem._private.calls.errors import ReplicaNotReached
from tandem._private.replica.threads import Job, WorkerThreads, contain
from tandem._private.stats import RequestStats
from tandem.exceptions import ReplicaUnavailableError

_DONE = object()
_GENERATOR_TYPES = frozenset({types.GeneratorType, types.AsyncGeneratorType})


class AbandonedRequestsError(RuntimeError):
    """Requests their callers gave up on still run past the grace period: the replica is wedged."""


def current_replica() -> Replica | None:
    context = _replica_context.get()
    return None if context is None else context._replica


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything needed to build one replica, wherever it is built."""

    replica_id: str
    deployment_id: DeploymentID
    target: Any  # the user's class or function
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    options: DeploymentOptions
    rank: int = 0
    world_size: int = 1
    serves_http: bool = False  # the ingress of an application with a route prefix


@dataclass(frozen=True)
class _Method:
    """A user method and how to run it."""

    fn: Callable[..., Any]
    is_async: bool  # a coroutine function or an async generator function
    is_generator: bool

    @staticmethod
    def of(fn: Callable[..., Any]) -> _Method:
        plain = inspect.isfunction(fn) or inspect.ismethod(fn)
        call = fn if plain else getattr(fn, "__call__", fn)  # noqa: B004 - the method itself
        is_asyncgen = inspect.isasyncgenfunction(call)
        return _Method(
            fn,
            is_async=inspect.iscoroutinefunction(call) or is_asyncgen,
            is_generator=is_asyncgen or inspect.isgeneratorfunction(call),
        )


class _Slot:
    """One of ``max_ongoing_requests`` places; released once, maybe after its thread ends."""

    __slots__ = ("_released", "_replica", "held_by_thread")

    def __init__(self, replica: Replica) -> None:
        self._replica = replica
        self._released = False
        self.held_by_thread = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._replica._release()


class Replica:
    """Hosts the user's object and serves calls to it (see the module docstring)."""

    def __init__(self, spec: ReplicaSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self._clock = clock
        self.replica_id = spec.replica_id
        self.deployment_id = spec.deployment_id
        self._options = spec.options
        self._is_function = not inspect.isclass(spec.target)
        self._obj: Any = None
        self._workers: WorkerThreads | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._capacity = spec.options.max_ongoing_requests
        self._in_flight = 0
        self._waiters: list[asyncio.Future[None]] = []
        # Set by stop() while requests are in flight; done when the last one ends.
        self._drained: asyncio.Future[None] | None = None
        self._accepting = False
        self._stopped = False
        # Requests whose caller gave up while a worker thread runs them, until the
        # thread ends: slot -> (when the caller gave up, method name).
        self._abandoned: dict[_Slot, tuple[float, str]] = {}
        # Tasks serving a request here that were cancelled but go on (the method
        # swallowed the CancelledError): task -> (first seen so, method name).
        self._cancelled_tasks: dict[asyncio.Task[Any], tuple[float, str]] = {}
        self.context = ReplicaContext(
            app_name=spec.deployment_id.app_name,
            deployment=spec.deployment_id.name,
            replica_id=spec.replica_id,
            rank=spec.rank,
            world_size=spec.world_size,
            _replica=self,
        )
        self._methods: dict[str, _Method] = {}
        self.stats = RequestStats()
        self._is_ingress = hasattr(spec.target, "__tandem_ingress_app__")
        # Per-replica state of @multiplexed loaders, keyed by the loader.
        self.multiplex_caches: dict[Any, Any] = {}
        # Set by the backend: called with the model ids this replica holds when they change.
        self.on_models_changed: Callable[[frozenset[str]], None] | None = None
        self._reported_models: frozenset[str] = frozenset()
        # Per-replica queues of @batch methods.
        self.batch_queues: dict[Any, Any] = {}
        # Called when the replica stops (e.g. to end @batch queues).
        self.closers: list[Callable[[], None]] = []

    @property
    def servable(self) -> Any:
        return self._obj

    def set_rank(self, rank: int, world_size: int) -> None:
        """A new place among the deployment's replicas (after scaling)."""
        self.context = dataclasses.replace(self.context, rank=rank, world_size=world_size)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def abandoned(self) -> int:
        """Requests their callers gave up on that still hold a slot (part of ``in_flight``).

        Cancelled async requests that go on are counted as the last health check saw them.
        """
        return len(self._abandoned) + sum(not task.done() for task in self._cancelled_tasks)

    def abandoned_threads(self) -> list[str]:
        """The methods worker threads still run for callers that gave up."""
        return [method for _, method in self._abandoned.values()]

    @property
    def name(self) -> str:
        return self.deployment_id.name

    def loaded_model_ids(self) -> frozenset[str]:
        ids: set[str] = set()
        for cache in self.multiplex_caches.values():
            ids.update(cache.model_ids())
        return frozenset(ids)

    def models_changed(self) -> None:
        """Tell whoever hosts this replica (its backend) which models it now holds."""
        ids = self.loaded_model_ids()
        if ids != self._reported_models:
            self._reported_models = ids
            if self.on_models_changed is not None:
                self.on_models_changed(ids)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Construct the user's object and apply its user_config; raises what they raise."""
        self._loop = asyncio.get_running_loop()
        self._workers = WorkerThreads(self._capacity + 1, f"tandem-{self.name}")
        if self.spec.serves_http:
            _http_bridge()  # import the HTTP side now, not during the first request
        if self._is_function:
            self._obj = self.spec.target
        else:
            token = _replica_context.set(self.context)
            try:
                self._obj = await self._run_in_thread(
                    self.spec.target, self.spec.init_args, self.spec.init_kwargs
                )
            finally:
                _replica_context.reset(token)
        if self._options.user_config is not None:
            await self.reconfigure(self._options.user_config)
        self._accepting = True

    async def reconfigure(self, user_config: Any) -> None:
        method = getattr(self._obj, "reconfigure", None) if not self._is_function else None
        if method is None:
            raise TypeError(
                f"Deployment {self.name!r} has a user_config but no reconfigure(self, config) "
                "method to receive it; add one or remove user_config."
            )
        await self._invoke(method, (user_config,), {})
        self._options = self._options.model_copy(update={"user_config": user_config})

    async def check_health(self) -> None:
        """Fail if abandoned requests outlived the grace period (health_check_timeout_s);
        else run the user's check_health (if any), bounded by health_check_timeout_s.

        The first part needs no slot and no worker thread: it works when every one is stuck.
        """
        if self._stopped:
            raise ReplicaUnavailableError(f"Replica {self.replica_id} is stopped.")
        self._refuse_if_wedged()
        method = None if self._is_function else getattr(self._obj, "check_health", None)
        if method is None:
            return
        await asyncio.wait_for(
            self._invoke(method, (), {}), timeout=self._options.health_check_timeout_s
        )

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking requests, wait for in-flight ones (bounded), then destroy the object.

        Requests abandoned in worker threads are not waited for: nobody wants their results.
        """
        if self._stopped:
            return
        self._accepting = False
        timeout = self._options.graceful_shutdown_timeout_s if timeout_s is None else timeout_s
        if self._in_flight > len(self._abandoned) and self._loop is not None:
            self._drained = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            except asyncio.TimeoutError:
                pass
        self._stopped = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(self._unavailable())
        self._waiters.clear()
        if self._workers is not None:
            self._workers.shutdown()
        self.multiplex_caches.clear()
        for close in self.closers:
            close()
        self.closers.clear()
        self._destroy()

    def _refuse_if_wedged(self) -> None:
        grace = self._options.health_check_timeout_s
        now = self._clock()
        self._find_cancelled_tasks(now)
        stuck = [
            method
            for since, method in (*self._abandoned.values(), *self._cancelled_tasks.values())
            if now - since >= grace
        ]
        if not stuck:
            return
        names = sorted(set(stuck))
        what = (
            "1 request abandoned by its caller still holds a slot"
            if len(stuck) == 1
            else f"{len(stuck)} requests abandoned by their callers still hold slots"
        )
        methods = ("method " if len(names) == 1 else "methods ") + ", ".join(map(repr, names))
        raise AbandonedRequestsError(f"{what} after {grace:g} s ({methods}); replacing the replica")

    def _find_cancelled_tasks(self, now: float) -> None:
        """Look for cancelled tasks that still run a request here (see ``_cancelled_tasks``).

        Done at health-check time, so requests pay nothing for it. Needs
        ``Task.cancelling`` (Python 3.11+); before that, only threads are tracked.
        """
        seen = self._cancelled_tasks
        found: dict[asyncio.Task[Any], tuple[float, str]] = {}
        if self._loop is not None and self._in_flight > len(self._abandoned):
            for task in asyncio.all_tasks(self._loop):
                cancelling = getattr(task, "cancelling", None)
                if cancelling is None:
                    break
                if cancelling():
                    method = _request_served(task, self)
                    if method is not None:
                        found[task] = (seen[task][0] if task in seen else now, method)
        self._cancelled_tasks = found

    def _destroy(self) -> None:
        obj, self._obj = self._obj, None
        self._methods.clear()
        if obj is None or self._is_function:
            return
        ref = _weakref_or_none(obj)
        del obj
        if ref is not None and ref() is not None:
            gc.collect()  # cycles through the object keep __del__ from running at once

    # -- serving -----------------------------------------------------------

    async def call(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Serve one unary call."""
        method = self._methods.get(meta.method_name) or self._method(meta.method_name)
        if method.is_generator:
            raise TypeError(
                f"Method {meta.method_name!r} of deployment {self.name!r} is a generator; "
                "call it through a handle with .options(stream=True)."
            )
        slot = await self._acquire()
        req_token = _request.set(meta)
        ctx_token = _replica_context.set(self.context)
        started = time.perf_counter()
        failed = True
        try:
            if method.is_async:
                try:
                    result = await method.fn(*args, **kwargs)
                except (SystemExit, KeyboardInterrupt) as exc:
                    raise contain(exc) from exc
            else:
                result = await self._run_in_thread(method.fn, args, kwargs, slot)
            if type(result) in _GENERATOR_TYPES:
                _close_quietly(result)
                raise TypeError(
                    f"Method {meta.method_name!r} of deployment {self.name!r} returned a "
                    "generator; call it through a handle with .options(stream=True)."
                )
            failed = False
            return result
        finally:
            self.stats.record(meta.method_name, time.perf_counter() - started, failed)
            _replica_context.reset(ctx_token)
            _request.reset(req_token)
            if not slot.held_by_thread:
                slot.release()

    async def stream(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        """Serve one streaming call: yield what the user's generator yields, as it yields it.

        An HTTP request (method ``HTTP_METHOD``) is a streaming call too: it
        yields the ASGI messages of the response.
        """
        http = meta.method_name == HTTP_METHOD
        method = (
            None if http else self._methods.get(meta.method_name) or self._method(meta.method_name)
        )
        if method is not None and not method.is_generator:
            raise TypeError(
                f"Method {meta.method_name!r} of deployment {self.name!r} is not a "
                "generator; call it without stream=True."
            )
        slot = await self._acquire()
        req_token = _request.set(meta)
        ctx_token = _replica_context.set(self.context)
        started = time.perf_counter()
        failed = True
        try:
            if method is None:
                source = self._serve_http(args[0], slot)
            elif method.is_async:
                source = method.fn(*args, **kwargs)
            else:
                source = self._iterate_in_thread(method.fn(*args, **kwargs), slot)
            try:
                async for item in source:
                    yield item
            finally:
                await source.aclose()
            failed = False
        finally:
            name = "__call__" if http else meta.method_name
            self.stats.record(name, time.perf_counter() - started, failed)
            if not slot.held_by_thread:
                slot.release()
            # A generator its consumer dropped is closed by the event loop's finalizer,
            # in another context: the variables are not ours to reset there.
            with contextlib.suppress(ValueError):
                _replica_context.reset(ctx_token)
                _request.reset(req_token)

    def _serve_http(self, data: Any, slot: _Slot) -> AsyncGenerator[Any, None]:
        if self._obj is None:
            raise self._unavailable()
        serve_http, asgi_app_for = _http_bridge()
        asgi_app = asgi_app_for(self._obj) if self._is_ingress else None
        if asgi_app is not None:
            return serve_http(data, None, asgi_app)
        method = self._methods.get("__call__") or self._method("__call__")

        async def call(request: Any) -> Any:
            if method.is_generator:
                from starlette.responses import StreamingResponse

                items = method.fn(request)
                if not method.is_async:
                    items = self._iterate_in_thread(items, slot)
                return StreamingResponse(items)
            if method.is_async:
                return await method.fn(request)
            return await self._run_in_thread(method.fn, (request,), {}, slot)

        return serve_http(data, call, None)

    def _method(self, name: str) -> _Method:
        """Look a method up once; later calls find it in ``self._methods``."""
        if self._stopped or self._obj is None:
            raise self._unavailable()
        if self._is_function:
            if name != "__call__":
                raise AttributeError(
                    f"Deployment {self.name!r} is a function and has no method {name!r}; "
                    "call the handle itself: handle.remote(...)."
                )
            fn = self._obj
        else:
            private = name.startswith("__") and name != "__call__"
            fn = None if private else getattr(self._obj, name, None)
            if fn is None or not callable(fn):
                raise AttributeError(f"Deployment {self.name!r} has no method {name!r}.")
        method = _Method.of(fn)
        self._methods[name] = method
        return method

    async def _invoke(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if _Method.of(fn).is_async:
            try:
                return await fn(*args, **kwargs)
            except (SystemExit, KeyboardInterrupt) as exc:
                raise contain(exc) from exc
        return await self._run_in_thread(fn, args, kwargs)

    async def _run_in_thread(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        slot: _Slot | None = None,
    ) -> Any:
        assert self._workers is not None and self._loop is not None
        if kwargs:
            fn, args = functools.partial(fn, *args, **kwargs), ()
        job = self._workers.run(self._loop, contextvars.copy_context(), fn, args)
        try:
            return await job.future
        except asyncio.CancelledError:
            if slot is not None and not job.finished:
                self._leave_to_thread(slot, job, _name_of(fn))
            raise

    async def _iterate_in_thread(self, gen: Any, slot: _Slot) -> AsyncGenerator[Any, None]:
        assert self._workers is not None and self._loop is not None
        context = contextvars.copy_context()
        job = None
        try:
            while True:
                job = self._workers.run(self._loop, context, next, (gen, _DONE))
                item = await job.future
                if item is _DONE:
                    return
                yield item
        finally:
            if job is not None and not job.finished:
                # Still inside next(): close the generator once the thread leaves it.
                self._leave_to_thread(slot, job, _name_of(gen), then=gen.close)
            else:
                gen.close()

    def _leave_to_thread(
        self, slot: _Slot, job: Job, method: str, then: Callable[[], object] | None = None
    ) -> None:
        """The caller gave up, but the thread cannot be interrupted: the slot stays taken
        until the thread ends (then ``then()`` runs), and counts as abandoned till then."""
        slot.held_by_thread = True
        self._abandoned[slot] = (self._clock(), method)
        self._check_drained()

        def finished() -> None:
            try:
                if then is not None:
                    then()
            finally:
                del self._abandoned[slot]
                slot.release()

        job.on_finished = finished

    # -- admission ---------------------------------------------------------

    async def _acquire(self) -> _Slot:
        if self._accepting and self._in_flight < self._capacity and not self._waiters:
            self._in_flight += 1
            return _Slot(self)
        if not self._accepting:
            raise self._unavailable()
        while self._in_flight >= self._capacity:
            assert self._loop is not None
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if not self._accepting:
                raise self._unavailable()
        self._in_flight += 1
        return _Slot(self)

    def _release(self) -> None:
        self._in_flight -= 1
        if self._drained is not None:
            self._check_drained()
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break

    def _check_drained(self) -> None:
        """While stopping: done waiting once only abandoned requests are left."""
        drained = self._drained
        if drained is not None and self._in_flight <= len(self._abandoned) and not drained.done():
            drained.set_result(None)

    def _unavailable(self) -> ReplicaUnavailableError:
        return ReplicaNotReached(
            f"Replica {self.replica_id} of deployment {self.name!r} is not serving requests "
            "(it is stopping or stopped)."
        )


@functools.cache
def _http_bridge() -> tuple[Callable[..., AsyncGenerator[Any, None]], Callable[[Any], Any | None]]:
    """The HTTP side, imported on the first HTTP request (replicas without HTTP skip it)."""
    from tandem._private.http.bridge import serve_http
    from tandem._private.replica.ingress import asgi_app_for

    return serve_http, asgi_app_for


_SERVING = (Replica.call.__code__, Replica.stream.__code__)


def _request_served(task: asyncio.Task[Any], replica: Replica) -> str | None:
    """The method of the request ``replica`` serves in ``task`` (None if it serves none).

    Follows what the task awaits, coroutine by coroutine, to a ``call`` or ``stream``
    frame of the replica. An async generator's ``__anext__`` shows its generator
    only to the garbage collector.
    """
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is not None and frame.f_code in _SERVING:
            local = frame.f_locals
            if local.get("self") is replica:
                meta = local.get("meta")
                name = getattr(meta, "method_name", "__call__")
                return "__call__" if name == HTTP_METHOD else str(name)
        following = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
        if following is None and type(awaited).__name__ == "async_generator_asend":
            following = next((r for r in gc.get_referents(awaited) if inspect.isasyncgen(r)), None)
        awaited = following
    return None


def _name_of(fn: Any) -> str:
    """A method's name, for messages (through partials and generators)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


def _weakref_or_none(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _close_quietly(gen: Any) -> None:
    if inspect.isgenerator(gen):
        gen.close()
