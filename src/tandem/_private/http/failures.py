"""How the proxy answers a request that failed: its status, and the words clients see
(what went wrong in detail goes to the log and the owner's status, never to clients)."""

from __future__ import annotations

from tandem.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

# What clients see for each failure kind (the details go to the log).
PUBLIC_TEXT = {
    "backpressure": "too many requests are waiting; retry later",
    "unavailable": "the application cannot take requests now",
    "cancelled": "the request was cancelled",
    "replica_unavailable": "the replica serving this request went away",
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
    return 500, "server_error"
