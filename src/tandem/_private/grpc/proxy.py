"""The gRPC proxy: each RPC of a user's service becomes a call of the ingress method
of the same name, with the request message as its argument.

A unary method's return value is the reply; a server-streaming method yields its
replies; a bidirectional-streaming method gets an async iterator of the client's
messages and yields its replies. The ``application`` metadata key picks the application when several
serve (one serves every RPC; an unknown one gets NOT_FOUND); ``request_id`` is
kept if sane (else tandem makes one) and sent back in the trailing metadata;
``multiplexed_model_id`` reaches ``get_multiplexed_model_id()``.

Failures become gRPC statuses, never a hang: an exception in the deployment is
INTERNAL with the exception's message (its traceback goes to the log only),
BackPressureError is RESOURCE_EXHAUSTED, a deployment or replica that went away
UNAVAILABLE, and an RPC past ``request_timeout_s`` or the client's deadline
DEADLINE_EXCEEDED. A client that cancels, or a timeout, cancels the request in
every deployment it reached (the task awaiting the call is cancelled, and the
runtime carries that on).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from tandem._private.calls.context import DeploymentID, RequestMetadata
from tandem._private.calls.inbound import Inbound
from tandem._private.calls.runtime import Runtime
from tandem._private.grpc.access_log import log_rpc
from tandem._private.grpc.api_service import HealthzResponse, ListApplicationsResponse
from tandem._private.grpc.metrics import GRPCMetrics
from tandem._private.grpc.options import gRPCOptions
from tandem._private.grpc.services import Method
from tandem.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

logger = logging.getLogger("tandem.proxy")

RouteTable = Callable[[], tuple[tuple[str, str, str], ...]]
Context = grpc.aio.ServicerContext[Any, Any]

# The same rule as HTTP's X-Request-Id: a client's request_id outside it is replaced.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Status details are sent in HTTP/2 trailers, whose size is limited: long messages are cut.
MAX_DETAILS = 4096
SHED_LOG_PERIOD_S = 10.0

_OK = grpc.StatusCode.OK
# What clients see for each failure tandem knows (the details go to the log).
_FAILURES: dict[type[Exception], tuple[grpc.StatusCode, str, str]] = {
    BackPressureError: (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "backpressure",
        "too many requests are waiting; retry later",
    ),
    DeploymentUnavailableError: (
        grpc.StatusCode.UNAVAILABLE,
        "unavailable",
        "the application cannot take requests now",
    ),
    ReplicaUnavailableError: (
        grpc.StatusCode.UNAVAILABLE,
        "unavailable",
        "the replica serving this request went away",
    ),
    RequestCancelledError: (grpc.StatusCode.CANCELLED, "cancelled", "the request was cancelled"),
}


class _Outcome:
    """How one RPC ended: its status, error kind (for metrics) and details."""

    __slots__ = ("code", "details", "error", "timed_out")

    def __init__(self) -> None:
        self.code = _OK
        self.error: str | None = None
        self.details = ""
        self.timed_out = False  # the proxy's own timer cancelled it

    def fail(self, code: grpc.StatusCode, error: str, details: str) -> None:
        self.code, self.error, self.details = code, error, details


class GRPCProxy:
    """See the module docstring. ``routes()`` is the controller's route table."""

    def __init__(
        self, runtime: Runtime, routes: RouteTable, options: gRPCOptions, metrics: GRPCMetrics
    ) -> None:
        self._runtime = runtime
        self._routes = routes
        self._options = options
        self.metrics = metrics
        self.draining = False
        self._shed_logged: dict[str, tuple[float, int]] = {}

    # -- Ray Serve's own service -------------------------------------------------

    async def list_applications(self, request: Any, context: Context) -> Any:
        """The applications an RPC can name (those serving under a route prefix)."""
        if self.draining:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("This proxy is draining.")
        names = list(dict.fromkeys(app for _, app, _ in self._routes()))
        return ListApplicationsResponse(application_names=names)

    async def healthz(self, request: Any, context: Context) -> Any:
        if self.draining:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("This proxy is draining.")
            return HealthzResponse(message="This proxy is draining.")
        return HealthzResponse(message="success")

    # -- users' services ---------------------------------------------------------

    def handler(self, method: Method) -> Callable[[Any, Context], Awaitable[Any]]:
        """The coroutine that serves RPCs of ``method`` (unary: returns the reply's bytes;
        streaming replies: writes each; streaming requests: reads them as they come)."""
        if method.client_streaming and not method.server_streaming:

            async def refuse(requests: Any, context: Context) -> None:
                await context.abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{method.path} streams requests to a single reply; tandem serves unary, "
                    "server-streaming and bidirectional-streaming methods.",
                )

            return refuse

        async def serve(request: Any, context: Context) -> Any:
            return await self._serve(request, context, method)

        return serve

    async def _serve(self, request: Any, context: Context, method: Method) -> bytes | None:
        started = time.perf_counter()
        metadata = dict(context.invocation_metadata() or ())
        request_id = _request_id(metadata.get("request_id"))
        trailing = (("request_id", request_id),)
        route = self._route(metadata.get("application"))
        if isinstance(route, str):
            log_rpc(method.path, "NOT_FOUND", time.perf_counter() - started, request_id, None)
            await context.abort(grpc.StatusCode.NOT_FOUND, route, trailing_metadata=trailing)
        prefix, app, ingress = route
        model_id = str(metadata.get("multiplexed_model_id", ""))
        meta = RequestMetadata(
            request_id, app, ingress, method.name, method.server_streaming, model_id, prefix
        )
        deployment = DeploymentID(name=ingress, app_name=app)
        outcome = _Outcome()
        reply: bytes | None = None
        self.metrics.started(app)
        try:
            reply = await self._call(deployment, meta, request, context, method, outcome)
        finally:
            seconds = time.perf_counter() - started
            self.metrics.observe(
                app, ingress, method.path, outcome.code.name, seconds, outcome.error
            )
            log_rpc(method.path, outcome.code.name, seconds, request_id, app)
        if outcome.code is not _OK:
            await context.abort(outcome.code, outcome.details, trailing_metadata=trailing)
        context.set_trailing_metadata(trailing)
        return reply

    async def _call(
        self,
        deployment: DeploymentID,
        meta: RequestMetadata,
        request: Any,
        context: Context,
        method: Method,
        outcome: _Outcome,
    ) -> bytes | None:
        """Make the call under the RPC's deadline; fill ``outcome`` with how it ended."""
        timeout = self._options.request_timeout_s
        remaining = context.time_remaining()
        client_deadline = None if remaining is None else time.monotonic() + remaining
        if remaining is not None and (timeout is None or remaining < timeout):
            timeout = remaining
        timer = None
        if timeout is not None:
            task = asyncio.current_task()
            assert task is not None
            timer = asyncio.get_running_loop().call_later(max(timeout, 0.0), _expire, task, outcome)
        try:
            if method.server_streaming:
                await self._relay(deployment, meta, request, context, method)
                return None
            reply = await self._runtime.call(deployment, meta, (request,), {})
            return _serialize(reply, method)
        except asyncio.CancelledError:
            if outcome.timed_out:
                _uncancel(asyncio.current_task())
                outcome.fail(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "timeout",
                    f"Request timed out after {timeout:g} s (request id {meta.request_id}).",
                )
                return None
            # The client cancelled, its deadline passed, or the server is stopping.
            late = client_deadline is not None and time.monotonic() >= client_deadline - 1e-3
            code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
            outcome.fail(code, "timeout" if late else "cancelled", "")
            raise
        except Exception as exc:
            self._failed(exc, meta, outcome)
            return None
        finally:
            if timer is not None:
                timer.cancel()

    async def _relay(
        self,
        deployment: DeploymentID,
        meta: RequestMetadata,
        request: Any,
        context: Context,
        method: Method,
    ) -> None:
        """Write each reply the ingress yields, as it yields it. The client's messages of
        a bidirectional RPC reach the method as an async iterator, read as it reads them."""
        argument = Inbound(request) if method.client_streaming else request
        stream = self._runtime.stream(deployment, meta, (argument,), {})
        try:
            async for item in stream:
                await context.write(_serialize(item, method))
        finally:
            await stream.aclose()

    def _failed(self, exc: Exception, meta: RequestMetadata, outcome: _Outcome) -> None:
        """Fill ``outcome`` for ``exc``, and log it (the traceback, for errors in user code)."""
        for kind, (code, error, text) in _FAILURES.items():
            if isinstance(exc, kind):
                outcome.fail(code, error, f"{text} (request id {meta.request_id})")
                if error != "backpressure" or self._note_shed(meta.app_name):
                    logger.warning(
                        "gRPC request %s to application %r: %s", meta.request_id, meta.app_name, exc
                    )
                return
        logger.error(
            "gRPC request %s to application %r failed",
            meta.request_id,
            meta.app_name,
            exc_info=exc,
            extra={"request_id": meta.request_id},
        )
        outcome.fail(grpc.StatusCode.INTERNAL, "server_error", _details(exc))

    def _note_shed(self, app: str) -> bool:
        """Shed requests come in floods: log one per application per SHED_LOG_PERIOD_S
        (each is still in the access log and the metrics)."""
        now = time.monotonic()
        last, skipped = self._shed_logged.get(app, (float("-inf"), 0))
        if now - last < SHED_LOG_PERIOD_S:
            self._shed_logged[app] = (last, skipped + 1)
            return False
        if skipped:
            logger.warning("Application %r shed %d more gRPC requests meanwhile.", app, skipped)
        self._shed_logged[app] = (now, 0)
        return True

    def _route(self, app_name: Any) -> tuple[str, str, str] | str:
        """The (prefix, application, ingress) an RPC goes to, else why none (NOT_FOUND)."""
        routes = self._routes()
        if len(routes) == 1:  # as in Ray Serve: the only application serves every RPC
            return routes[0]
        if app_name:
            for route in routes:
                if route[1] == app_name:
                    return route
        where = "Ping /ray.serve.RayServeAPIService/ListApplications for the applications."
        if not app_name:
            return f"Application metadata not set. {where}"
        shown = str(app_name) if REQUEST_ID.fullmatch(str(app_name)) else "(not printable)"
        return f"Application {shown!r} not found. {where}"


def _expire(task: asyncio.Task[Any], outcome: _Outcome) -> None:
    outcome.timed_out = True
    task.cancel()


def _serialize(reply: Any, method: Method) -> bytes:
    """A reply's bytes; TypeError (INTERNAL) if the method returned no protobuf message."""
    if isinstance(reply, bytes):
        return reply
    serialize = getattr(reply, "SerializeToString", None)
    if serialize is None:
        raise TypeError(
            f"Method {method.name!r} returned a {type(reply).__name__}, not a protobuf "
            f"message; it must {'yield' if method.server_streaming else 'return'} the "
            "reply messages its proto declares."
        )
    return bytes(serialize())


def _details(exc: BaseException) -> str:
    """The exception's message, as the client sees it (no traceback, cut if long)."""
    text = str(exc) or type(exc).__name__
    if len(text) > MAX_DETAILS:
        text = text[: MAX_DETAILS - 15] + "... [truncated]"
    return text


def _request_id(given: Any) -> str:
    """The client's request_id if it is sane, else a new one (never raw text in logs)."""
    if isinstance(given, str) and REQUEST_ID.fullmatch(given):
        return given
    return RequestMetadata.new_request_id()


def _uncancel(task: asyncio.Task[Any] | None) -> None:
    """Take back the cancellation the proxy's timer made, so the RPC can still answer."""
    uncancel = getattr(task, "uncancel", None)  # Python 3.11+; 3.10 needs nothing
    if uncancel is not None:
        uncancel()
