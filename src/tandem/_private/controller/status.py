"""What ``tandem.status()`` returns: small frozen records, convertible to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class ApplicationState:
    DEPLOYING = "DEPLOYING"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class DeploymentState:
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


class ReplicaState:
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    FAILED = "FAILED"  # in status counts: starts that failed in a row


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
