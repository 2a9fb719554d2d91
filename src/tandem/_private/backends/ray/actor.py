"""A replica as a Ray actor: the ray backend's counterpart of the replica process.

The driver creates one :class:`ReplicaActor` per replica, then calls ``start``
with the replica's spec and the replica sets of every deployment. The actor
serves ``call``, and streams as ``stream_open`` (the first items, often all)
then ``stream_rest`` (the rest, as a Ray streaming generator); the routers of
other processes send requests straight to it, and may ``cancel`` them by the
token they gave. It obeys the control methods (health, reconfigure, rank, stop),
and answers ``watch``: a long poll that returns when the models it holds or the
requests waiting in its routers change. The driver keeps one ``watch`` pending
per actor, so it also learns at once when the actor dies.

Everything runs on the actor's own event loop, which the actor's tandem
runtime adopts: handle calls made by the replica run inline, as elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import pickle
import sys
import time
import traceback
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from tandem._private.calls.context import DeploymentID, RequestMetadata
from tandem._private.calls.router import ReplicaSet
from tandem._private.queues import wait_event
from tandem._private.replica.replica import Replica

# How often the actor looks for changes in the requests waiting in its routers.
QUEUE_REPORT_S = 0.2
# A watch returns after this long even when nothing changed.
WATCH_TIMEOUT_S = 30.0
# A stream's first call returns the items that arrive within this long of the first.
GATHER_S = 0.002
# Items a stream buffers here before its generator waits for the caller.
STREAM_BUFFER = 64
# A stream's caller must ask for the rest within this long, or the stream is cancelled.
ORPHAN_S = 30.0
# A stopped replica refuses late requests for this long before its actor is killed.
STOP_LINGER_S = 0.5
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


class _Ended(Exception):
    """The replica's generator has no more items."""


class _Channel:
    """A stream's items, from the replica's generator (run by a task of its own) to
    whoever reads them here. Holds at most STREAM_BUFFER items; the generator waits
    for room. Cancelling ``pump`` reaches the generator as CancelledError."""

    def __init__(self, source: AsyncGenerator[Any, None]) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.pump = asyncio.ensure_future(self._run(source))
        self.pump.add_done_callback(lambda _: self._readable.set())

    async def _run(self, source: AsyncGenerator[Any, None]) -> None:
        try:
            async for item in source:
                self._items.append(item)
                self._readable.set()
                if len(self._items) >= STREAM_BUFFER:
                    self._writable.clear()
                    await self._writable.wait()
        except Exception as exc:
            _attach_traceback(exc)
            raise
        finally:
            await source.aclose()

    def take(self) -> list[Any]:
        """The items buffered now (perhaps none)."""
        items = list(self._items)
        self._items.clear()
        self._writable.set()
        return items

    @property
    def ended_cleanly(self) -> bool:
        """Every item is taken and the generator ended without an error."""
        pump = self.pump
        return not self._items and pump.done() and not pump.cancelled() and not pump.exception()

    async def wait(self, timeout_s: float | None = None) -> None:
        """Until there is an item (or the generator ended), or ``timeout_s`` passed."""
        if self._items or self.pump.done():
            return
        self._readable.clear()
        await wait_event(self._readable, timeout_s)

    async def next(self) -> Any:
        while not self._items:
            self._raise_if_over()
            await self.wait()
        item = self._items.popleft()
        self._writable.set()
        return item

    def _raise_if_over(self) -> None:
        pump = self.pump
        if not pump.done():
            return
        if pump.cancelled():
            raise asyncio.CancelledError
        error = pump.exception()
        if error is not None:
            raise error
        raise _Ended

    async def close(self) -> None:
        if not self.pump.done():
            self.pump.cancel()
            await asyncio.wait([self.pump])


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
        # Streams whose first items were returned, waiting for stream_rest.
        self._open: dict[str, _Channel] = {}

    @_with_traceback
    async def start(
        self, spec_blob: bytes, path: list[str], directory: list[ReplicaSet]
    ) -> tuple[int, str]:
        """Build the replica; returns (pid, node address). Raises what its constructor raises."""
        import ray

        from tandem._private.backends.process.frames import picklable_starlette
        from tandem._private.backends.ray.connection import connect
        from tandem._private.calls.runtime import Runtime, set_runtime

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

    @_with_traceback
    async def stream_open(
        self, token: str, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], bool]:
        """Start a streaming call; return its first items, and whether that was all.

        Gathers items for up to GATHER_S after the first, so a short stream (most
        HTTP responses: a start and a body) takes this one call; a longer one
        continues with :meth:`stream_rest`, which must follow within ORPHAN_S.
        """
        assert self.replica is not None
        if self._cancelled_early.pop(token, None) is not None:
            raise asyncio.CancelledError
        channel = _Channel(self.replica.stream(meta, args, kwargs))
        self._running[token] = channel.pump
        loop = asyncio.get_running_loop()
        try:
            first = [await channel.next()]
            deadline = loop.time() + GATHER_S
            while len(first) < STREAM_BUFFER:
                first.extend(channel.take())
                if channel.ended_cleanly:
                    self._running.pop(token, None)
                    return first, True
                remaining = deadline - loop.time()
                if remaining <= 0 or channel.pump.done():
                    break  # an error, if any, goes out with stream_rest (after these items)
                await channel.wait(remaining)
        except _Ended:
            self._running.pop(token, None)
            return [], True
        except BaseException:
            self._running.pop(token, None)
            await channel.close()
            raise
        self._open[token] = channel
        loop.call_later(ORPHAN_S, self._abandon, token)
        return first, False

    async def stream_rest(self, token: str) -> AsyncGenerator[Any, None]:
        """The rest of a stream that :meth:`stream_open` started, item by item."""
        channel = self._open.pop(token, None)
        if channel is None:
            raise RuntimeError(
                f"The stream {token} is not open here (it was cancelled, or its caller "
                f"took longer than {ORPHAN_S} s to ask for the rest)."
            )
        try:
            while True:
                try:
                    item = await channel.next()
                except _Ended:
                    return
                yield item
        finally:
            self._running.pop(token, None)
            await channel.close()

    def _abandon(self, token: str) -> None:
        channel = self._open.pop(token, None)
        if channel is not None:  # its caller never came back for the rest
            self._running.pop(token, None)
            channel.pump.cancel()

    async def cancel(self, token: str) -> None:
        """Cancel the request the caller knows as ``token``, even if it has not started yet.

        Callers use this rather than ``ray.cancel``, which can miss a request about
        to start, and can cancel the calls a request made along with it.
        """
        task = self._running.get(token)
        if task is not None:
            task.cancel()
            channel = self._open.pop(token, None)
            if channel is not None:
                self._running.pop(token, None)
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
        return {
            "in_flight": replica.in_flight,
            "abandoned": replica.abandoned,
            "stats": replica.stats,
        }

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
            # Requests sent before the caller learnt of the new replica set may still be
            # on their way; refused here (not lost with the actor), they go elsewhere.
            await asyncio.sleep(STOP_LINGER_S)

    async def publish(self, replica_set: ReplicaSet) -> None:
        from tandem._private.calls.runtime import current_runtime

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
        from tandem._private.calls.runtime import get_runtime

        while True:
            await asyncio.sleep(QUEUE_REPORT_S)
            queued = get_runtime().all_queued()
            if queued != self._queued:
                self._queued = queued
                self._bump()
