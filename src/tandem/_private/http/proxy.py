"""The proxy: an ASGI app that sends each HTTP request to its application's ingress.

It picks the application by the longest matching ``route_prefix``, reads the
body, and streams the ingress replica's ASGI messages back to the client. A
client that disconnects, or a request past ``request_timeout_s``, cancels the
request in the ingress and in every call it made. Errors in user code become a
500 carrying a request id (also in the ``X-Request-Id`` header and the log).

Clients never see internals: 5xx bodies are a short fixed message and the
request id; what went wrong (exception text, traceback) goes to the log and to
the owner's detailed status. A client's ``X-Request-Id`` is kept only if it is
sane (see ``scope.REQUEST_ID``). A body larger than ``max_body_bytes`` gets 413
before it is buffered. A request shed because the ingress's callers' queue is
full (``max_queued_requests``) gets its deployment's ``backpressure_config``:
503 (or 429), with ``Retry-After`` if it names a delay.

Routes match the path after ``http_options.root_path`` (uvicorn puts it in the
scope's ``root_path`` and before ``path``); the application's route prefix is
added to the ``root_path`` its ingress sees.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from tandem._private import tracing
from tandem._private.app.backpressure import BackpressureConfig
from tandem._private.calls.context import HTTP_METHOD, DeploymentID, RequestMetadata
from tandem._private.calls.deadlines import passed
from tandem._private.calls.flow import Last, Opened
from tandem._private.calls.runtime import Runtime
from tandem._private.http import scope as scopes
from tandem._private.http.bridge import HTTPRequestData
from tandem._private.http.failures import PUBLIC_TEXT, SheddingLog, classify
from tandem._private.http.logs import log_access
from tandem._private.http.metrics import RequestCounts
from tandem._private.http.options import HTTPOptions
from tandem._private.http.scope import (
    RouteTable,
    header,
    match_route,
    model_id,
    route_path,
)
from tandem._private.http.websocket import WebSocketSessions
from tandem._private.http.writes import SCOPE_KEY, UNHELD, HeldWrites, Unheld
from tandem._private.queues import uncancel
from tandem.exceptions import BackPressureError, DeadlineExceededError

logger = logging.getLogger("tandem.proxy")

# (application, deployment) -> its backpressure_config, if it set one.
BackpressureLookup = Callable[[str, str], BackpressureConfig | None]

# A request still running after this long starts listening for the client leaving.
DISCONNECT_WATCH_DELAY_S = 0.05
# How often the watcher looks at requests in flight (timeouts are this precise).
WATCH_INTERVAL_S = 0.02


class _BodyTooLarge(Exception):
    """The request's body is over ``max_body_bytes``."""


class _Stop(Exception):
    """Why the proxy cancelled a request: the client left, or time ran out."""


class Proxy:
    """See the module docstring. ``routes()`` returns the current route table;
    ``backpressure(app, deployment)`` a deployment's backpressure_config."""

    def __init__(
        self,
        runtime: Runtime,
        routes: RouteTable,
        endpoints: ASGIApp,
        options: HTTPOptions,
        metrics: RequestCounts,
        backpressure: BackpressureLookup,
    ) -> None:
        self._runtime = runtime
        self._routes = routes
        self._backpressure = backpressure
        self._endpoints = endpoints
        self._options = options
        self.metrics = metrics
        self._exchanges: set[_Exchange] = set()
        self._websockets = WebSocketSessions(runtime, routes, options, metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websockets(scope, receive, send)
        # uvicorn runs it with lifespan="off": no other scope type arrives

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if path.startswith("/-/") or path == "/metrics":
            await self._endpoints(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = scopes.request_id(scope)
        # Nothing reaches the client before the request is counted and logged (a client
        # that reads /metrics or the log right after its answer finds it there): writes
        # are held once the body is read (uvicorn's "100 Continue" must go out before),
        # and a streamed response lets go at its first message.
        writes: HeldWrites | Unheld = scope.get(SCOPE_KEY) or UNHELD
        try:
            route = match_route(self._routes(), path)
            if route is None:
                writes.hold()
                await _plain(send, 404, f"Not Found: no application serves {path!r}.\n", request_id)
                seconds = time.perf_counter() - started
                log_access(scope["method"], path, 404, seconds, request_id, None)
                return
            prefix, app, ingress = route
            recorded = False

            def record(status: int, error: str | None) -> None:
                """Count and log the request once, as soon as its response is complete."""
                nonlocal recorded
                if recorded:
                    return
                recorded = True
                seconds = time.perf_counter() - started
                self.metrics.observe(app, ingress, scope["method"], status, seconds, error)
                if self._options.access_log:
                    log_access(scope["method"], path, status, seconds, request_id, app)

            forward = (scope, receive, send, request_id, prefix, app, ingress, record, writes)
            spans = tracing.SPANS
            if spans is None:
                status, error = await self._forward(*forward)
            else:
                with spans.http(scope, request_id, app, ingress, prefix) as span:
                    status, error = await self._forward(*forward, span.traceparent)
                    span.outcome(status, error, status >= 500 or error == "timeout")
            record(status, error)
        finally:
            writes.release()

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: str,
        prefix: str,
        app: str,
        ingress: str,
        on_complete: Callable[[int, str | None], None],
        writes: HeldWrites | Unheld,
        trace: str = "",
    ) -> tuple[int, str | None]:
        """Send one request to the ingress; return (status, error kind or None).

        ``on_complete`` is called once the last message of a response is sent,
        which may come a moment before the replica's stream ends. ``trace``: the
        proxy's span, while tracing is on (``RequestMetadata.trace``).
        """
        self.metrics.started(app)  # in flight from here: every way out is counted
        try:
            body = await _read_body(scope, receive, self._options.max_body_bytes)
        except _BodyTooLarge:
            writes.hold()
            limit = self._options.max_body_bytes
            text = f"Payload Too Large: the body may have at most {limit} bytes"
            await _plain(send, 413, f"{text} (request id {request_id}).\n", request_id, close=True)
            return 413, "body_too_large"
        if body is None:
            return 499, "disconnected"
        writes.hold()
        timeout_s = self._options.request_timeout_s
        try:
            budget_s, priority = scopes.client_hints(scope)
        except ValueError as exc:
            await _plain(send, 400, f"Bad Request: {exc} (request id {request_id}).\n", request_id)
            return 400, None
        if budget_s is not None and (not timeout_s or budget_s < timeout_s):
            timeout_s = budget_s  # the client's deadline comes first
        deadline = time.time() + timeout_s if timeout_s else None  # every hop inherits it
        meta = RequestMetadata(
            request_id,
            app,
            ingress,
            HTTP_METHOD,
            True,
            model_id(scope),
            prefix,
            deadline,
            priority,
            trace=trace,
        )
        data = HTTPRequestData.from_scope(scope, body, prefix)
        exchange = _Exchange(receive, timeout_s)
        self._exchanges.add(exchange)
        try:
            answered = await self._runtime.http_request(
                DeploymentID(app_name=app, name=ingress), meta, (data,)
            )
            await _relay(answered, send, exchange, request_id, on_complete, writes)
            return exchange.status, _error_kind(exchange.status)
        except asyncio.CancelledError:
            if exchange.stopped is None:
                raise  # the server itself is shutting down
            return await self._stopped(send, exchange, request_id)
        except Exception as exc:
            if isinstance(exc, DeadlineExceededError) and passed(deadline):
                exchange.stopped = "timeout"  # the runtime kept it, before the watcher did
                return await self._stopped(send, exchange, request_id)
            shed = self._backpressure(app, ingress) if isinstance(exc, BackPressureError) else None
            return await _failed(send, exc, exchange, request_id, app, shed)
        finally:
            self._exchanges.discard(exchange)
            exchange.finish()

    async def _stopped(self, send: Send, exchange: _Exchange, request_id: str) -> tuple[int, str]:
        """The proxy cancelled the request: 408 past its timeout, 499 if the client left."""
        if exchange.stopped != "timeout":
            return 499, "disconnected"
        if not exchange.response_started:
            timeout_s = exchange.timeout_s
            text = f"Request timed out after {timeout_s:g} s (request id {request_id}).\n"
            await _plain(send, 408, text, request_id)
        return 408, "timeout"

    async def watch(self) -> None:
        """Watch requests in flight: time them out, and notice clients that leave.

        One task for all requests, so a request that ends quickly (most do) pays
        for neither a timer nor a watcher task of its own.
        """
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            for exchange in list(self._exchanges):
                exchange.check(now)


class _Exchange:
    """One request in flight, as the proxy's watcher sees it."""

    __slots__ = (
        "_deadline",
        "_receive",
        "_since",
        "_task",
        "_watcher",
        "complete",
        "response_started",
        "status",
        "stopped",
        "timeout_s",
    )

    def __init__(self, receive: Receive, timeout_s: float | None) -> None:
        self._receive = receive
        self._task = asyncio.current_task()
        self._since = time.monotonic()
        self.timeout_s = timeout_s
        self._deadline = self._since + timeout_s if timeout_s else None
        self._watcher: asyncio.Future[None] | None = None
        self.status = 500  # until the response starts
        self.response_started = False
        self.complete = False  # the last body message is on its way: leaving is normal now
        self.stopped: str | None = None  # why the proxy cancelled it, if it did

    def check(self, now: float) -> None:
        if self.complete or self.stopped:
            return
        if self._deadline is not None and now >= self._deadline:
            self.stop("timeout")
        elif self._watcher is None and now - self._since >= DISCONNECT_WATCH_DELAY_S:
            self._watcher = asyncio.ensure_future(_watch_disconnect(self._receive, self.stop))

    def stop(self, reason: str) -> None:
        if not self.stopped and not self.complete and self._task is not None:
            self.stopped = reason
            self._task.cancel()

    def finish(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.stopped and self._task is not None:
            # Swallow the cancellation we caused, so the server's task ends cleanly.
            uncancel(self._task)


def _error_kind(status: int) -> str | None:
    return "server_error" if status >= 500 else None


async def _relay(
    answered: Last | Opened,
    send: Send,
    exchange: _Exchange,
    request_id: str,
    on_complete: Callable[[int, str | None], None],
    writes: HeldWrites | Unheld,
) -> None:
    """Pass the ingress's ASGI messages to the client, adding the request id header.

    ``writes`` are held (see ``Proxy._http``): a whole response (``Last``) reaches
    the socket in one write once it is recorded; a streamed one goes out message
    by message, as it comes.
    """
    if isinstance(answered, Last):
        for message in answered.value:
            await _pass(message, send, exchange, request_id, on_complete)
        writes.release()  # recorded by now (on_complete): out it goes
        return
    writes.release()
    try:
        await _pass(answered.first, send, exchange, request_id, on_complete)
        async for message in answered.rest:
            await _pass(message, send, exchange, request_id, on_complete)
    finally:
        await answered.rest.aclose()


async def _pass(
    message: dict[str, Any],
    send: Send,
    exchange: _Exchange,
    request_id: str,
    on_complete: Callable[[int, str | None], None],
) -> None:
    if message["type"] == "http.response.start":
        exchange.status = message["status"]
        headers = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
        message = {**message, "headers": headers}
        exchange.response_started = True
    elif not message.get("more_body", False):
        exchange.complete = True
    await send(message)
    if exchange.complete:
        on_complete(exchange.status, _error_kind(exchange.status))


_SHEDDING = SheddingLog("requests")


async def _failed(
    send: Send,
    exc: Exception,
    exchange: _Exchange,
    request_id: str,
    app: str,
    shed: BackpressureConfig | None = None,
) -> tuple[int, str]:
    """Log a failed request and answer it (unless its response already started).

    ``shed``: the backpressure_config that answers a request shed for backpressure.
    """
    status, kind = classify(exc)
    headers: list[tuple[bytes, bytes]] = []
    if kind == "backpressure" and shed is not None:
        status = shed.status_code
        if shed.retry_after_s is not None:
            # Whole seconds (RFC 9110), rounded up: never sooner than configured.
            headers.append((b"retry-after", str(math.ceil(shed.retry_after_s)).encode()))
    if status == 500:
        logger.error(
            "Request %s to application %r failed",
            request_id,
            app,
            exc_info=exc,
            extra={"request_id": request_id},
        )
        text = f"Internal Server Error (request id {request_id}).\n"
    else:
        if kind != "backpressure" or _SHEDDING.note(app):
            logger.warning("Request %s to application %r: %s", request_id, app, exc)
        text = f"{HTTPStatus(status).phrase}: {PUBLIC_TEXT[kind]} (request id {request_id}).\n"
    if not exchange.response_started:  # else too late to change the status: the stream just ends
        await _plain(send, status, text, request_id, headers=headers)
    return status, kind


async def _watch_disconnect(receive: Receive, cancel: Callable[[str], None]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel("disconnect")
            return


async def _read_body(scope: Scope, receive: Receive, limit: int | None) -> bytes | None:
    """The whole body (None if the client left); raises _BodyTooLarge past ``limit``.

    A declared Content-Length over the limit is refused before a byte of the
    body is read; a chunked body is refused as soon as it passes the limit.
    """
    if limit is not None:
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _BodyTooLarge
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if limit is not None:
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks) if len(chunks) != 1 else chunks[0]


async def _plain(
    send: Send,
    status: int,
    text: str,
    request_id: str,
    close: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        *(headers or ()),
    ]
    if close:  # e.g. a body left unread: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
