"""Callers' side of the process backend: a router's line to a replica in another process.

The line is opened with the run's secret (see ``handshake``): the driver's
backend and each replica process hold it and pass it to every connection. A
stream reports what its reader took, so the replica's generator waits for a
slow reader (``calls.flow``). A call's inbound argument (a WebSocket session's or
a streaming RPC's client messages, ``calls.inbound``) is sent after its request,
batch by batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from tandem._private.backends.process.peer import Peer, open_peer
from tandem._private.calls.channel import Chunk
from tandem._private.calls.context import RequestMetadata
from tandem._private.calls.errors import ReplicaNotReached
from tandem._private.calls.flow import Last, Opened, ReadReports, begin, new_token
from tandem._private.calls.inbound import Inbound, detach, start_pump, stop_pump
from tandem._private.calls.router import ReplicaInfo


@dataclass(frozen=True)
class ProcessAddress:
    """Where a replica process listens."""

    path: str
    pid: int


class ProcessConnection:
    """Opens one connection to the replica on first use; requests share it."""

    def __init__(self, info: ReplicaInfo, secret: bytes) -> None:
        address = info.address
        assert isinstance(address, ProcessAddress)
        self.replica_id = info.replica_id
        self._path = address.path
        self._secret = secret
        self._peer: Peer | None = None
        self._opening: asyncio.Future[Peer] | None = None

    async def _open(self) -> Peer:
        peer = self._peer
        if peer is not None and peer.is_open:
            return peer
        if peer is not None:
            raise ReplicaNotReached(f"Replica {self.replica_id} is gone.")
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._opening)

    async def _connect(self) -> Peer:
        try:
            self._peer = await open_peer(self._path, f"replica {self.replica_id}", self._secret)
        except OSError as exc:
            self._opening = None
            raise ReplicaNotReached(
                f"Cannot reach replica {self.replica_id}: {exc.strerror or exc}."
            ) from None
        return self._peer

    async def call(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        peer = await self._open()
        if not peer.is_open:
            raise ReplicaNotReached(f"Replica {self.replica_id} is gone.")
        args, kwargs, inbound = detach(args, kwargs)
        if inbound is None:
            return await peer.call("call", (meta, args, kwargs))
        pumping = _pump(peer, inbound)
        try:
            return await peer.call("call", (meta, args, kwargs))
        finally:
            await stop_pump(pumping)

    async def http_request(self, meta: RequestMetadata, args: tuple[Any, ...]) -> Last | Opened:
        return await begin(self.stream(meta, args, {}))

    async def stream(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        peer = await self._open()
        if not peer.is_open:
            raise ReplicaNotReached(f"Replica {self.replica_id} is gone.")
        token = new_token()  # names the stream in the reports of what was read (calls.flow)
        reads = ReadReports(lambda count: _report_reads(peer, token, count))
        args, kwargs, inbound = detach(args, kwargs)
        source = peer.stream("stream", (token, meta, args, kwargs))
        pumping = None if inbound is None else _pump(peer, inbound)
        try:
            async for item in source:
                if type(item) is Chunk:  # items that crossed together (calls.channel)
                    for each in item.items:
                        yield each
                        reads.took()
                else:
                    yield item
                    reads.took()
        finally:
            await stop_pump(pumping)
            await source.aclose()

    def close(self) -> None:
        peer, self._peer = self._peer, None
        if peer is not None:
            peer.abort()
        elif self._opening is not None:
            self._opening.cancel()


def _pump(peer: Peer, inbound: Inbound) -> asyncio.Task[None]:
    """Send an inbound argument's items after its call, on the same line (in order)."""
    ref = inbound.token
    return start_pump(
        inbound, lambda items, end, error: peer.call("push", (ref, items, end, error))
    )


def _report_reads(peer: Peer, token: str, count: int) -> None:
    with contextlib.suppress(ConnectionError):  # closing: the stream fails on its own
        peer.note("read", (token, count))
