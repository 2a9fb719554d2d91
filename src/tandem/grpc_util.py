"""gRPC helpers users import by name: ``from ray.serve.grpc_util import
RayServegRPCContext`` becomes ``from tandem.grpc_util import RayServegRPCContext``.

Importing this module does not import grpcio.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

__all__ = ["RayServegRPCContext", "gRPCInputStream"]

T = TypeVar("T")


class gRPCInputStream(Generic[T]):  # Ray Serve's name
    """The client's messages of a streaming-request RPC, as an async iterator.

    A bidirectional-streaming method reads them with ``async for``; tandem hands it
    an async iterator of the messages as they arrive (this class is for annotations,
    and wraps any async iterator the same way: ``cancel()`` stops the iteration).
    """

    def __init__(
        self, request_iterator: AsyncIterator[T], *, cancel_event: asyncio.Event | None = None
    ) -> None:
        self._requests = request_iterator
        self._cancel_event = cancel_event or asyncio.Event()
        self._exhausted = False

    def __aiter__(self) -> gRPCInputStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._exhausted or self._cancel_event.is_set():
            self._exhausted = True
            raise StopAsyncIteration
        try:
            return await self._requests.__anext__()
        except StopAsyncIteration:
            self._exhausted = True
            raise

    def is_cancelled(self) -> bool:
        return self._cancel_event.is_set()

    def cancel(self) -> None:
        """Stop the iteration: the next read ends it."""
        self._cancel_event.set()

    @property
    def is_exhausted(self) -> bool:
        """Whether every message has been read (or the iteration was stopped)."""
        return self._exhausted


class RayServegRPCContext:
    """The context of one gRPC request, as an ingress method sees it.

    A method that takes a ``grpc_context`` argument gets one: it reads what the
    client sent (metadata, peer) and sets what the client gets back besides the
    reply (status code, details, trailing metadata, compression), as on a
    ``grpc.ServicerContext``. It is plain data, so it reaches a replica in
    another process and its settings come back with the reply.
    """

    def __init__(self, grpc_context: Any) -> None:
        """Copy what a method may read from the server's ``grpc_context``."""
        self._auth_context: dict[str, Any] = dict(grpc_context.auth_context())
        self._code: Any = grpc_context.code()
        self._details: str = grpc_context.details() or ""
        self._invocation_metadata: list[tuple[str, Any]] = [
            (key, value) for key, value in grpc_context.invocation_metadata() or ()
        ]
        self._metadata = dict(self._invocation_metadata)
        self._peer: str = grpc_context.peer()
        self._peer_identities: Any = grpc_context.peer_identities()
        self._peer_identity_key: str | None = grpc_context.peer_identity_key()
        self._trailing_metadata: list[tuple[str, Any]] = list(
            grpc_context.trailing_metadata() or ()
        )
        self._compression: Any = None

    def auth_context(self) -> dict[str, Any]:
        """The auth properties of the call (property name -> list of bytes)."""
        return self._auth_context

    def code(self) -> Any:
        """The status code the RPC will end with (a ``grpc.StatusCode``; None: not set)."""
        return self._code

    def details(self) -> str:
        """The details string the RPC will end with."""
        return self._details

    def request_id(self) -> str | None:
        """The ``request_id`` the client sent, if it sent one."""
        return self._metadata_value("request_id")

    def application(self) -> str | None:
        """The ``application`` the client named, if it named one."""
        return self._metadata_value("application")

    def multiplexed_model_id(self) -> str | None:
        """The ``multiplexed_model_id`` the client sent, if it sent one."""
        return self._metadata_value("multiplexed_model_id")

    def traceparent(self) -> str | None:
        return self._metadata_value("traceparent")

    def tracestate(self) -> str | None:
        return self._metadata_value("tracestate")

    def invocation_metadata(self) -> list[tuple[str, Any]]:
        """The metadata the client sent, as (key, value) pairs."""
        return self._invocation_metadata

    def peer(self) -> str:
        """The client's address, as gRPC names it (e.g. ``ipv4:127.0.0.1:51234``)."""
        return self._peer

    def peer_identities(self) -> Any:
        """The client's identities (bytes), or None if the call is not authenticated."""
        return self._peer_identities

    def peer_identity_key(self) -> str | None:
        """The auth property that names the client, or None if it is not authenticated."""
        return self._peer_identity_key

    def trailing_metadata(self) -> list[tuple[str, Any]]:
        return self._trailing_metadata

    def set_code(self, code: Any) -> None:
        """Set the status code the RPC ends with (a ``grpc.StatusCode``)."""
        self._code = code

    def set_compression(self, compression: Any) -> None:
        """Set the compression of the reply (a ``grpc.Compression``)."""
        self._compression = compression

    def set_details(self, details: str) -> None:
        """Set the details string the RPC ends with."""
        self._details = details

    def set_trailing_metadata(self, trailing_metadata: list[tuple[str, Any]]) -> None:
        """Set the trailing metadata; the ``request_id`` tandem adds is kept."""
        kept = [(k, v) for k, v in self._trailing_metadata if k == "request_id"][:1]
        self._trailing_metadata = kept + list(trailing_metadata)

    def _metadata_value(self, key: str) -> str | None:
        value = self._metadata.get(key)
        return None if value is None else str(value)

    def _set_on_grpc_context(self, grpc_context: Any) -> None:
        """Apply what the method set to the server's context (the proxy calls this)."""
        if self._code:
            grpc_context.set_code(self._code)
        if self._compression:
            grpc_context.set_compression(self._compression)
        if self._details:
            grpc_context.set_details(self._details)
        if self._trailing_metadata:
            grpc_context.set_trailing_metadata(tuple(self._trailing_metadata))
