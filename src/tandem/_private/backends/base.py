"""The backend seam: the one interface the controller uses to place replicas.

A backend starts a replica from its :class:`ReplicaSpec`, stops it, checks it
and reconfigures it, and gives callers a :class:`ReplicaConnection` to it from
the :class:`ReplicaInfo` the controller publishes.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol

from tandem._private.calls.context import DeploymentID
from tandem._private.calls.router import ReplicaConnection, ReplicaInfo, ReplicaSet
from tandem._private.controller.status import Status
from tandem._private.replica.log_buffer import LogRead
from tandem._private.replica.replica import ReplicaFacts, ReplicaSpec

logger = logging.getLogger("tandem")


class ReplicaStartError(Exception):
    """A replica's constructor (or first reconfigure) raised; carries the original error."""

    def __init__(self, replica_id: str, error: BaseException, traceback_text: str) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.replica_id = replica_id
        self.error = error
        self.traceback_text = traceback_text


class BackendEvents(Protocol):
    """What a backend tells its owner (the controller) as it happens, from the loop."""

    def replica_exited(self, replica_id: str) -> None:
        """A replica died (crashed, killed, its node went away)."""

    def models_changed(self, replica_id: str, model_ids: frozenset[str]) -> None:
        """The multiplexed models a replica holds changed (routers prefer holders)."""

    def status(self) -> Status:
        """What ``tandem.status()`` says now: replicas in other processes ask for it."""


class _NoEvents:
    def replica_exited(self, replica_id: str) -> None:
        pass

    def models_changed(self, replica_id: str, model_ids: frozenset[str]) -> None:
        pass

    def status(self) -> Status:
        return Status(backend="", applications={})


class Backend(ABC):
    """Starts, stops and reaches replicas (see the module docstring)."""

    name: ClassVar[str]
    events: BackendEvents = _NoEvents()  # open() sets the owner's

    def prepare(self) -> None:  # noqa: B027
        """Set up what must be set up in the caller's thread, before the loop starts."""

    async def open(self, events: BackendEvents) -> None:
        """Prepare to host replicas; report what happens to them to ``events``."""
        self.events = events

    async def close(self) -> None:  # noqa: B027
        """Release whatever :meth:`open` took; every replica is stopped by then."""

    @abstractmethod
    async def start_replica(self, spec: ReplicaSpec) -> ReplicaInfo:
        """Construct a replica; return once it serves. Raises ReplicaStartError."""

    @abstractmethod
    async def stop_replica(self, info: ReplicaInfo, timeout_s: float) -> None:
        """Drain (up to ``timeout_s``) and destroy a replica."""

    @abstractmethod
    async def check_health(self, info: ReplicaInfo) -> None:
        """Raise if the replica is dead or its check_health fails or times out."""

    @abstractmethod
    async def reconfigure(self, info: ReplicaInfo, user_config: Any) -> None:
        """Pass a new user_config to the replica's reconfigure."""

    @abstractmethod
    async def set_rank(self, info: ReplicaInfo, rank: int, world_size: int) -> None:
        """Tell a replica its new rank and the deployment's new size (after scaling)."""

    @abstractmethod
    def connect(self, info: ReplicaInfo) -> ReplicaConnection:
        """A connection a router in this process can send requests over."""

    def publish(self, replica_set: ReplicaSet) -> None:  # noqa: B027
        """A deployment's replica set changed: pass it on to replicas elsewhere."""

    def queued(self, deployment_id: DeploymentID) -> int:
        """Requests waiting for the deployment in routers of replicas elsewhere."""
        return 0

    async def refresh(self, info: ReplicaInfo) -> None:  # noqa: B027
        """Update what :meth:`facts` knows of a replica kept elsewhere."""

    @abstractmethod
    def facts(self, info: ReplicaInfo) -> ReplicaFacts:
        """What is known of a replica (as of the last :meth:`refresh`)."""

    async def logs(
        self, info: ReplicaInfo, after: int, limit: int, request_id: str | None = None
    ) -> LogRead:
        """A replica's recent log lines (``replica/log_buffer.py``): the newest ``limit``
        numbered above ``after`` (of request ``request_id`` only, if given), and the
        number of its newest line. Raises if the replica cannot be reached."""
        return LogRead([], 0)

    # Whether ingress replicas can serve HTTP themselves (direct ingress, http/direct.py).
    serves_direct_ingress: ClassVar[bool] = False

    def serve_direct(self, plan: Any, metrics: Callable[[], Awaitable[bytes]] | None) -> None:
        """Let ingress replicas serve HTTP themselves under ``plan`` (an
        ``http.direct.IngressPlan``; None: stop); ``metrics`` renders the driver's
        /metrics for them. Only where ``serves_direct_ingress``."""
        raise NotImplementedError


class IgnoredOptions:
    """Warns once per deployment about options a backend does not apply (logged, so a
    deployment written for Ray runs here, and the log says what differs)."""

    def __init__(self, backend_name: str) -> None:
        self.name = backend_name
        self._warned: set[tuple[str, DeploymentID]] = set()

    def runtime_env(self, spec: ReplicaSpec, honoured: frozenset[str] = frozenset()) -> None:
        """Say once per deployment which of its runtime_env fields this backend ignores."""
        actor = spec.options.ray_actor_options
        ignored = sorted(set(actor.runtime_env or {}) - honoured) if actor else []
        if not ignored or not self._first_warning(spec, "runtime_env"):
            return
        logger.warning(
            "Deployment %r sets runtime_env %s, which the %s backend does not apply (the "
            "ray backend applies all of runtime_env, the process backend its env_vars); "
            "its replicas run in this machine's environment as it is.",
            spec.deployment_id.name,
            ", ".join(ignored),
            self.name,
        )

    def placement(self, spec: ReplicaSpec) -> None:
        """Say once per deployment which placement options this backend does not apply."""
        options = spec.options
        ignored = [
            name
            for name in (
                "placement_group_bundles",
                "placement_group_strategy",
                "max_replicas_per_node",
            )
            if getattr(options, name) is not None
        ]
        if not ignored or not self._first_warning(spec, "placement"):
            return
        logger.warning(
            "Deployment %r sets %s, which the %s backend does not apply (only the ray "
            "backend places replicas on a cluster's nodes); its replicas run on this machine.",
            spec.deployment_id.name,
            ", ".join(ignored),
            self.name,
        )

    def _first_warning(self, spec: ReplicaSpec, topic: str) -> bool:
        """True the first time a deployment is warned about ``topic`` (then False)."""
        key = (topic, spec.deployment_id)
        if key in self._warned:
            return False
        self._warned.add(key)
        return True
