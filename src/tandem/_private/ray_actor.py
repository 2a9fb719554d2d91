"""A replica as a Ray actor: the ray backend's counterpart of the replica process.

The driver creates one :class:`ReplicaActor` per replica, then calls ``start``
with the replica's spec and the replica sets of every deployment. The actor
serves ``call`` and ``stream`` (the routers of other processes send requests
straight to it), obeys the control methods (health, reconfigure, rank, stop),
and answers ``watch``: a long poll that returns when the models it holds or the
requests waiting in its routers change. The driver keeps one ``watch`` pending
per actor, so it also learns at once when the actor dies.

Everything runs on the actor's own event loop, which the actor's tandem
runtime adopts: handle calls made by the replica run inline, as elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import sys
import time
import traceback
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from tandem._private.context import DeploymentID, RequestMetadata
from tandem._private.replica import Replica
from tandem._private.router import ReplicaSet

# How often the actor looks for changes in the requests waiting in its routers.
QUEUE_REPORT_S = 0.2
# A watch returns after this long even when nothing changed.
WATCH_TIMEOUT_S = 30.0
# A cancellation that arrives before its request is remembered this long.
EARLY_CANCEL_TTL_S = 60.0
# The attribute that carries an exception's traceback text to the caller.
TRACEBACK_ATTRIBUTE = "_tandem_traceback"

T = TypeVar("T")


def _with_traceback(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Exceptions leave with their traceback as text (Ray keeps only its own rendering)."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await method(*args, **kwargs)
        except Exception as exc:
            _attach_traceback(exc)
            raise

    return wrapper


_ITEM, _END, _ERROR = range(3)


async def _pump(source: AsyncGenerator[Any, None], items: asyncio.Queue[tuple[int, Any]]) -> None:
    """Move a stream's items into ``items``, then its end or its error."""
    try:
        async for item in source:
            await items.put((_ITEM, item))
    except Exception as exc:
        _attach_traceback(exc)
        await items.put((_ERROR, exc))
    else:
        await items.put((_END, None))
    finally:
        await source.aclose()


def _attach_traceback(exc: BaseException) -> None:
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        setattr(exc, TRACEBACK_ATTRIBUTE, text)
    except Exception:  # an exception type that takes no attributes: Ray's text will do
        pass


class ReplicaActor:
    """Hosts one :class:`Replica` in a Ray actor (see the module docstring)."""

    def __init__(self) -> None:
        self.replica: Replica | None = None
        self._version = 0
        self._changed: asyncio.Future[None] | None = None
        self._queued: dict[DeploymentID, int] = {}
        self._reporting: asyncio.Task[None] | None = None
        # Requests running here by the caller's token, for cancel(); and cancellations
        # that overtook their request (token -> when they arrived).
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._cancelled_early: dict[str, float] = {}

    @_with_traceback
    async def start(
        self, spec_blob: bytes, path: list[str], directory: list[ReplicaSet]
    ) -> tuple[int, str]:
        """Build the replica; returns (pid, node address). Raises what its constructor raises."""
        import ray

        from tandem._private.ray_connection import connect
        from tandem._private.runtime import Runtime, set_runtime
        from tandem._private.transport import picklable_starlette

        # The driver's import path, for the user's modules (where they exist here).
        for entry in path:
            if entry not in sys.path and (not entry or os.path.exists(entry)):
                sys.path.append(entry)
        picklable_starlette()
        runtime = Runtime(connect)
        runtime.backend_name = "ray"
        runtime.adopt_running_loop()
        set_runtime(runtime)
        for replica_set in directory:
            runtime.publish(replica_set)
        spec = pickle.loads(spec_blob)
        self.replica = Replica(spec)
        self.replica.on_models_changed = lambda _ids: self._bump()
        await self.replica.start()
        self._reporting = asyncio.ensure_future(self._report_queues())
        return os.getpid(), ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]

    # -- requests ----------------------------------------------------------

    @_with_traceback
    async def call(
        self, token: str, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        assert self.replica is not None
        self._begin(token)
        try:
            return await self.replica.call(meta, args, kwargs)
        finally:
            self._running.pop(token, None)

    async def stream(
        self, token: str, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        """Yield the replica's items. The replica's generator runs in a task of its own,
        so a cancellation reaches it as CancelledError wherever it waits, as on every
        backend (Ray may resume this wrapper from a different task for each item)."""
        assert self.replica is not None
        if self._cancelled_early.pop(token, None) is not None:
            return
        items: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=1)
        pump = asyncio.ensure_future(_pump(self.replica.stream(meta, args, kwargs), items))
        self._running[token] = pump
        try:
            while True:
                kind, value = await items.get()
                if kind == _ITEM:
                    yield value
                elif kind == _END:
                    return
                else:
                    raise value
        finally:
            self._running.pop(token, None)
            if not pump.done():
                pump.cancel()
                await asyncio.wait([pump])

    async def cancel(self, token: str) -> None:
        """Cancel the request the caller knows as ``token``, even if it has not started yet.

        Ray's own cancellation can miss a request that is about to start; this
        cannot, so callers send both.
        """
        task = self._running.get(token)
        if task is not None:
            task.cancel()
            return
        now = time.monotonic()
        self._cancelled_early[token] = now
        if len(self._cancelled_early) > 1000:
            self._cancelled_early = {
                t: at for t, at in self._cancelled_early.items() if now - at < EARLY_CANCEL_TTL_S
            }

    def _begin(self, token: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._cancelled_early.pop(token, None) is not None:
            raise asyncio.CancelledError
        self._running[token] = task

    # -- control -----------------------------------------------------------

    @_with_traceback
    async def health(self) -> dict[str, Any]:
        assert self.replica is not None
        await self.replica.check_health()
        return self._facts()

    async def report(self) -> dict[str, Any]:
        return self._facts()

    def _facts(self) -> dict[str, Any]:
        replica = self.replica
        if replica is None:
            return {}
        return {"in_flight": replica.in_flight, "stats": replica.stats}

    @_with_traceback
    async def reconfigure(self, user_config: Any) -> None:
        assert self.replica is not None
        await self.replica.reconfigure(user_config)

    async def rank(self, rank: int, world_size: int) -> None:
        assert self.replica is not None
        self.replica.set_rank(rank, world_size)

    async def stop(self, timeout_s: float) -> None:
        if self._reporting is not None:
            self._reporting.cancel()
        if self.replica is not None:
            await self.replica.stop(timeout_s)

    async def publish(self, replica_set: ReplicaSet) -> None:
        from tandem._private.runtime import current_runtime

        runtime = current_runtime()
        if runtime is not None:
            runtime.publish(replica_set)

    # -- news for the driver -----------------------------------------------

    async def watch(self, version: int) -> tuple[int, dict[str, Any]]:
        """Wait until there is news after ``version`` (or a while); the latest facts."""
        if version == self._version:
            if self._changed is None or self._changed.done():
                self._changed = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._changed), WATCH_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass
        replica = self.replica
        models = replica.loaded_model_ids() if replica is not None else frozenset()
        return self._version, {"models": models, "queued": dict(self._queued)}

    def _bump(self) -> None:
        self._version += 1
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    async def _report_queues(self) -> None:
        from tandem._private.runtime import get_runtime

        while True:
            await asyncio.sleep(QUEUE_REPORT_S)
            queued = get_runtime().all_queued()
            if queued != self._queued:
                self._queued = queued
                self._bump()
