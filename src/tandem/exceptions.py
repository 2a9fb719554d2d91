"""Errors tandem raises to its users.

Every class derives from :class:`TandemError`, so ``except TandemError`` catches
whatever the framework itself reports; exceptions raised by user code in a
deployment reach the caller as their own type instead.
"""

from __future__ import annotations

__all__ = [
    "BackPressureError",
    "DeploymentFailedError",
    "DeploymentUnavailableError",
    "RayServeException",
    "ReplicaUnavailableError",
    "RequestCancelledError",
    "TandemError",
]


class TandemError(Exception):
    """Base class of every error tandem raises itself."""


# Ray Serve's name for the base class: ``except serve.exceptions.RayServeException``
# in code written for Ray Serve catches what tandem raises.
RayServeException = TandemError


class BackPressureError(TandemError):
    """A caller's queue for a deployment is full (``max_queued_requests``)."""


class RequestCancelledError(TandemError):
    """The request was cancelled (``response.cancel()`` or a client disconnect)."""


class DeploymentUnavailableError(TandemError):
    """The deployment does not exist (any more) or has failed."""


class ReplicaUnavailableError(TandemError):
    """The replica serving a request died or was stopped before answering."""


class DeploymentFailedError(TandemError, RuntimeError):
    """A deployment could not be started, e.g. because its constructor raised."""
