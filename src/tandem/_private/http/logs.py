"""The access log: one line per HTTP request, as text or JSON."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from tandem._private.log_format import JSONFormatter

access_logger = logging.getLogger("tandem.access")
# The arguments of the last configure_logging() in this process: ingress processes
# that serve HTTP themselves (http/direct.py) log as the driver does.
last_config: dict[str, Any] | None = None
# Called after every configure_logging() (direct ingress passes the setup on).
on_configured: list[Callable[[], None]] = []


def configure_logging(
    level: str = "INFO",
    json_format: bool = False,
    *,
    logs_dir: str | None = None,
    access_log: bool = True,
    attributes: Sequence[str] = (),
) -> None:
    """Set up tandem's own loggers (the controller's, the proxy's, the access log):
    the CLI calls this once, ``tandem.start(logging_config=...)`` too.

    ``logs_dir`` also writes them to ``tandem.log`` in that folder; ``access_log``
    False silences the access log; ``attributes`` are LogRecord attributes added to
    JSON lines.
    """
    global last_config
    last_config = {
        "level": level,
        "json_format": json_format,
        "logs_dir": logs_dir,
        "access_log": access_log,
        "attributes": tuple(attributes),
    }
    formatter: logging.Formatter = (
        JSONFormatter(attributes)
        if json_format
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if logs_dir is not None:
        os.makedirs(logs_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(logs_dir, "tandem.log"), "a", "utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
    logger = logging.getLogger("tandem")
    for old in logger.handlers:
        old.close()
    logger.handlers[:] = handlers
    logger.setLevel(level.upper())
    logger.propagate = False
    access_logger.disabled = not access_log
    for listener in list(on_configured):
        listener()


def log_access(
    method: str, path: str, status: int, seconds: float, request_id: str, app: str | None
) -> None:
    if not access_logger.isEnabledFor(logging.INFO):
        return
    if not path.isprintable():  # a percent-encoded newline must not forge a log line
        path = path.encode("unicode_escape").decode("ascii")
    access_logger.info(
        "%s %s %d %.1fms %s",
        method,
        path,
        status,
        seconds * 1e3,
        request_id,
        extra={
            "method": method,
            "path": path,
            "status": status,
            "latency_ms": round(seconds * 1e3, 3),
            "request_id": request_id,
            "application": app,
        },
    )
