"""How the proxies answer a request that failed: its status, and the words clients see
(what went wrong in detail goes to the log and the owner's status, never to clients);
and how they log floods of shed requests."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tandem.exceptions import (
    BackPressureError,
    DeadlineExceededError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

logger = logging.getLogger("tandem.proxy")

# What clients see for each failure kind (the details go to the log).
PUBLIC_TEXT = {
    "backpressure": "too many requests are waiting; retry later",
    "unavailable": "the application cannot take requests now",
    "cancelled": "the request was cancelled",
    "replica_unavailable": "the replica serving this request went away",
    "timeout": "the request's deadline passed before it was answered",
}


def classify(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, failure kind) of an error a request to an application raised."""
    if isinstance(exc, BackPressureError):
        return 503, "backpressure"
    if isinstance(exc, DeploymentUnavailableError):
        return 503, "unavailable"
    if isinstance(exc, ReplicaUnavailableError):
        return 502, "replica_unavailable"
    if isinstance(exc, RequestCancelledError):
        return 503, "cancelled"
    if isinstance(exc, DeadlineExceededError):
        return 408, "timeout"
    return 500, "server_error"


# A flood of shed requests logs one line per application per this many seconds.
SHED_LOG_PERIOD_S = 10.0


class SheddingLog:
    """Shed requests come in floods: log the first of each application's, then at most
    one line per SHED_LOG_PERIOD_S that says how many were shed meanwhile (each one
    is still in the access log and in /metrics). ``what``: the requests' name."""

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._what = what
        self._clock = clock
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def note(self, app: str) -> bool:
        """Whether to log this shed request (else it is counted for the next line)."""
        now = self._clock()
        last = self._last.get(app)
        if last is not None and now - last < SHED_LOG_PERIOD_S:
            self._since[app] = self._since.get(app, 0) + 1
            return False
        skipped = self._since.pop(app, 0)
        if skipped:
            logger.warning(
                "Application %r shed %d more %s in the last %.0f s (its queue was full).",
                app,
                skipped,
                self._what,
                now - (last or now),
            )
        self._last[app] = now
        return True
