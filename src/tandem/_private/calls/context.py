"""Who is running and for which request: contextvars read by user code.

``get_replica_context()`` and ``get_multiplexed_model_id()`` read these; the
replica sets them around every constructor and method call it makes.
"""

from __future__ import annotations

import contextvars
import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class DeploymentID:
    """A deployment's identity: its name within its application (Ray Serve's fields,
    in its order: ``DeploymentID("Model")`` is Model of the "default" application)."""

    name: str
    app_name: str = "default"

    def __str__(self) -> str:
        return f"{self.app_name}#{self.name}"


@dataclass(frozen=True)
class ReplicaID:
    """A replica's identity (Ray Serve's ``ReplicaID``): its own id within its deployment.

    tandem's string form of it, ``app#deployment#unique``, is what
    ``get_replica_context().replica_id`` and status give.
    """

    unique_id: str
    deployment_id: DeploymentID

    @classmethod
    def of(cls, replica_id: str, deployment_id: DeploymentID) -> ReplicaID:
        """From tandem's replica id (``app#deployment#unique``) of a known deployment."""
        return cls(replica_id.rpartition("#")[2], deployment_id)

    def to_full_id_str(self) -> str:
        """The id tandem gives the replica (``get_replica_context().replica_id``)."""
        return f"{self.deployment_id.app_name}#{self.deployment_id.name}#{self.unique_id}"

    @staticmethod
    def is_full_id_str(s: str) -> bool:
        return s.count("#") >= 2

    @classmethod
    def from_full_id_str(cls, s: str) -> ReplicaID:
        rest, _, unique_id = s.rpartition("#")
        app_name, _, name = rest.rpartition("#")
        if not unique_id or not name:
            raise ValueError(f"{s!r} is not a replica id ('app#deployment#id').")
        return cls(unique_id, DeploymentID(name=name, app_name=app_name))

    def __str__(self) -> str:
        return (
            f"Replica(id='{self.unique_id}', deployment='{self.deployment_id.name}', "
            f"app='{self.deployment_id.app_name}')"
        )


class ReplicaRank(BaseModel):
    """A replica's place among its deployment's replicas (Ray Serve's model).

    ``rank`` runs from 0 to ``world_size - 1`` and stays unique while replicas come
    and go. tandem places a deployment's replicas as one group, so ``node_rank`` is
    0 and ``local_rank`` equals ``rank``.
    """

    model_config = ConfigDict(frozen=True)

    rank: int
    node_rank: int = 0
    local_rank: int = 0

    @classmethod
    def of(cls, rank: int) -> ReplicaRank:
        return cls(rank=rank, node_rank=0, local_rank=rank)


@dataclass(frozen=True)
class ReplicaContext:
    """What a replica knows about itself (``tandem.get_replica_context()``)."""

    app_name: str
    deployment: str
    replica_id: str
    rank: ReplicaRank
    world_size: int
    _replica: Any = field(default=None, repr=False, compare=False)
    # The runtime this replica's own calls go through when it is not the process's
    # (an application in local testing mode next to another backend's runtime).
    _runtime: Any = field(default=None, repr=False, compare=False)

    @property
    def replica_tag(self) -> str:
        return self.replica_id

    @property
    def servable_object(self) -> Any:
        """The user's instance this replica serves (None once it stopped)."""
        return None if self._replica is None else self._replica.servable


# The method name of an HTTP request sent to an application's ingress replica (the
# proxy sends it; the replica serves it through the HTTP bridge): a name of tandem's
# own, which no user's method has.
HTTP_METHOD = "__tandem_http__"


@dataclass(slots=True)
class RequestMetadata:
    """Travels with every call: identifies it and carries its routing hints."""

    request_id: str
    app_name: str
    deployment: str
    method_name: str = "__call__"
    stream: bool = False
    multiplexed_model_id: str = ""
    route: str = ""
    # When the request must be answered by (time.time()), or None: no deadline.
    deadline: float | None = None
    # Higher first in each router's queue (handle.options(priority=), X-Request-Priority).
    priority: int = 0
    # A stream's items may wait this long to cross to the caller together
    # (handle.options(stream_chunk_ms=); calls.channel).
    stream_chunk_s: float = 0.0
    # The deployment whose replica made the call ("app/name" when in another
    # application), or "" for the driver and the proxies: the dashboard's edges.
    caller: str = ""
    # The caller's span as a W3C traceparent (then "\n" and its tracestate, if any);
    # "" when tracing is off (tandem._private.tracing).
    trace: str = ""
    # Not sent along. A connection whose backend has a reference of its own to the
    # call's result (a Ray ObjectRef) leaves it here, or resolves the Future that
    # DeploymentResponse._to_object_ref left here to wait for it.
    call_ref: Any = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Positional fields: several times faster to pickle than the default (every hop).
        return (
            RequestMetadata,
            (
                self.request_id,
                self.app_name,
                self.deployment,
                self.method_name,
                self.stream,
                self.multiplexed_model_id,
                self.route,
                self.deadline,
                self.priority,
                self.stream_chunk_s,
                self.caller,
                self.trace,
            ),
        )

    @staticmethod
    def new_request_id() -> str:
        return f"{_ID_PREFIX}{next(_id_counter):x}"


# Unique across processes (random prefix) and cheap per request (a counter).
_ID_PREFIX = uuid.uuid4().hex[:12]
_id_counter = itertools.count(1)


_replica_context: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar(
    "tandem_replica_context", default=None
)
_request: contextvars.ContextVar[RequestMetadata | None] = contextvars.ContextVar(
    "tandem_request", default=None
)


def get_replica_context() -> ReplicaContext:
    """The context of the replica this code runs in; RuntimeError outside a replica."""
    ctx = _replica_context.get()
    if ctx is None:
        raise RuntimeError(
            "get_replica_context() was called outside a deployment; "
            "call it from a deployment's constructor or methods."
        )
    return ctx


def current_replica_context() -> ReplicaContext | None:
    return _replica_context.get()


def current_request() -> RequestMetadata | None:
    return _request.get()


def get_multiplexed_model_id() -> str:
    """The multiplexed model id of the request being served ("" when none was given)."""
    request = _request.get()
    return request.multiplexed_model_id if request is not None else ""
