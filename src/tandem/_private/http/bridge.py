"""The replica side of an HTTP request: from request data to ASGI messages.

The proxy sends an :class:`HTTPRequestData` (the ASGI scope's plain parts and
the whole body: picklable, so it can cross a process boundary). The ingress
replica rebuilds a ``starlette.requests.Request`` from it, calls the user's
``__call__`` (or the class's ASGI app, for ``@ingress``), turns the result into
a response, and yields that response's ASGI messages as they are produced, so a
``StreamingResponse`` streams chunk by chunk back through the proxy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tandem._private.queues import drain

__all__ = ["HTTPRequestData", "serve_http", "to_response"]

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
) -> AsyncGenerator[dict[str, Any], None]:
    """Run one HTTP request in the replica and yield its ASGI response messages.

    ``call`` runs the user's ``__call__`` with the request; ``asgi_app`` (for
    ``@ingress``) is run as it is instead.
    """
    scope = data.scope
    channel = _Channel(data.body)
    if asgi_app is None:
        assert call is not None
        response = to_response(await call(Request(scope, channel.receive)))
        if (
            not isinstance(response, StreamingResponse)
            and type(response).__call__ is Response.__call__
        ):
            # A plain response: its messages are known; no task or queue needed.
            yield {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
            yield {"type": "http.response.body", "body": response.body, "more_body": False}
            if response.background is not None:
                await response.background()
            return
        app: Callable[..., Awaitable[None]] = response
    else:
        app = asgi_app
    async for message in _run_asgi(app, scope, channel):
        yield message


_END = object()


async def _run_asgi(
    app: Callable[..., Awaitable[None]], scope: dict[str, Any], channel: _Channel
) -> AsyncGenerator[dict[str, Any], None]:
    """Run an ASGI app as a task and yield what it sends, as it sends it."""
    sent: asyncio.Queue[Any] = asyncio.Queue()

    async def send(message: dict[str, Any]) -> None:
        sent.put_nowait(message)

    async def run() -> None:
        try:
            await app(scope, channel.receive, send)
        except BaseException as exc:
            sent.put_nowait(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            sent.put_nowait(_END)

    task = asyncio.create_task(run())
    try:
        async for message in drain(sent, _END):
            yield message
    finally:
        channel.disconnected.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
