"""The process wire's peers (``backends/process/peer.py``) over a socket pair: a stream
whose producer marks its last item sends item and end as one message, and the
producer's generator still finishes cleanly (its cleanup runs, nothing is an error)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator
from typing import Any

from tandem._private.backends.process.peer import Peer, peer_on_socket
from tandem._private.calls.flow import Last


def test_a_last_item_carries_the_streams_end_and_the_producer_finishes() -> None:
    finished: list[str] = []
    frames: list[str] = []

    async def produce(op: str, payload: Any) -> AsyncGenerator[Any, None]:
        try:
            for i in range(payload):
                yield i
            yield Last("whole")
        finally:
            finished.append("cleanly")

    async def scenario() -> list[Any]:
        left, right = socket.socketpair()
        server = Peer("server", on_stream=produce)
        client = Peer("client")
        await peer_on_socket(left, server)
        await peer_on_socket(right, client)
        send = server.protocol.send
        server.protocol.send = lambda message: (frames.append(message[0]), send(message))[1]  # type: ignore[method-assign]
        try:
            return [item async for item in client.stream("stream", 2)]
        finally:
            client.abort()
            server.abort()

    items = asyncio.run(scenario())
    assert items[:2] == [0, 1]
    assert isinstance(items[2], Last) and items[2].value == "whole"
    assert frames == ["item", "item", "last"]  # no separate "end"
    assert finished == ["cleanly"]
