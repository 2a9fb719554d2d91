"""WebSocket sessions at the proxy: relayed both ways between a client and its ingress.

A session is one streaming call to the application's ingress replica, like an
HTTP request (see ``proxy``): its arguments are the handshake's scope and an
:class:`~tandem._private.calls.inbound.Inbound` of the client's ASGI messages,
sent to the replica as they come; what the call yields are the app's messages
(accept, send, close), passed to the client as they come. Both ways are bounded:
uvicorn stops reading a client whose messages the app does not read, and the
replica's app waits in ``send`` while the client reads slowly.

The session runs in the ingress replica on every backend, and holds one of its
``max_ongoing_requests`` while it lasts. A client that leaves is told to the app
(``websocket.disconnect``: Starlette raises ``WebSocketDisconnect``); a session
still running DISCONNECT_GRACE_S later is cancelled, with every call it made.
Failures say only a status and the request id: before the handshake completes,
an HTTP error response (403 if the app refused, 500/502/503 if it failed);
after it, close code 1011 (1013 for a shed or unavailable application).
``request_timeout_s`` does not apply: a session lasts as long as both ends want.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncGenerator
from http import HTTPStatus
from typing import Any

from starlette.types import Receive, Scope, Send

from tandem._private import tracing
from tandem._private.calls.context import HTTP_METHOD, DeploymentID, RequestMetadata
from tandem._private.calls.inbound import Inbound, InboundQueue
from tandem._private.calls.runtime import Runtime
from tandem._private.http.bridge import HTTPRequestData
from tandem._private.http.failures import PUBLIC_TEXT, classify
from tandem._private.http.logs import log_access
from tandem._private.http.metrics import RequestCounts
from tandem._private.http.options import HTTPOptions
from tandem._private.http.scope import (
    RouteTable,
    client_hints,
    match_route,
    model_id,
    request_id,
    route_path,
)
from tandem._private.queues import uncancel

logger = logging.getLogger("tandem.proxy")

METHOD = "WEBSOCKET"  # the method label of sessions in /metrics and the access log
DISCONNECT_GRACE_S = 5.0
# Close codes (RFC 6455): the server failed; try again later.
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013


class WebSocketSessions:
    """Serves the proxy's ``websocket`` scopes (see the module docstring)."""

    def __init__(
        self, runtime: Runtime, routes: RouteTable, options: HTTPOptions, metrics: RequestCounts
    ) -> None:
        self._runtime = runtime
        self._routes = routes
        self._options = options
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path = route_path(scope)
        rid = request_id(scope)
        route = None if path.startswith("/-/") else match_route(self._routes(), path)
        if route is None:
            await _deny(scope, send, 404, f"Not Found: no application serves {path!r}", rid)
            self._log(path, 404, started, rid, None)
            return
        prefix, app, ingress = route
        try:
            rank = _priority(scope)
        except ValueError as exc:
            await _deny(scope, send, 400, f"Bad Request: {exc}", rid)
            self._log(path, 400, started, rid, app)
            return
        meta = RequestMetadata(
            rid, app, ingress, HTTP_METHOD, True, model_id(scope), prefix, priority=rank
        )
        spans = tracing.SPANS
        span = None if spans is None else spans.http(scope, rid, app, ingress, prefix)
        if span is not None:  # the session's span, while tracing is on
            meta.trace = span.traceparent
        session = _Session(scope, receive, send, rid)
        self._metrics.started(app)
        outcome: tuple[int, str | None] = (500, "server_error")  # unless the relay returns
        try:
            stream = self._runtime.stream(
                DeploymentID(app_name=app, name=ingress),
                meta,
                (HTTPRequestData.from_scope(scope, b"", prefix), session.inbound()),
                {},
            )
            outcome = await session.relay(stream, app)
        finally:
            status, error = outcome
            if span is not None:
                span.outcome(status, error, status >= 500)
                span.__exit__(*sys.exc_info())
            self._metrics.observe(
                app, ingress, METHOD, status, time.perf_counter() - started, error
            )
            self._log(path, status, started, rid, app)

    def _log(self, path: str, status: int, started: float, rid: str, app: str | None) -> None:
        if self._options.access_log:
            log_access(METHOD, path, status, time.perf_counter() - started, rid, app)


class _Session:
    """One session's relay; its status is the handshake's answer (101 once accepted)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send
        self._rid = rid
        self._task = asyncio.current_task()
        self._grace: asyncio.TimerHandle | None = None
        self._inbox = InboundQueue()
        self._reader: asyncio.Future[None] | None = None
        self._stopped = False  # the grace ran out: the proxy cancelled the session
        self.client_gone = False
        self.status: int | None = None  # set by the handshake's answer
        self.closed = False  # a close (or denial) went to the client

    def inbound(self) -> Inbound:
        """The client's messages for the app, read as they come (up to the inbound
        bound ahead of the app), so the proxy sees the client leave even while the
        app reads nothing."""
        self._reader = asyncio.ensure_future(self._read_client())
        return Inbound(self._inbox)

    async def _read_client(self) -> None:
        while True:
            message = await self._receive()
            gone = message["type"] == "websocket.disconnect"
            if gone:
                self._left()
            if not await self._inbox.put([message], gone, None) or gone:
                return

    def _left(self) -> None:
        self.client_gone = True
        if self._grace is None and self._task is not None:
            self._grace = asyncio.get_running_loop().call_later(DISCONNECT_GRACE_S, self._stop)

    def _stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._stopped = True
            self._task.cancel()

    async def relay(self, stream: AsyncGenerator[Any, None], app: str) -> tuple[int, str | None]:
        """Pass the app's messages to the client until the session ends; (status, error)."""
        try:
            async for message in stream:
                await self._forward(message)
        except asyncio.CancelledError:
            if not self._stopped:
                raise  # the server is shutting down
            uncancel(self._task)
            logger.warning(
                "WebSocket session %s of application %r still ran %.0f s after its client "
                "left; it was cancelled.",
                self._rid,
                app,
                DISCONNECT_GRACE_S,
            )
            return self.status or 499, "disconnected"
        except Exception as exc:
            return await self._failed(exc, app)
        finally:
            if self._grace is not None:
                self._grace.cancel()
            await stream.aclose()
            self._inbox.close()
            if self._reader is not None:
                self._reader.cancel()
                await asyncio.gather(self._reader, return_exceptions=True)
        if self.status is None:  # the app ended without answering the handshake
            await self._deliver({"type": "websocket.close", "code": 1000})
            self.status = 403
        elif not self.closed and not self.client_gone:
            await self._deliver({"type": "websocket.close", "code": 1000})
        return self.status, None

    async def _forward(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if self.status is None:
            if kind == "websocket.accept":
                self.status = 101
                message = {**message, "headers": self._with_id(message.get("headers", ()))}
            elif kind == "websocket.http.response.start":
                self.status = int(message["status"])
                message = {**message, "headers": self._with_id(message.get("headers", ()))}
            elif kind == "websocket.close":
                self.status = 403
        if kind == "websocket.close":
            self.closed = True
        await self._deliver(message)

    async def _deliver(self, message: dict[str, Any]) -> None:
        if self.client_gone:
            return  # the app learns it from the disconnect it is sent
        try:
            await self._send(message)
        except OSError:  # uvicorn's ClientDisconnected: its disconnect message follows
            self.client_gone = True

    def _with_id(self, headers: Any) -> list[tuple[bytes, bytes]]:
        return [*headers, (b"x-request-id", self._rid.encode())]

    async def _failed(self, exc: Exception, app: str) -> tuple[int, str]:
        status, kind = classify(exc)
        if status == 500:
            logger.error(
                "WebSocket session %s of application %r failed",
                self._rid,
                app,
                exc_info=exc,
                extra={"request_id": self._rid},
            )
        else:
            logger.warning("WebSocket session %s of application %r: %s", self._rid, app, exc)
        if self.status is None:
            phrase = HTTPStatus(status).phrase
            text = phrase if status == 500 else f"{phrase}: {PUBLIC_TEXT[kind]}"
            await _deny(self._scope, self._deliver, status, text, self._rid)
            self.status = status
        elif not self.closed:
            code = INTERNAL_ERROR if status == 500 else TRY_AGAIN_LATER
            reason = f"{HTTPStatus(status).phrase} (request id {self._rid})"
            await self._deliver({"type": "websocket.close", "code": code, "reason": reason})
        return self.status, kind


def _priority(scope: Scope) -> int:
    """A session's ``X-Request-Priority`` (it orders the session's start, and the calls it
    makes, as a request's). ValueError for a bad one, and for ``X-Request-Deadline-Ms``:
    a session is not answered, so it has no deadline to keep."""
    budget_s, rank = client_hints(scope)
    if budget_s is not None:
        raise ValueError(
            "X-Request-Deadline-Ms applies to requests, not to WebSocket sessions; "
            "leave it out of the handshake"
        )
    return rank


async def _deny(scope: Scope, send: Any, status: int, text: str, rid: str) -> None:
    """Refuse a handshake with an HTTP response, where the server can send one."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        with contextlib.suppress(OSError):
            await send({"type": "websocket.close", "code": 1000})  # the server answers 403
        return
    body = f"{text} (request id {rid}).\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", rid.encode()),
    ]
    with contextlib.suppress(OSError):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
