"""Around every request a replica serves, once it holds its slot: the context user
code reads, and what is counted and logged when the request ends."""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any

from tandem._private import tracing
from tandem._private.calls.context import (
    ReplicaContext,
    RequestMetadata,
    _replica_context,
    _request,
)
from tandem._private.calls.deadlines import passed
from tandem._private.calls.flow import Last
from tandem._private.replica.admission import Slot
from tandem._private.replica.log_buffer import request_failed
from tandem._private.replica.logs import ReplicaLogs
from tandem._private.stats import FailedRequest, RequestStats

# How much of a failed request's error the replica keeps for status and the dashboard.
_ERROR_TEXT = 300


class Serving:
    """Around every request, once it holds its slot: set the context variables user
    code reads; at the end, count the request in the stats, write its access line
    (logging_config) and give the slot back (unless a thread still holds it).

    A plain (not async) context manager: it costs every request next to nothing.
    """

    __slots__ = (
        "_logs",
        "_meta",
        "_name",
        "_span",
        "_started",
        "_stats",
        "_tokens",
        "http",
        "slot",
        "status",
    )

    def __init__(
        self,
        stats: RequestStats,
        logs: ReplicaLogs | None,
        context: ReplicaContext,
        meta: RequestMetadata,
        name: str,
        slot: Slot,
    ) -> None:
        self._stats = stats
        self._logs = logs
        self._name = name
        self.slot = slot
        self.http: dict[str, Any] | None = None  # the ASGI scope of an HTTP request
        self.status: int | None = None  # the HTTP status of its response, once it started
        self._tokens = (_request.set(meta), _replica_context.set(context))
        # While tracing is on, the request's span (current while the user's code runs).
        self._span = None if tracing.SPANS is None else tracing.SPANS.serve(meta, context)
        self._meta = meta
        self._started = time.perf_counter()

    def saw(self, item: dict[str, Any] | Last) -> None:
        """An ASGI message of the response: the first says its status (101: a session)."""
        # A whole response (Last): its first message says it.
        message: dict[str, Any] = item.value[0] if isinstance(item, Last) else item
        kind = message.get("type")
        if kind in ("http.response.start", "websocket.http.response.start"):
            self.status = message.get("status")
        elif kind == "websocket.accept":
            self.status = 101
        elif kind == "websocket.close":  # refused before it was accepted
            self.status = 403

    def __enter__(self) -> Serving:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        seconds = time.perf_counter() - self._started
        meta = self._meta
        self._stats.record(self._name, seconds, kind is not None, meta.caller)
        if kind is not None:
            if passed(meta.deadline):
                self._stats.series(self._name).timed_out += 1  # cancelled at its deadline
            if isinstance(error, Exception):  # failed, not cancelled (nor closed)
                text = f"{kind.__name__}: {error}"
                failure = FailedRequest(time.time(), meta.request_id, text[:_ERROR_TEXT])
                self._stats.last_failure = failure
                request_failed(self._name, error)  # its traceback, for `tandem logs`
        logs = self._logs
        if logs is not None and logs.access_log:
            self._log_access(logs, kind, seconds)
        slot = self.slot
        if not slot.held_by_thread:
            slot.release()
        if self._span is not None:
            self._span.end(error, self.status)
        request, context = self._tokens
        try:
            _replica_context.reset(context)
            _request.reset(request)
        except ValueError:
            # A generator its consumer dropped is closed by the event loop's finalizer,
            # in another context: the variables are not ours to reset there.
            pass

    def _log_access(
        self, logs: ReplicaLogs, kind: type[BaseException] | None, seconds: float
    ) -> None:
        status: str | int
        if self.status is not None:
            status = self.status
        elif kind is None:
            status = "OK"
        elif issubclass(kind, (asyncio.CancelledError, GeneratorExit)):
            status = "CANCELLED"  # the caller gave up (or dropped the stream)
        else:
            status = "ERROR"
        if self.http is not None:
            logs.access(str(self.http.get("method")), str(self.http.get("path")), status, seconds)
        else:
            logs.access("CALL", self._name, status, seconds)
