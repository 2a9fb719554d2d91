"""JSON log lines: the one format of tandem's JSON logs (access log, replica logs)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

# The attributes every LogRecord has; anything else on a record came as ``extra``.
STANDARD_LOG_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, any ``extra`` fields,
    and the standard record ``attributes`` asked for (e.g. ``"name"``, ``"lineno"``)."""

    def __init__(self, attributes: Sequence[str] = ()) -> None:
        super().__init__()
        self._attributes = tuple(attributes)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in STANDARD_LOG_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        for name in self._attributes:
            entry[name] = record_attribute(record, name, self)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def record_attribute(record: logging.LogRecord, name: str, formatter: logging.Formatter) -> Any:
    """A standard attribute of ``record``, including the two a formatter makes."""
    if name == "message":
        return record.getMessage()
    if name == "asctime":
        return formatter.formatTime(record)
    return getattr(record, name, None)
