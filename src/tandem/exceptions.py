"""Errors tandem raises to its users.

Every class derives from :class:`TandemError`, so ``except TandemError`` catches
whatever the framework itself reports; exceptions raised by user code in a
deployment reach the caller as their own type instead.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackPressureError",
    "DeadlineExceededError",
    "DeploymentFailedError",
    "DeploymentUnavailableError",
    "RayServeException",
    "ReplicaUnavailableError",
    "RequestCancelledError",
    "TandemError",
    "gRPCStatusError",
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


class DeadlineExceededError(TandemError, TimeoutError):
    """The request's deadline passed before it was answered: it was dropped before it
    ran, or cancelled while it ran (in every deployment it reached). A request gets a
    deadline from ``handle.options(timeout_s=...)``, the proxy's ``request_timeout_s``
    or the client (``X-Request-Deadline-Ms``, a gRPC deadline); its calls inherit it."""


class DeploymentUnavailableError(TandemError):
    """The deployment does not exist (any more) or has failed."""


class ReplicaUnavailableError(TandemError):
    """The replica serving a request died or was stopped before answering."""


class DeploymentFailedError(TandemError, RuntimeError):
    """A deployment could not be started, e.g. because its constructor raised."""


class gRPCStatusError(TandemError):  # Ray Serve's name
    """An exception raised by an ingress method serving a gRPC request after it set a
    status code on its ``grpc_context``: the client gets that code (and details),
    not INTERNAL. tandem wraps the method's exception in it; the original is
    :attr:`original_exception`."""

    def __init__(
        self, original_exception: BaseException, code: Any = None, details: str | None = None
    ) -> None:
        super().__init__(str(original_exception))
        self._original_exception = original_exception
        self._grpc_code = code
        self._grpc_details = details

    @property
    def original_exception(self) -> BaseException:
        return self._original_exception

    @property
    def grpc_code(self) -> Any:
        """The ``grpc.StatusCode`` the method set."""
        return self._grpc_code

    @property
    def grpc_details(self) -> str | None:
        """The details the method set, if any."""
        return self._grpc_details

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (gRPCStatusError, (self._original_exception, self._grpc_code, self._grpc_details))
