"""What ``tandem.status()`` returns: small frozen records, convertible to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class _State(str, Enum):
    """A state's name: equal to its string (``state == "RUNNING"``), shown as it."""

    def __str__(self) -> str:
        return str(self.value)


class ApplicationState(_State):
    """An application's state (Ray Serve's ``ApplicationStatus``)."""

    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class DeploymentState(_State):
    """A deployment's state (Ray Serve's ``DeploymentStatus``)."""

    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"


class ReplicaState(_State):
    """A replica's state (Ray Serve's ``ReplicaState``, plus FAILED)."""

    STARTING = "STARTING"
    UPDATING = "UPDATING"
    RECOVERING = "RECOVERING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    PENDING_MIGRATION = "PENDING_MIGRATION"
    FAILED = "FAILED"  # in status counts: starts that failed in a row


class ProxyStatus(_State):
    """The HTTP proxy's state (Ray Serve's ``ProxyStatus``)."""

    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    DRAINED = "DRAINED"


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    state: str
    rank: int
    pid: int | None = None
    in_flight: int = 0
    node: str | None = None  # the node's address on the ray backend


@dataclass(frozen=True)
class DeploymentStatus:
    name: str
    status: str
    message: str
    target_replicas: int
    running_replicas: int
    replica_states: dict[str, int]
    restarts: int = 0
    replicas: tuple[ReplicaStatus, ...] = ()
    last_scaling_decision: str = ""


@dataclass(frozen=True)
class ApplicationStatus:
    name: str
    status: str
    message: str
    route_prefix: str | None
    ingress: str
    last_deployed_time_s: float
    deployments: dict[str, DeploymentStatus] = field(default_factory=dict)


@dataclass(frozen=True)
class Status:
    """Every application tandem runs here, with its deployments and replicas."""

    backend: str
    applications: dict[str, ApplicationStatus] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
