"""The replica side of an HTTP request: from request data to ASGI messages.

The proxy sends an :class:`HTTPRequestData` (the ASGI scope's plain parts and
the whole body: picklable, so it can cross a process boundary). The ingress
replica rebuilds a ``starlette.requests.Request`` from it, calls the user's
``__call__`` (or the class's ASGI app, for ``@ingress``), turns the result into
a response, and yields that response's ASGI messages as they are produced, so a
``StreamingResponse`` streams chunk by chunk back through the proxy.

A WebSocket session (scope type ``websocket``) also brings the client's
messages, as an async iterator (``calls.inbound``); only an ``@ingress`` app
serves it. Whatever the app sends waits for the proxy to take it, at most
STREAM_BUFFER messages ahead: a slow client slows the app, it does not fill memory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tandem._private.calls.flow import STREAM_BUFFER, Last
from tandem._private.queues import drain

__all__ = ["HTTPRequestData", "answer", "serve_http", "to_response"]

Receive = Callable[[], Awaitable[dict[str, Any]]]

_SCOPE_KEYS = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "root_path",
    "query_string",
    "headers",
    "client",
    "server",
    "subprotocols",
)


@dataclass
class HTTPRequestData:
    """One HTTP request as it travels from the proxy to a replica."""

    scope: dict[str, Any]
    body: bytes

    @classmethod
    def from_scope(
        cls, scope: MutableMapping[str, Any], body: bytes, root_path: str
    ) -> HTTPRequestData:
        plain = {key: scope[key] for key in _SCOPE_KEYS if key in scope}
        plain["root_path"] = scope.get("root_path", "") + ("" if root_path == "/" else root_path)
        plain["headers"] = list(scope.get("headers", []))
        for key in ("client", "server"):
            if plain.get(key) is not None:
                plain[key] = tuple(plain[key])
        if "websocket.http.response" in scope.get("extensions", {}):
            # The app may refuse a session with a response of its own (the proxy relays it).
            plain["extensions"] = {"websocket.http.response": {}}
        return cls(plain, body)


class _Channel:
    """``receive`` for the user's code: the body once, then (on cancel) a disconnect."""

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body
        self.disconnected = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}


def to_response(result: Any) -> Response:
    """What an ingress method returned, as a Starlette response."""
    if isinstance(result, Response):
        return result
    if isinstance(result, str):
        return PlainTextResponse(result)
    if isinstance(result, (bytes, bytearray, memoryview)):
        return Response(bytes(result), media_type="application/octet-stream")
    model_dump = getattr(result, "model_dump", None)
    if callable(model_dump):  # a pydantic model
        return JSONResponse(model_dump(mode="json"))
    if not isinstance(result, dict) and isinstance(result, Mapping):
        result = dict(result)  # e.g. request.query_params, as JSON (as Ray Serve does)
    try:
        body = json.dumps(result, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"The ingress returned a {type(result).__name__}, which tandem cannot turn into an "
            "HTTP response; return str, bytes, a JSON-serializable value, a pydantic model or "
            "a starlette Response."
        ) from exc
    return Response(body.encode(), media_type="application/json")


async def serve_http(
    data: HTTPRequestData,
    call: Callable[[Request], Awaitable[Any]] | None,
    asgi_app: Callable[..., Awaitable[None]] | None,
    inbound: AsyncIterator[dict[str, Any]] | None = None,
) -> AsyncGenerator[dict[str, Any] | Last, None]:
    """Run one HTTP request (or WebSocket session) in the replica; yield its ASGI messages
    (a plain response's two as one ``Last``).

    ``call`` runs the user's ``__call__`` with the request; ``asgi_app`` (for
    ``@ingress``) is run as it is instead. ``inbound``: a session's client messages.
    """
    scope = data.scope
    if scope["type"] == "websocket":
        if asgi_app is None or inbound is None:
            # Only an ASGI app can take a session: refuse the handshake (HTTP 403).
            yield {"type": "websocket.close", "code": 1000}
            return
        session = _Session(inbound)
        async for message in _run_asgi(asgi_app, scope, session.receive, _nothing):
            yield message
        return
    if asgi_app is None:
        assert call is not None
        answered = await answer(data, call)
        if isinstance(answered, Last):
            yield answered
            return
        async for message in answered:
            yield message
        return
    channel = _Channel(data.body)
    async for message in _run_asgi(asgi_app, scope, channel.receive, channel.disconnected.set):
        yield message


async def answer(
    data: HTTPRequestData, call: Callable[[Request], Awaitable[Any]]
) -> Last | AsyncGenerator[dict[str, Any], None]:
    """Run the user's ``__call__`` with the request: a plain response whole, as one
    ``Last`` (most are: no task or queue needed), else a generator (not started yet)
    of the ASGI messages of the response it returned, as they are produced."""
    channel = _Channel(data.body)
    request = Request(data.scope, channel.receive)
    # The body is here whole: body(), json(), form() and stream() take it from
    # Starlette's cache instead of a stream over receive().
    request._body = data.body
    response = to_response(await call(request))
    if (
        not isinstance(response, StreamingResponse)
        and type(response).__call__ is Response.__call__
        and response.background is None
    ):
        start = {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
        body = {"type": "http.response.body", "body": response.body, "more_body": False}
        return Last((start, body))
    return _run_asgi(response, data.scope, channel.receive, channel.disconnected.set)


class _Session:
    """``receive`` for a WebSocket app: the client's messages, then disconnects."""

    def __init__(self, inbound: AsyncIterator[dict[str, Any]]) -> None:
        self._inbound = inbound.__aiter__()
        self._gone = False

    async def receive(self) -> dict[str, Any]:
        if not self._gone:
            try:
                message = await self._inbound.__anext__()
            except StopAsyncIteration:  # the proxy's side ended without a word
                message = {"type": "websocket.disconnect", "code": 1006}
            if message.get("type") == "websocket.disconnect":
                self._gone = True
            return message
        return {"type": "websocket.disconnect", "code": 1006}


def _nothing() -> None:
    pass


_END = object()


async def _run_asgi(
    app: Callable[..., Awaitable[None]],
    scope: dict[str, Any],
    receive: Receive,
    on_exit: Callable[[], None],
) -> AsyncGenerator[dict[str, Any], None]:
    """Run an ASGI app as a task and yield what it sends, as it sends it (its ``send``
    waits while STREAM_BUFFER messages are untaken). ``on_exit``: called when the
    reader is done, before the app is cancelled if it still runs."""
    sent: asyncio.Queue[Any] = asyncio.Queue()  # the end and errors never wait for room
    room = asyncio.Semaphore(STREAM_BUFFER)

    async def send(message: dict[str, Any]) -> None:
        await room.acquire()
        sent.put_nowait(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except BaseException as exc:
            sent.put_nowait(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            sent.put_nowait(_END)

    task = asyncio.create_task(run())
    try:
        async for message in drain(sent, _END):
            room.release()
            yield message
    finally:
        on_exit()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
