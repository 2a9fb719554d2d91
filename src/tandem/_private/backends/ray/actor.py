"""A replica as a Ray actor: the ray backend's adapter over the replica host.

The driver creates one :class:`ReplicaActor` per replica, then calls ``start``
with its :class:`StartSpec`. Each actor method maps to the
:class:`ReplicaHost`, which does the work (``replica/host.py``); what is Ray's
own stays here. A stream travels as ``stream_open`` (the first items, often
all) then ``stream_rest`` (the rest, in batches, as a Ray streaming generator),
since a Ray call or object costs much more than a message on a socket; its
caller reports what it read with ``read``. Exceptions leave with their
traceback as text (``tracebacks``). ``watch`` is the host's long poll: the
driver keeps one pending per actor, so it also learns at once when the actor
dies.

Everything runs on the actor's own event loop, which the actor's tandem
runtime adopts: handle calls made by the replica run inline, as elsewhere.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from typing import Any

import ray

from tandem._private.backends.process.frames import picklable_starlette
from tandem._private.backends.ray.connection import connect
from tandem._private.backends.ray.tracebacks import attach_traceback, with_traceback
from tandem._private.calls.channel import Channel, Ended, batches, gathered
from tandem._private.calls.context import RequestMetadata
from tandem._private.calls.router import ReplicaSet
from tandem._private.calls.runtime import Runtime, set_runtime
from tandem._private.replica.host import ReplicaHost, StartSpec
from tandem._private.replica.log_buffer import LogRead
from tandem._private.replica.replica import ReplicaFacts

# A stream's first call returns the items that arrive within this long of the first.
GATHER_S = 0.002
# A stream's caller must ask for the rest within this long, or the stream is cancelled.
ORPHAN_S = 30.0
# A stopped replica refuses late requests for this long before its actor is killed.
STOP_LINGER_S = 0.5


class ReplicaActor:
    """Hosts one replica in a Ray actor (see the module docstring)."""

    def __init__(self) -> None:
        self._host: ReplicaHost | None = None
        # Streams whose first items were returned, waiting for stream_rest.
        self._open: dict[str, Channel] = {}

    def _hosting(self) -> ReplicaHost:
        if self._host is None:
            raise RuntimeError("This replica actor has not been started yet.")
        return self._host

    @with_traceback
    async def start(self, spec: StartSpec) -> tuple[int, str]:
        """Build the replica; returns (pid, node address). Raises what its constructor raises."""
        picklable_starlette()
        runtime = Runtime(connect)
        runtime.backend_name = "ray"
        runtime.adopt_running_loop()
        set_runtime(runtime)
        self._host = ReplicaHost(runtime)
        await self._host.start(spec)
        return os.getpid(), ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]

    # -- requests ----------------------------------------------------------

    @with_traceback
    async def call(
        self, token: str, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return await self._hosting().call(token, meta, args, kwargs)

    @with_traceback
    async def stream_open(
        self, token: str, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], bool]:
        """Start a streaming call; return its first items, and whether that was all.

        Gathers items for up to GATHER_S (or the call's stream_chunk_ms, if longer)
        after the first, so a short stream (most
        HTTP responses: a start and a body) takes this one call; a longer one
        continues with :meth:`stream_rest`, which must follow within ORPHAN_S.
        """
        channel = Channel(
            self._hosting().stream(token, meta, args, kwargs),
            attach_traceback,
            window_s=meta.stream_chunk_s,
        )
        try:
            # An error after these items goes out with stream_rest.
            first = await gathered(channel, max(GATHER_S, channel.window_s))
        except Ended:
            return [], True
        except BaseException:
            await channel.close()
            raise
        if channel.ended_cleanly:
            return first, True
        self._open[token] = channel
        asyncio.get_running_loop().call_later(ORPHAN_S, self._abandon, token)
        return first, False

    async def stream_rest(self, token: str) -> AsyncGenerator[list[Any], None]:
        """The rest of a stream that :meth:`stream_open` started, in lists of the
        items there at each step: a list leaves as soon as it has one item (or, with
        ``stream_chunk_ms``, that much later), and a Ray object per item costs more
        than most items (a fast stream ran at a third of the speed)."""
        channel = self._open.pop(token, None)
        if channel is None:
            raise RuntimeError(
                f"The stream {token} is not open here (it was cancelled, or its caller "
                f"took longer than {ORPHAN_S} s to ask for the rest)."
            )
        batched = batches(channel)
        try:
            async for items in batched:
                yield items
        finally:
            await batched.aclose()

    def _abandon(self, token: str) -> None:
        channel = self._open.pop(token, None)
        if channel is not None:  # its caller never came back for the rest
            channel.pump.cancel()

    async def push(
        self, token: str, items: list[Any], end: bool, error: BaseException | None
    ) -> bool:
        """Items of a stream's inbound argument (see ``calls.inbound``)."""
        return await self._hosting().push(token, items, end, error)

    async def read(self, token: str, count: int) -> None:
        """The caller of stream ``token`` read ``count`` more of its items."""
        self._hosting().read(token, count)

    async def cancel(self, token: str) -> None:
        """Cancel the request the caller knows as ``token``, even if it has not started yet.

        Callers use this rather than ``ray.cancel``, which can miss a request about
        to start, and can cancel the calls a request made along with it.
        """
        channel = self._open.pop(token, None)
        if channel is not None:  # between stream_open and stream_rest
            channel.pump.cancel()
            return
        self._hosting().cancel(token)

    # -- control -----------------------------------------------------------

    @with_traceback
    async def health(self) -> ReplicaFacts:
        return await self._hosting().check_health()

    async def report(self) -> ReplicaFacts:
        return self._host.facts() if self._host is not None else ReplicaFacts()

    async def logs(self, after: int, limit: int, request_id: str | None) -> LogRead:
        if self._host is None:
            return LogRead([], 0)
        return self._host.logs(after, limit, request_id)

    @with_traceback
    async def reconfigure(self, user_config: Any) -> None:
        await self._hosting().reconfigure(user_config)

    async def rank(self, rank: int, world_size: int) -> None:
        await self._hosting().set_rank(rank, world_size)

    async def stop(self, timeout_s: float) -> None:
        if self._host is not None:
            await self._host.stop(timeout_s)
            # Requests sent before the caller learnt of the new replica set may still be
            # on their way; refused here (not lost with the actor), they go elsewhere.
            await asyncio.sleep(STOP_LINGER_S)

    async def publish(self, replica_set: ReplicaSet) -> None:
        if self._host is not None:
            self._host.publish(replica_set)

    async def watch(self, version: int) -> tuple[int, dict[str, Any]]:
        """The host's news after ``version`` (see :meth:`ReplicaHost.watch`)."""
        return await self._hosting().watch(version)
