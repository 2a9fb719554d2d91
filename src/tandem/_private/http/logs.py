"""The access log: one line per HTTP request, as text or JSON."""

from __future__ import annotations

import logging

from tandem._private.log_format import JSONFormatter

access_logger = logging.getLogger("tandem.access")


def configure_logging(level: str = "INFO", json_format: bool = False) -> None:
    """Set up tandem's loggers for a server process (the CLI calls this once)."""
    handler = logging.StreamHandler()
    if json_format:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    logger = logging.getLogger("tandem")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


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
