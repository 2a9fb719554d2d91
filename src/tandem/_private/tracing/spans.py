"""The spans tandem makes while tracing is on, and the context that links them.

- the proxies: a server span per HTTP request (``METHOD /route``) and per gRPC
  call (its method's path), whose parent is the client's ``traceparent``;
- each handle call: a client span in the caller, for as long as the call (or
  the whole stream) lasts;
- each request a replica serves: a server span around it (the whole stream,
  for a stream), current while the user's code runs, so that spans it starts
  are its children.

A call carries its parent across processes and Ray actors as a W3C
``traceparent`` string on its ``RequestMetadata.trace`` (then a newline and the
``tracestate``, if there is one).
"""

from __future__ import annotations

import asyncio
import contextvars
import types
import weakref
from collections.abc import AsyncGenerator, Coroutine, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tandem._private.calls.context import HTTP_METHOD, ReplicaContext, RequestMetadata

_W3C = TraceContextTextMapPropagator()
_CANCELLED = (asyncio.CancelledError, GeneratorExit)


def traceparent(span: Span) -> str:
    """``span`` as ``RequestMetadata.trace`` carries it ("" if it is no real span)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return ""
    value = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    state = ctx.trace_state.to_header() if ctx.trace_state else ""
    return f"{value}\n{state}" if state else value


def context_of(trace_value: str) -> Context:
    """The parent that ``RequestMetadata.trace`` names (an empty context if none)."""
    parent, _, state = trace_value.partition("\n")
    if len(parent) != 55 or not parent.startswith("00-"):  # not as traceparent() writes it
        carrier = {"traceparent": parent, "tracestate": state} if state else {"traceparent": parent}
        return _W3C.extract(carrier, context=Context())
    try:  # half what the propagator's general parse costs, on every request
        context = SpanContext(
            int(parent[3:35], 16),
            int(parent[36:52], 16),
            is_remote=True,
            trace_flags=TraceFlags(int(parent[53:55], 16)),
            trace_state=TraceState.from_header([state]) if state else None,
        )
    except ValueError:
        return Context()
    return trace.set_span_in_context(NonRecordingSpan(context), Context())


def failed(span: Span, error: BaseException) -> None:
    """Record how a call ended early: cancelled (an attribute), or an error."""
    if isinstance(error, _CANCELLED):
        span.set_attribute("tandem.cancelled", True)
        return
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


class Spans:
    """Makes tandem's spans with the tracer of ``provider`` (see the module docstring)."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self._tracer: trace.Tracer = provider.get_tracer("tandem")

    def current(self) -> Context:
        return otel_context.get_current()

    def flush(self, timeout_s: float) -> None:
        force_flush = getattr(self.provider, "force_flush", None)
        if force_flush is not None:
            force_flush(int(timeout_s * 1000))

    # -- handle calls, in the caller -------------------------------------------

    def client_call(
        self, call: Coroutine[Any, Any, Any], meta: RequestMetadata
    ) -> Coroutine[Any, Any, Any]:
        """``call`` inside a client span, child of the span current here and now."""
        traced = self._client_call(call, meta, otel_context.get_current())
        # A call cancelled before it started is closed unstarted: ``call`` with it,
        # or Python would warn that ``call`` was never awaited.
        weakref.finalize(traced, call.close)
        return traced

    async def _client_call(
        self, call: Coroutine[Any, Any, Any], meta: RequestMetadata, parent: Context
    ) -> Any:
        span = self._client_span(meta, parent)
        try:
            return await call
        except BaseException as exc:
            failed(span, exc)
            raise
        finally:
            span.end()

    def client_stream(
        self, source: AsyncGenerator[Any, None], meta: RequestMetadata
    ) -> AsyncGenerator[Any, None]:
        """``source`` inside a client span that lasts until the stream ends."""
        parent = otel_context.get_current()
        # A stream handed off to another replica before it began is made there, not
        # here: its server span is then a child of the span current here.
        meta.trace = traceparent(trace.get_current_span(parent))
        return self._client_stream(source, meta, parent)

    async def _client_stream(
        self, source: AsyncGenerator[Any, None], meta: RequestMetadata, parent: Context
    ) -> AsyncGenerator[Any, None]:
        span = self._client_span(meta, parent)
        try:
            async for item in source:
                yield item
        except BaseException as exc:
            failed(span, exc)
            raise
        finally:
            try:
                await source.aclose()
            finally:
                span.end()

    def _client_span(self, meta: RequestMetadata, parent: Context) -> Span:
        span = self._tracer.start_span(
            f"{meta.deployment}.{meta.method_name}",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes={
                "tandem.application": meta.app_name,
                "tandem.deployment": meta.deployment,
                "tandem.method": meta.method_name,
                "tandem.request_id": meta.request_id,
            },
        )
        if meta.stream:
            span.set_attribute("tandem.stream", True)
        meta.trace = traceparent(span)  # the call goes out after this
        return span

    # -- requests, in the replica ------------------------------------------------

    def serve(self, meta: RequestMetadata, replica: ReplicaContext) -> ServerSpan:
        """A server span for a request ``replica`` serves, current from now until it ends."""
        http = meta.method_name == HTTP_METHOD
        method = "__call__" if http else meta.method_name
        span = self._tracer.start_span(
            f"{replica.deployment}.{method}",
            context=context_of(meta.trace) if meta.trace else Context(),
            kind=SpanKind.SERVER,
            attributes={
                "tandem.application": replica.app_name,
                "tandem.deployment": replica.deployment,
                "tandem.replica_id": replica.replica_id,
                "tandem.method": method,
                "tandem.request_id": meta.request_id,
            },
        )
        return ServerSpan(span, otel_context.attach(trace.set_span_in_context(span)))

    # -- the proxies --------------------------------------------------------------

    def http(
        self, scope: Mapping[str, Any], request_id: str, app: str, ingress: str, route: str
    ) -> ProxySpan:
        """A server span for an HTTP request (or WebSocket session) to ``app`` (served
        under the prefix ``route``), child of its ``traceparent`` header."""
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope.get("method", "GET")  # a WebSocket session's handshake is a GET
        span = self._tracer.start_span(
            f"{method} {route}",
            context=propagate.extract(carrier, context=Context()),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": scope["path"],
                "http.route": route,
                "tandem.application": app,
                "tandem.deployment": ingress,
                "tandem.request_id": request_id,
            },
        )
        return ProxySpan(span, "http.response.status_code")

    def grpc(self, metadata: Mapping[str, Any], path: str, meta: RequestMetadata) -> ProxySpan:
        """A server span for a gRPC call, child of its ``traceparent`` metadata."""
        carrier = {k: v for k, v in metadata.items() if isinstance(v, str)}
        span = self._tracer.start_span(
            path.lstrip("/"),
            context=propagate.extract(carrier, context=Context()),
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.method": path,
                "tandem.application": meta.app_name,
                "tandem.deployment": meta.deployment,
                "tandem.request_id": meta.request_id,
            },
        )
        meta.trace = traceparent(span)
        return ProxySpan(span, "rpc.grpc.status_code")


class ServerSpan:
    """A replica's span of one request, current in its context until :meth:`end`."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span, token: object) -> None:
        self.span = span
        self.token = token

    def end(self, error: BaseException | None, http_status: int | None) -> None:
        """End the span: how the request ended (its error, the HTTP status it answered)."""
        span = self.span
        if error is not None:
            failed(span, error)
        if http_status is not None:
            span.set_attribute("http.response.status_code", http_status)
            if http_status >= 500 and error is None:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {http_status}"))
        span.end()
        token = self.token
        if isinstance(token, contextvars.Token):
            try:
                token.var.reset(token)
            except ValueError:
                # A stream its reader dropped ends in the loop's finalizer, in another
                # context: nothing of ours to undo there.
                pass
        else:  # a context of OpenTelemetry's other than its contextvars one
            otel_context.detach(token)  # type: ignore[arg-type]


class ProxySpan:
    """A proxy's span of one request: ``traceparent`` goes on the call it makes; the
    request's outcome is set when it ends."""

    __slots__ = ("_status_key", "span", "traceparent")

    def __init__(self, span: Span, status_key: str) -> None:
        self.span = span
        self.traceparent = traceparent(span)
        self._status_key = status_key

    def __enter__(self) -> ProxySpan:
        return self

    def outcome(self, status: int | str, error: str | None, failure: bool) -> None:
        """The status the client got, the kind of error if it was one (as the proxy's
        metrics name it), and whether the server failed (the span's error status)."""
        self.span.set_attribute(self._status_key, status)
        if error is not None:
            self.span.set_attribute("error.type", error)
        if failure:
            self.span.set_status(Status(StatusCode.ERROR, f"{error or 'error'} ({status})"))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        if error is not None:
            failed(self.span, error)
        self.span.end()
