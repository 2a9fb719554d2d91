"""A replica's logs, as its deployment's ``logging_config`` says.

User code in a replica logs through ``logging.getLogger("tandem.replica")`` (or
a logger under it). Without a logging_config, those records go wherever
tandem's own logs go, as any logger's do. With one, the records logged in the
replica at or above ``log_level`` are formatted as TEXT or JSON lines that name
the application, deployment, replica and request, and are written to standard
error and, with ``logs_dir``, to a file of the replica's own; with
``enable_access_log`` the replica adds one line per request it serves.

Replicas of the local backend share one process, and so its loggers. While any
replica in a process has a logging_config, one :class:`_Router` on the
``tandem.replica`` logger sends each record to the settings of the replica it
was logged in (found from the replica context variable, which worker threads
inherit); records logged anywhere else go on to tandem's handlers as before.
Nothing outside ``tandem.replica`` is changed, so one deployment's settings
never reach another's records.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import Any

from tandem._private.app.logging_config import LoggingConfig
from tandem._private.calls.context import ReplicaContext, _replica_context, _request
from tandem._private.log_format import JSONFormatter, record_attribute

REPLICA_LOGGER = "tandem.replica"
_access_logger = logging.getLogger(f"{REPLICA_LOGGER}.access")
# Installing and removing the router is rare; records never take this lock.
_ROUTER_LOCK = threading.Lock()
_UNSAFE_IN_FILE_NAMES = re.compile(r"[^A-Za-z0-9_.-]+")


class ReplicaLogs:
    """One replica's log settings and where its lines go."""

    def __init__(self, config: LoggingConfig, context: ReplicaContext) -> None:
        self.config = config
        self.level = config.level
        self.access_log = config.enable_access_log
        self._context = context
        self._handlers: list[logging.Handler] = []

    @property
    def replica_id(self) -> str:
        return self._context.replica_id

    @property
    def file_path(self) -> str | None:
        """The file this replica's lines also go to (with ``logs_dir``)."""
        if self.config.logs_dir is None:
            return None
        name = _UNSAFE_IN_FILE_NAMES.sub("_", self.replica_id)
        return os.path.join(self.config.logs_dir, f"replica_{name}.log")

    def open(self) -> None:
        """Start writing this replica's lines; raises ValueError if logs_dir is unusable."""
        formatter: logging.Formatter = (
            JSONFormatter(self.config.additional_log_standard_attrs)
            if self.config.encoding == "JSON"
            else _TextLines(self.config.additional_log_standard_attrs)
        )
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
        path = self.file_path
        if path is not None:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                handlers.append(logging.FileHandler(path, encoding="utf-8"))
            except OSError as exc:
                raise ValueError(
                    f"Deployment {self._context.deployment!r} cannot write its logs to "
                    f"logs_dir {self.config.logs_dir!r}: {exc.strerror or exc}; "
                    "pick a folder the replica may create and write."
                ) from exc
        for handler in handlers:
            handler.setFormatter(formatter)
        self._handlers = handlers
        _Router.register(self)

    def close(self) -> None:
        _Router.unregister(self)
        for handler in self._handlers:
            handler.close()
        self._handlers = []

    def emit(self, record: logging.LogRecord) -> None:
        """Write a record logged in this replica (and at or above its level)."""
        context = _replica_context.get() or self._context
        request = _request.get()
        where = vars(record)
        where["application"] = context.app_name
        where["deployment"] = context.deployment
        where["replica"] = context.replica_id
        if request is not None:
            where["request_id"] = request.request_id
            if request.route:
                where["route"] = request.route
        for handler in self._handlers:
            handler.handle(record)

    def access(self, method: str, target: str, status: str | int, seconds: float) -> None:
        """The access line of one request: ``method`` is CALL (a handle call) or the HTTP
        method; ``target`` the called method or the HTTP path."""
        if not target.isprintable():  # a percent-encoded newline must not forge a line
            target = target.encode("unicode_escape").decode("ascii")
        fields: dict[str, Any] = {"method": method, "status": status}
        fields["path" if method != "CALL" else "call"] = target
        fields["latency_ms"] = round(seconds * 1e3, 3)
        _access_logger.info("%s %s %s %.1fms", method, target, status, seconds * 1e3, extra=fields)


class _Router(logging.Handler):
    """On ``tandem.replica`` while replicas with a logging_config live in this process."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._logger = logger
        self._saved = (logger.level, logger.propagate)
        self._replicas: dict[str, ReplicaLogs] = {}

    @classmethod
    def register(cls, logs: ReplicaLogs) -> None:
        logger = logging.getLogger(REPLICA_LOGGER)
        with _ROUTER_LOCK:
            router = cls._on(logger)
            if router is None:
                router = cls(logger)
                logger.addHandler(router)
                logger.propagate = False  # the router passes on what is not a replica's
            router._replicas[logs.replica_id] = logs
            router._set_level()

    @classmethod
    def unregister(cls, logs: ReplicaLogs) -> None:
        logger = logging.getLogger(REPLICA_LOGGER)
        with _ROUTER_LOCK:
            router = cls._on(logger)
            if router is None or router._replicas.get(logs.replica_id) is not logs:
                return
            del router._replicas[logs.replica_id]
            if router._replicas:
                router._set_level()
                return
            logger.removeHandler(router)
            level, propagate = router._saved
            logger.setLevel(level)
            logger.propagate = propagate

    @staticmethod
    def _on(logger: logging.Logger) -> _Router | None:
        return next((h for h in logger.handlers if isinstance(h, _Router)), None)

    def _set_level(self) -> None:
        # Low enough for the most talkative replica, and for what was enabled before.
        levels = [logs.level for logs in self._replicas.values()]
        self._logger.setLevel(min(*levels, self._fallback_level()))

    def _fallback_level(self) -> int:
        """The level ``tandem.replica`` would have without the router."""
        level = self._saved[0]
        parent = self._logger.parent
        if level == logging.NOTSET and parent is not None:
            return parent.getEffectiveLevel()
        return level

    def handle(self, record: logging.LogRecord) -> bool:
        context = _replica_context.get()
        logs = self._replicas.get(context.replica_id) if context is not None else None
        if logs is not None:
            if record.levelno >= logs.level:
                logs.emit(record)
        elif record.levelno >= self._fallback_level() or _has_own_level(record.name):
            parent = self._logger.parent
            if self._saved[1] and parent is not None:
                parent.callHandlers(record)  # as propagation would have
        return True

    def emit(self, record: logging.LogRecord) -> None:  # handle() does it all
        pass


def routed_away(record: logging.LogRecord) -> bool:
    """Whether a record of a ``tandem.replica`` logger was let through only because the
    router lowered the logger's level for another replica's logging_config (a replica
    without one does not keep it)."""
    router = _Router._on(logging.getLogger(REPLICA_LOGGER))
    if router is None:
        return False
    return record.levelno < router._fallback_level() and not _has_own_level(record.name)


def _has_own_level(name: str) -> bool:
    """A logger under ``tandem.replica`` with a level of its own (it checked the record)."""
    manager = logging.Logger.manager
    while name != REPLICA_LOGGER and "." in name:
        logger = manager.loggerDict.get(name)
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            return True
        name = name.rpartition(".")[0]
    return False


class _TextLines(logging.Formatter):
    """``time LEVEL replica [request] -- message`` (plus any additional attributes)."""

    def __init__(self, attributes: list[str]) -> None:
        super().__init__()
        self._attributes = attributes

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        request_id = getattr(record, "request_id", None)
        parts = [self.formatTime(record), record.levelname, str(getattr(record, "replica", ""))]
        if request_id:
            parts.append(str(request_id))
        line = " ".join(parts) + " -- " + record.message
        for name in self._attributes:
            line += f" {name}={record_attribute(record, name, self)}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line
