"""Callers' side of the ray backend: a router's line to a replica that is a Ray actor.

A call is an actor task (``actor.call.remote``) whose ObjectRef the caller
awaits; a stream is a Ray streaming generator. Errors raised by the replica come
back as their own type with the remote traceback as ``__cause__``, as on the
process backend; an actor that died fails the requests in flight on it with
ReplicaUnavailableError, and requests sent after its death is known are retried
on other replicas.

Imports Ray: only the ray backend (driver and actors) loads this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from functools import partial
from typing import Any

from ray.exceptions import (
    ActorUnavailableError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
    TaskCancelledError,
)

from tandem._private.backends.process.frames import RemoteTraceback
from tandem._private.backends.ray.tracebacks import take_traceback
from tandem._private.calls.context import RequestMetadata
from tandem._private.calls.errors import ReplicaNotReached
from tandem._private.calls.flow import Last, Opened, ReadReports, begin, new_token
from tandem._private.calls.inbound import detach, start_pump, stop_pump
from tandem._private.calls.router import ReplicaInfo
from tandem.exceptions import ReplicaUnavailableError, RequestCancelledError


@dataclass(frozen=True)
class RayAddress:
    """A replica actor: its handle and where it runs."""

    actor: Any  # ray.actor.ActorHandle
    pid: int
    node_ip: str


def unwrap(error: BaseException, replica_id: str) -> BaseException:
    """The exception a caller should see for an error from awaiting a replica's ObjectRef."""
    if isinstance(error, RayTaskError):
        cause = error.cause
        if isinstance(cause, RayActorError | ObjectLostError):
            return unwrap(cause, replica_id)
        if isinstance(cause, TaskCancelledError):
            return unwrap(cause, replica_id)
        if isinstance(cause, BaseException):
            text = take_traceback(cause)
            if text is None:
                text = getattr(error, "traceback_str", None) or str(error)
            cause.__cause__ = RemoteTraceback(text)
            return cause
        return error
    if isinstance(error, TaskCancelledError):
        cancelled = RequestCancelledError(
            f"The request was cancelled in replica {replica_id} by someone other than its caller."
        )
        cancelled.__cause__ = error
        return cancelled
    if isinstance(error, RayActorError | ObjectLostError):
        lost = ReplicaUnavailableError(
            f"Replica {replica_id} died while handling the request "
            f"({type(error).__name__}); retry it if it can safely run again."
        )
        lost.__cause__ = error
        return lost
    return error


class RayConnection:
    """Sends requests to one replica actor; knows when the actor is gone."""

    __slots__ = ("_actor", "_dead", "replica_id")

    def __init__(self, info: ReplicaInfo) -> None:
        address = info.address
        assert isinstance(address, RayAddress)
        self.replica_id = info.replica_id
        self._actor = address.actor
        self._dead = False

    def _check(self) -> None:
        if self._dead:
            raise ReplicaNotReached(f"Replica {self.replica_id} is gone.")

    def submit(self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Start the call; (its token, its ObjectRef)."""
        self._check()
        token = new_token()  # by which ReplicaActor.cancel knows the request
        return token, self._actor.call.remote(token, meta, args, kwargs)

    async def call(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        args, kwargs, inbound = detach(args, kwargs)
        if inbound is None:
            return await self._call(meta, args, kwargs)
        pumping = start_pump(inbound, partial(self._push, inbound.token))
        try:
            return await self._call(meta, args, kwargs)
        finally:
            await stop_pump(pumping)

    async def _call(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        token, ref = self.submit(meta, args, kwargs)
        # Left for DeploymentResponse._to_object_ref, which may be waiting for it.
        call_ref = meta.call_ref
        if isinstance(call_ref, asyncio.Future):
            if not call_ref.done():
                call_ref.set_result(ref)
        else:
            meta.call_ref = ref
        try:
            return await ref
        except asyncio.CancelledError:
            self._cancel(token)  # the replica cancels the request and its downstream calls
            raise
        except (RayTaskError, RayActorError, ObjectLostError, TaskCancelledError) as error:
            translated = self._translate(error)
            raise translated from translated.__cause__

    async def http_request(self, meta: RequestMetadata, args: tuple[Any, ...]) -> Last | Opened:
        return await begin(self.stream(meta, args, {}))

    async def stream(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        """One call for the first items (often all of them), then a Ray streaming
        generator for the rest, in batches: a streaming call costs Ray about three
        unary ones, and each object it streams a good part of one. What the reader
        took is reported to the actor (``calls.flow``)."""
        self._check()
        token = new_token()
        args, kwargs, inbound = detach(args, kwargs)
        ref: Any = self._actor.stream_open.remote(token, meta, args, kwargs)
        pumping = None
        if inbound is not None:  # one push at a time: Ray may reorder an async actor's calls
            pumping = start_pump(inbound, partial(self._push, inbound.token))
        finished = False
        try:
            first, finished = await ref
            if finished:  # nothing more to hold back: no reports
                for item in first:
                    yield item
                return
            reads = ReadReports(lambda count: self._read(token, count))
            for item in first:
                yield item
                reads.took()
            ref = self._actor.stream_rest.options(num_returns="streaming").remote(token)
            async for batch_ref in ref:
                for item in await batch_ref:
                    yield item
                    reads.took()
            finished = True
        except (RayTaskError, RayActorError, ObjectLostError, TaskCancelledError) as error:
            finished = True
            translated = self._translate(error)
            raise translated from translated.__cause__
        finally:
            await stop_pump(pumping)
            if not finished:  # closed early or cancelled: stop the generator in the replica
                self._cancel(token)

    async def _push(
        self, ref: str, items: list[Any], end: bool, error: BaseException | None
    ) -> bool:
        return bool(await self._actor.push.remote(ref, items, end, error))

    def _read(self, token: str, count: int) -> None:
        if not self._dead:
            self._actor.read.remote(token, count)

    def _cancel(self, token: str) -> None:
        # tandem's own cancel, not ray.cancel: Ray's can also cancel the replica's
        # downstream calls, even ones its code shields (recursive=False or not), so
        # that code would see their errors instead of its own CancelledError. Here
        # cancelling a request cancels just what its code awaits, as on every backend.
        if not self._dead:
            self._actor.cancel.remote(token)

    def _translate(self, error: BaseException) -> BaseException:
        if isinstance(error, ActorUnavailableError):
            return ReplicaUnavailableError(
                f"Replica {self.replica_id} could not be reached ({error}); retry the request."
            )
        translated = unwrap(error, self.replica_id)
        if isinstance(translated, ReplicaUnavailableError):
            self._dead = True
        return translated

    def close(self) -> None:
        pass  # the actor handle goes with the last reference to it


def connect(info: ReplicaInfo) -> RayConnection:
    return RayConnection(info)
