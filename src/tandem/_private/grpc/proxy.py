"""The gRPC proxy: each RPC of a user's service becomes a call of the ingress method
of the same name, with the request message as its argument.

A unary method's return value is the reply; a server-streaming method yields its
replies; a method whose RPC streams requests (client or bidirectional streaming)
gets an async iterator of the client's messages, read as they arrive. A method
with a ``grpc_context`` parameter gets the RPC's context (Ray Serve's
``RayServegRPCContext``): what it sets there (status code, details, trailing
metadata) is what the client gets. The ``application`` metadata key picks the
application when several serve (one serves every RPC; an unknown one gets
NOT_FOUND); ``request_id`` is kept if sane (else tandem makes one) and sent back
in the trailing metadata; ``multiplexed_model_id`` reaches
``get_multiplexed_model_id()``.

Failures become gRPC statuses, never a hang: an exception in the deployment is
INTERNAL with the exception's message (its traceback goes to the log only), or
the status code the method set on its context before raising; BackPressureError
is RESOURCE_EXHAUSTED, a deployment or replica that went away UNAVAILABLE, and
an RPC past ``request_timeout_s`` or the client's deadline DEADLINE_EXCEEDED. A
client that cancels, or a timeout, cancels the request in every deployment it
reached (the task awaiting the call is cancelled, and the runtime carries that on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from tandem._private import tracing
from tandem._private.calls import priority
from tandem._private.calls.context import DeploymentID, RequestMetadata
from tandem._private.calls.deadlines import passed
from tandem._private.calls.inbound import Inbound
from tandem._private.calls.runtime import Runtime
from tandem._private.grpc.access_log import log_rpc
from tandem._private.grpc.api_service import HealthzResponse, ListApplicationsResponse
from tandem._private.grpc.metrics import GRPCMetrics
from tandem._private.grpc.options import gRPCOptions
from tandem._private.grpc.services import Method
from tandem._private.http.failures import SheddingLog
from tandem._private.http.scope import REQUEST_ID_TEXT, RouteTable
from tandem._private.queues import uncancel
from tandem._private.replica.grpc_calls import CONTEXT_KEY, WithContext
from tandem.exceptions import (
    BackPressureError,
    DeadlineExceededError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
    gRPCStatusError,
)
from tandem.grpc_util import RayServegRPCContext

logger = logging.getLogger("tandem.proxy")

Context = grpc.aio.ServicerContext[Any, Any]
# Status details are sent in HTTP/2 trailers, whose size is limited: long messages are cut.
MAX_DETAILS = 4096

_OK = grpc.StatusCode.OK
# What clients see for each failure tandem knows (the details go to the log).
_FAILURES: dict[type[Exception], tuple[grpc.StatusCode, str, str]] = {
    DeadlineExceededError: (  # one a deployment set for a call of its own
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "timeout",
        "the deadline of a call the application made passed",
    ),
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

# The metadata key a client sets a call's priority with (see calls.priority).
_PRIORITY = "x-request-priority"


class _Outcome:
    """How one RPC ended: its status, error kind (for metrics) and details."""

    __slots__ = ("code", "context", "details", "error", "timed_out")

    def __init__(self) -> None:
        self.code = _OK
        self.error: str | None = None
        self.details = ""
        self.timed_out = False  # the proxy's own timer cancelled it
        self.context: RayServegRPCContext | None = None  # as the method left it

    def fail(self, code: grpc.StatusCode, error: str, details: str) -> None:
        self.code, self.error, self.details = code, error, details

    def took(self, reply: Any, context: Context) -> Any:
        """Apply what the method set on its context to the RPC; return the bare reply."""
        if not isinstance(reply, WithContext):
            return reply
        self.context = reply.context
        reply.context._set_on_grpc_context(context)
        code = reply.context.code()
        if code and code != _OK:  # the client gets that status (and no reply)
            self.fail(code, "status", reply.context.details() or "")
        return reply.reply


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
        self._shedding = SheddingLog("gRPC requests")

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
        """The coroutine that serves RPCs of ``method`` (a unary reply: returns its bytes;
        streaming replies: writes each; streaming requests: reads them as they come)."""

        async def serve(request: Any, context: Context) -> Any:
            return await self._serve(request, context, method)

        return serve

    async def _serve(self, request: Any, context: Context, method: Method) -> bytes | None:
        started = time.perf_counter()
        metadata = dict(context.invocation_metadata() or ())
        request_id = _request_id(metadata.get("request_id"))
        trailing: tuple[tuple[str, Any], ...] = (("request_id", request_id),)
        route = self._route(metadata.get("application"))
        if isinstance(route, str):
            log_rpc(method.path, "NOT_FOUND", time.perf_counter() - started, request_id, None)
            await context.abort(grpc.StatusCode.NOT_FOUND, route, trailing_metadata=trailing)
        prefix, app, ingress = route
        model_id = str(metadata.get("multiplexed_model_id", ""))
        sent_priority = metadata.get(_PRIORITY)
        try:
            rank = 0 if sent_priority is None else priority.parsed(str(sent_priority), _PRIORITY)
        except ValueError as exc:
            log_rpc(method.path, "INVALID_ARGUMENT", time.perf_counter() - started, request_id, app)
            code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(exc), trailing_metadata=trailing)
        meta = RequestMetadata(
            request_id,
            app,
            ingress,
            method.name,
            method.server_streaming,
            model_id,
            prefix,
            priority=rank,
        )
        deployment = DeploymentID(name=ingress, app_name=app)
        outcome = _Outcome()
        reply: bytes | None = None
        self.metrics.started(app)
        try:
            spans = tracing.SPANS
            if spans is None:
                reply = await self._call(deployment, meta, request, context, method, outcome)
            else:
                with spans.grpc(metadata, method.path, meta) as span:
                    reply = await self._call(deployment, meta, request, context, method, outcome)
                    failure = outcome.error not in (None, "cancelled")
                    span.outcome(outcome.code.value[0], outcome.error, failure)
        finally:
            seconds = time.perf_counter() - started
            self.metrics.observe(
                app, ingress, method.path, outcome.code.name, seconds, outcome.error
            )
            log_rpc(method.path, outcome.code.name, seconds, request_id, app)
        if outcome.context is not None:  # the method's own, with the request id
            trailing = tuple(outcome.context.trailing_metadata())
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
            meta.deadline = time.time() + timeout  # every hop inherits it
            task = asyncio.current_task()
            assert task is not None
            timer = asyncio.get_running_loop().call_later(max(timeout, 0.0), _expire, task, outcome)
        argument = Inbound(request) if method.client_streaming else request
        kwargs = {CONTEXT_KEY: _context_for(context, meta.request_id)}
        try:
            if method.server_streaming:
                await self._relay(deployment, meta, argument, kwargs, context, method, outcome)
                return None
            reply = await self._runtime.call(deployment, meta, (argument,), kwargs)
            return _serialize(outcome.took(reply, context), method)
        except (asyncio.CancelledError, DeadlineExceededError) as exc:
            if isinstance(exc, DeadlineExceededError) and not passed(meta.deadline):
                self._failed(exc, meta, outcome)  # a shorter deadline set inside the app
                return None
            if outcome.timed_out or isinstance(exc, DeadlineExceededError):
                # The proxy's timer or the runtime's (calls.deadlines), whichever was first.
                uncancel(asyncio.current_task())
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
        argument: Any,
        kwargs: dict[str, Any],
        context: Context,
        method: Method,
        outcome: _Outcome,
    ) -> None:
        """Write each reply the ingress yields, as it yields it (the last item it sends
        is the RPC's context as the method left it)."""
        stream = self._runtime.stream(deployment, meta, (argument,), kwargs)
        try:
            async for item in stream:
                if isinstance(item, WithContext):
                    outcome.took(item, context)
                else:
                    await context.write(_serialize(item, method))
        finally:
            await stream.aclose()

    def _failed(self, exc: Exception, meta: RequestMetadata, outcome: _Outcome) -> None:
        """Fill ``outcome`` for ``exc``, and log it (the traceback, for errors in user code)."""
        if isinstance(exc, gRPCStatusError):  # the method set a status, then raised
            logger.warning(
                "gRPC request %s to application %r failed with the status %s its method set: %s",
                meta.request_id,
                meta.app_name,
                getattr(exc.grpc_code, "name", exc.grpc_code),
                exc.original_exception,
            )
            error = "server_error" if exc.grpc_code == grpc.StatusCode.INTERNAL else "status"
            details = exc.grpc_details or _details(exc.original_exception)
            outcome.fail(exc.grpc_code, error, details)
            return
        for kind, (code, error, text) in _FAILURES.items():
            if isinstance(exc, kind):
                outcome.fail(code, error, f"{text} (request id {meta.request_id})")
                if error != "backpressure" or self._shedding.note(meta.app_name):
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
        shown = str(app_name) if REQUEST_ID_TEXT.fullmatch(str(app_name)) else "(not printable)"
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
    if isinstance(given, str) and REQUEST_ID_TEXT.fullmatch(given):
        return given
    return RequestMetadata.new_request_id()


def _context_for(context: Context, request_id: str) -> RayServegRPCContext:
    """The RPC's context as its method gets it, with the request id it will send back."""
    ours = RayServegRPCContext(context)
    ours.set_trailing_metadata([("request_id", request_id)])
    return ours
