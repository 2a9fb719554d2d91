"""The replica: one instance of a user's class (or function) and the rules around it.

It enforces ``max_ongoing_requests``, runs sync methods in its own thread pool
and async methods on the event loop, drives generators for streaming calls,
applies ``user_config`` through ``reconfigure``, answers health checks, and
drains before it stops. It knows nothing about where it lives: the backends
host it in the caller's process, in a child process or in a Ray actor.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import inspect
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
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
from tandem.exceptions import ReplicaUnavailableError

_current_replica: contextvars.ContextVar[Replica | None] = contextvars.ContextVar(
    "tandem_current_replica", default=None
)
_DONE = object()


def current_replica() -> Replica | None:
    return _current_replica.get()


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


class _Slot:
    """One of ``max_ongoing_requests`` places; released once, maybe after its thread ends."""

    __slots__ = ("_replica", "_released", "held_by_thread")

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
        self._pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._capacity = spec.options.max_ongoing_requests
        self._in_flight = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._idle: asyncio.Event | None = None
        self._accepting = False
        self._stopped = False
        self.context = ReplicaContext(
            app_name=spec.deployment_id.app_name,
            deployment=spec.deployment_id.name,
            replica_id=spec.replica_id,
            rank=spec.rank,
            world_size=spec.world_size,
            _servable=self._servable,
        )
        # Per-replica state of @multiplexed loaders, keyed by the loader.
        self.multiplex_caches: dict[Any, Any] = {}

    def _servable(self) -> Any:
        return self._obj

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def name(self) -> str:
        return self.deployment_id.name

    def loaded_model_ids(self) -> list[str]:
        ids: list[str] = []
        for cache in self.multiplex_caches.values():
            ids.extend(cache.model_ids())
        return ids

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Construct the user's object and apply its user_config; raises what they raise."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool = ThreadPoolExecutor(
            max_workers=self._capacity + 1, thread_name_prefix=f"tandem-{self.name}"
        )
        if self._is_function:
            self._obj = self.spec.target
        else:
            self._obj = await self._run_in_thread(
                self.spec.target, self.spec.init_args, self.spec.init_kwargs
            )
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
        """Run the user's check_health (if any) within health_check_timeout_s; raise if unhealthy."""
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
        if self._idle is not None and self._in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        self._stopped = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(self._unavailable())
        self._waiters.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.multiplex_caches.clear()
        self._destroy()

    def _destroy(self) -> None:
        obj, self._obj = self._obj, None
        if obj is None or self._is_function:
            return
        ref = _weakref_or_none(obj)
        del obj
        if ref is not None and ref() is not None:
            gc.collect()  # cycles through the object keep __del__ from running at once

    # -- serving -----------------------------------------------------------

    async def call(self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Serve one unary call."""
        method = self._method(meta.method_name)
        if inspect.isgeneratorfunction(method) or inspect.isasyncgenfunction(method):
            raise TypeError(
                f"Method {meta.method_name!r} of deployment {self.name!r} is a generator; "
                "call it through a handle with .options(stream=True)."
            )
        slot = await self._acquire()
        req_token = _request.set(meta)
        ctx_token = _replica_context.set(self.context)
        rep_token = _current_replica.set(self)
        try:
            result = await self._invoke(method, args, kwargs, slot)
            if inspect.isgenerator(result) or inspect.isasyncgen(result):
                _close_quietly(result)
                raise TypeError(
                    f"Method {meta.method_name!r} of deployment {self.name!r} returned a "
                    "generator; call it through a handle with .options(stream=True)."
                )
            return result
        finally:
            _current_replica.reset(rep_token)
            _replica_context.reset(ctx_token)
            _request.reset(req_token)
            if not slot.held_by_thread:
                slot.release()

    async def stream(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        """Serve one streaming call: yield what the user's generator yields, as it yields it."""
        method = self._method(meta.method_name)
        slot = await self._acquire()
        req_token = _request.set(meta)
        ctx_token = _replica_context.set(self.context)
        rep_token = _current_replica.set(self)
        try:
            if inspect.isasyncgenfunction(method):
                agen = method(*args, **kwargs)
                try:
                    async for item in agen:
                        yield item
                finally:
                    await agen.aclose()
            elif inspect.isgeneratorfunction(method):
                async for item in self._iterate_in_thread(method(*args, **kwargs), slot):
                    yield item
            else:
                raise TypeError(
                    f"Method {meta.method_name!r} of deployment {self.name!r} is not a "
                    "generator; call it without stream=True."
                )
        finally:
            _current_replica.reset(rep_token)
            _replica_context.reset(ctx_token)
            _request.reset(req_token)
            if not slot.held_by_thread:
                slot.release()

    def _method(self, name: str) -> Callable[..., Any]:
        if self._stopped or self._obj is None:
            raise self._unavailable()
        if self._is_function:
            if name != "__call__":
                raise AttributeError(
                    f"Deployment {self.name!r} is a function and has no method {name!r}; "
                    "call the handle itself: handle.remote(...)."
                )
            return self._obj  # type: ignore[no-any-return]
        method = getattr(self._obj, name, None) if not name.startswith("__") or name == "__call__" else None
        if method is None or not callable(method):
            raise AttributeError(f"Deployment {self.name!r} has no method {name!r}.")
        return method  # type: ignore[no-any-return]

    async def _invoke(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        slot: _Slot | None = None,
    ) -> Any:
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)
        ):
            return await fn(*args, **kwargs)
        return await self._run_in_thread(fn, args, kwargs, slot)

    async def _run_in_thread(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        slot: _Slot | None = None,
    ) -> Any:
        assert self._pool is not None
        ctx = contextvars.copy_context()
        ctx.run(_replica_context.set, self.context)
        ctx.run(_current_replica.set, self)
        call = functools.partial(fn, *args, **kwargs) if kwargs else fn
        future = self._pool.submit(ctx.run, call, *(() if kwargs else args))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The thread cannot be interrupted: keep its slot until it really ends.
            if slot is not None and not future.done():
                slot.held_by_thread = True
                loop = self._loop
                assert loop is not None
                future.add_done_callback(
                    lambda _: loop.call_soon_threadsafe(slot.release)
                )
            raise

    async def _iterate_in_thread(self, gen: Any, slot: _Slot) -> AsyncIterator[Any]:
        assert self._pool is not None
        ctx = contextvars.copy_context()
        pending: ConcurrentFuture[Any] | None = None
        try:
            while True:
                pending = self._pool.submit(ctx.run, next, gen, _DONE)
                item = await asyncio.wrap_future(pending)
                if item is _DONE:
                    return
                yield item
        finally:
            if pending is not None and not pending.done():
                slot.held_by_thread = True
                loop = self._loop
                assert loop is not None

                def close_after(_: Any) -> None:
                    gen.close()
                    loop.call_soon_threadsafe(slot.release)

                pending.add_done_callback(close_after)
            else:
                gen.close()

    # -- admission ---------------------------------------------------------

    async def _acquire(self) -> _Slot:
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
        if self._idle is not None:
            self._idle.clear()
        return _Slot(self)

    def _release(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break

    def _unavailable(self) -> ReplicaUnavailableError:
        return ReplicaUnavailableError(
            f"Replica {self.replica_id} of deployment {self.name!r} is not serving requests "
            "(it is stopping or stopped)."
        )


def _weakref_or_none(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _close_quietly(gen: Any) -> None:
    if inspect.isgenerator(gen):
        gen.close()
