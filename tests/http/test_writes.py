"""A whole response reaches the client's socket in one write (http/writes.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from tandem._private.calls.flow import Last, begin
from tandem._private.http.proxy import _Exchange, _relay
from tandem._private.http.writes import JOIN_LIMIT, HeldWrites


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> Any:
        return f"info:{name}"


def test_held_writes_go_out_as_one() -> None:
    transport = _Transport()
    writes = HeldWrites(transport)  # type: ignore[arg-type]
    writes.write(b"a")  # not held: at once
    writes.hold()
    writes.write(b"head ")
    writes.write(b"body")
    assert transport.writes == [b"a"]
    writes.release()
    assert transport.writes == [b"a", b"head body"]
    writes.release()  # nothing held: nothing written
    assert transport.writes == [b"a", b"head body"]
    assert writes.get_extra_info("peername") == "info:peername"


def test_large_held_writes_are_not_copied_into_one() -> None:
    transport = _Transport()
    writes = HeldWrites(transport)  # type: ignore[arg-type]
    body = b"x" * (JOIN_LIMIT + 1)
    writes.hold()
    writes.write(b"head")
    writes.write(body)
    writes.release()
    assert transport.writes == [b"head", body]


def test_closing_sends_what_was_held_first() -> None:
    """uvicorn closes a connection right after the last body write (Connection: close)."""
    transport = _Transport()
    writes = HeldWrites(transport)  # type: ignore[arg-type]
    writes.hold()
    writes.write(b"response")
    writes.close()
    assert transport.writes == [b"response"] and transport.closed


def test_a_whole_response_goes_out_once_recorded_a_streamed_one_as_it_comes() -> None:
    transport = _Transport()
    writes = HeldWrites(transport)  # type: ignore[arg-type]
    start = {"type": "http.response.start", "status": 200, "headers": []}
    whole = Last([start, {"type": "http.response.body", "body": b"hi"}])
    streamed = [
        start,
        {"type": "http.response.body", "body": b"a", "more_body": True},
        {"type": "http.response.body", "body": b"b"},
    ]

    async def relay(items: list[Any]) -> list[int]:
        async def stream() -> Any:
            for item in items:
                yield item

        held_at_send: list[int] = []

        async def send(message: dict[str, Any]) -> None:
            writes.write(message["type"].encode())
            held_at_send.append(len(transport.writes))

        def recorded(status: int, error: str | None) -> None:
            # The request is counted and logged before a byte of its answer is out.
            held_at_send.append(-len(transport.writes))

        exchange = _Exchange(_never, None)
        writes.hold()  # as the proxy does once it has read the body
        await _relay(await begin(stream()), send, exchange, "id", recorded, writes)
        return held_at_send

    # A whole response: nothing reaches the transport until both messages are in and
    # the request is recorded; then it goes out in one write.
    assert asyncio.run(relay([whole])) == [0, 0, 0]
    assert transport.writes == [b"http.response.starthttp.response.body"]
    transport.writes.clear()
    # A streamed one: each message goes out as it comes.
    assert asyncio.run(relay(streamed)) == [1, 2, 3, -3]


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


def test_expect_100_continue_is_answered_before_the_body_is_sent(backend: str) -> None:
    """uvicorn writes "100 Continue" when the proxy reads the body: that write must not
    wait behind the ones the proxy holds (the client would wait for it, then time out)."""
    import socket

    import tandem as serve
    from tandem._private.api import http_url

    @serve.deployment
    class Length:
        async def __call__(self, request: Any) -> str:
            return str(len(await request.body()))

    serve.run(Length.bind(), backend=backend)
    url = http_url()
    assert url is not None
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"hello")
        answer = b""
        while not answer.endswith(b"5"):
            chunk = sock.recv(1000)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK")
