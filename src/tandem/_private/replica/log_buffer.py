"""Each replica's recent log lines, kept in memory for ``tandem logs`` and the dashboard.

Every replica has a :class:`LogBuffer`: a ring of its last :data:`MAX_LINES`
lines, each numbered (``seq``) so a reader can ask for what came after the
last line it saw. A line is a record logged while the replica serves or runs
its hooks, by any logger (the user's ``tandem.replica`` and its children, the
access log, third-party loggers, tandem's own), with the application,
deployment, replica and request it was logged in.

One capture point per process (:func:`capture_logs`): a wrapper around the
logging module's record factory. Each record a logger lets through is made
there, before any handler or propagation rule (the ``tandem`` logger's own
handlers, ``tandem.replica`` routed by ``replica.logs``) decides where it goes,
so none of those can hide a record from the buffer. A record made outside any
replica costs one context-variable lookup. The replica context variable is
inherited by worker threads and tasks, so records of sync methods count too.

With a ``logging_config``, records below its ``log_level`` are not kept;
without one, the buffer keeps what the loggers let through, and
``tandem.replica`` logs at INFO unless something set its level (Ray Serve's
default ``log_level``), in the driver and in replica processes alike.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections import deque
from typing import Any, NamedTuple

from tandem._private.calls.context import _replica_context, _request
from tandem._private.replica.logs import REPLICA_LOGGER, routed_away

# The level of ``tandem.replica`` where nothing set one (logging_config's default).
DEFAULT_REPLICA_LEVEL = logging.INFO
# How many lines a replica keeps; older ones are dropped as new ones come.
MAX_LINES = 1000
# A message or traceback longer than this is cut (a line must not hold megabytes).
MAX_TEXT = 16_384

_FORMATTER = logging.Formatter()  # formatException/formatStack only: no state
_installed = False
_install_lock = threading.Lock()


class LogLine(NamedTuple):
    """One kept line (see :meth:`as_dict` for what readers get)."""

    seq: int
    time: float  # wall clock, seconds since the epoch
    level: str
    logger: str
    message: str
    application: str
    deployment: str
    replica: str
    request_id: str | None
    exception: str | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready form: every field under its own name."""
        return self._asdict()


class LogRead(NamedTuple):
    """What :meth:`LogBuffer.read` returns: the lines asked for (oldest first) and the
    sequence number of the newest line the buffer holds (0: none yet), the cursor to
    pass as ``after`` next time."""

    lines: list[dict[str, Any]]
    last: int


class LogBuffer:
    """One replica's recent lines (see the module docstring)."""

    __slots__ = ("_lines", "_lock", "_seq", "application", "deployment", "level", "replica")

    def __init__(
        self,
        application: str,
        deployment: str,
        replica: str,
        level: int | None = None,
        size: int = MAX_LINES,
    ) -> None:
        """``level``: the logging_config's log_level (None: keep what loggers let through)."""
        self.application = application
        self.deployment = deployment
        self.replica = replica
        self.level = level
        self._lines: deque[LogLine] = deque(maxlen=size)
        self._seq = itertools.count(1)
        # Numbering and appending under one lock keep the deque in seq order, so a
        # reader that saw seq N never misses a line numbered below N.
        self._lock = threading.Lock()

    def keep(self, record: logging.LogRecord) -> None:
        """Keep a record logged in this replica, unless its level says otherwise."""
        level = self.level
        if level is None:
            name = record.name
            if (name == REPLICA_LOGGER or name.startswith(REPLICA_LOGGER + ".")) and routed_away(
                record
            ):
                return  # let through only for another replica's logging_config
        elif record.levelno < level:
            return
        exception = None
        if record.exc_info:
            exception = _FORMATTER.formatException(record.exc_info)
        elif record.exc_text:
            exception = record.exc_text
        if record.stack_info:
            stack = _FORMATTER.formatStack(record.stack_info)
            exception = stack if exception is None else f"{exception}\n{stack}"
        self._add(record.created, record.levelname, record.name, _message(record), exception)

    def request_failed(self, method: str, error: BaseException) -> None:
        """The line of a request whose method raised: its error and traceback."""
        if self.level is not None and self.level > logging.ERROR:
            return
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        self._add(
            time.time(),
            "ERROR",
            REPLICA_LOGGER,
            f"Request to method {method!r} failed: {type(error).__name__}: {error}",
            text.rstrip("\n"),
        )

    def _add(
        self, created: float, level: str, name: str, message: str, exception: str | None
    ) -> None:
        request = _request.get()
        request_id = request.request_id if request is not None else None
        with self._lock:
            self._lines.append(
                LogLine(
                    next(self._seq),
                    created,
                    level,
                    name,
                    _cut(message),
                    self.application,
                    self.deployment,
                    self.replica,
                    request_id or None,
                    None if exception is None else _cut(exception),
                )
            )

    def read(
        self, after: int = 0, limit: int = MAX_LINES, request_id: str | None = None
    ) -> LogRead:
        """The newest ``limit`` lines numbered above ``after`` (of request ``request_id``
        only, if given), oldest first."""
        with self._lock:
            lines = list(self._lines)
        last = lines[-1].seq if lines else 0
        wanted = [
            line
            for line in lines
            if line.seq > after and (request_id is None or line.request_id == request_id)
        ]
        return LogRead([line.as_dict() for line in wanted[-limit:]] if limit > 0 else [], last)


def capture_logs() -> None:
    """Send every record logged in a replica of this process to its replica's buffer
    (once per process; later calls do nothing)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            context = _replica_context.get()
            if context is not None:
                buffer = getattr(context._replica, "log_buffer", None)
                if buffer is not None:
                    try:
                        buffer.keep(record)
                    except Exception:  # keeping a line must never fail the logging call
                        pass
            return record

        logging.setLogRecordFactory(make_record)
        _installed = True
        replica_logger = logging.getLogger(REPLICA_LOGGER)
        if replica_logger.level == logging.NOTSET:
            # Ray Serve's default log_level: a replica's INFO lines are made (kept, and
            # shown where tandem's logs go) without a logging_config, on every backend.
            replica_logger.setLevel(DEFAULT_REPLICA_LEVEL)


def request_failed(method: str, error: BaseException) -> None:
    """Keep the line of a failed request in the buffer of the replica serving it (called
    where the request ends, in its context)."""
    context = _replica_context.get()
    buffer = None if context is None else getattr(context._replica, "log_buffer", None)
    if buffer is not None:
        buffer.request_failed(method, error)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # bad arguments: logging reports that in its handlers, not here
        return f"{record.msg!r} % {record.args!r}"


def _cut(text: str) -> str:
    if len(text) <= MAX_TEXT:
        return text
    return f"{text[:MAX_TEXT]}… ({len(text) - MAX_TEXT} more characters)"
