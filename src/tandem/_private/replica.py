"""The replica: one instance of a user's class (or function) and the rules around it.

It enforces ``max_ongoing_requests``, runs sync methods in its own thread pool
and async methods on the event loop, drives generators for streaming calls,
applies ``user_config`` through ``reconfigure``, answers health checks, and
drains before it stops. It knows nothing about where it lives: the backends
host it in the caller's process, in a child process or in a Ray actor.
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

from tandem._private.config import DeploymentOptions
from tandem._private.context import (
    DeploymentID,
    ReplicaContext,
    RequestMetadata,
    _replica_context,
    _request,
)
from tandem._private.errors import ReplicaNotReached
from tandem._private.stats import RequestStats
from tandem._private.workers import WorkerThreads, contain
from tandem.exceptions import ReplicaUnavailableError

# The method name the HTTP proxy calls (kept here so replicas need no HTTP import).
HTTP_METHOD = "__tandem_http__"

_DONE = object()
_GENERATOR_TYPES = frozenset({types.GeneratorType, types.AsyncGeneratorType})


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

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
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
        """Run the user's check_health (if any), bounded by health_check_timeout_s."""
        if self._stopped:
            raise ReplicaUnavailableError(f"Replica {self.replica_id} is stopped.")
        method = None if self._is_function else getattr(self._obj, "check_health", None)
        if method is None:
            return
        await asyncio.wait_for(
            self._invoke(method, (), {}), timeout=self._options.health_check_timeout_s
        )

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking requests, wait for in-flight ones (bounded), then destroy the object."""
        if self._stopped:
            return
        self._accepting = False
        timeout = self._options.graceful_shutdown_timeout_s if timeout_s is None else timeout_s
        if self._in_flight and self._loop is not None:
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
            # The thread cannot be interrupted: keep its slot until it really ends.
            if slot is not None and not job.finished:
                slot.held_by_thread = True
                job.on_finished = slot.release
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
                slot.held_by_thread = True

                def close_then_release() -> None:
                    gen.close()
                    slot.release()

                job.on_finished = close_then_release
            else:
                gen.close()

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
        if not self._in_flight and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break

    def _unavailable(self) -> ReplicaUnavailableError:
        return ReplicaNotReached(
            f"Replica {self.replica_id} of deployment {self.name!r} is not serving requests "
            "(it is stopping or stopped)."
        )


@functools.cache
def _http_bridge() -> tuple[Callable[..., AsyncGenerator[Any, None]], Callable[[Any], Any | None]]:
    """The HTTP side, imported on the first HTTP request (replicas without HTTP skip it)."""
    from tandem._private.http.bridge import serve_http
    from tandem._private.ingress import asgi_app_for

    return serve_http, asgi_app_for


def _weakref_or_none(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _close_quietly(gen: Any) -> None:
    if inspect.isgenerator(gen):
        gen.close()
