"""The controller's view of what runs: one record per application, deployment and replica.

Mutable records that only the controller changes, on its event loop. A
deployment's record knows its target replica count and derives its state
from the facts it holds (:meth:`DeploymentRecord.refresh_state`); nothing
here talks to a backend.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from tandem._private.app.spec import ApplicationSpec, DeploymentSpec
from tandem._private.calls.context import DeploymentID
from tandem._private.calls.router import ReplicaInfo
from tandem._private.controller.autoscaling import Autoscaler
from tandem._private.controller.status import ApplicationState, DeploymentState, ReplicaState


@dataclass
class ReplicaRecord:
    replica_id: str
    rank: int
    info: ReplicaInfo
    graceful_shutdown_timeout_s: float
    state: str = ReplicaState.RUNNING
    next_health_check: float = 0.0
    checking: bool = False
    # Routing stats (record_routing_stats): when to read them next, and whether a read runs.
    next_routing_stats: float = 0.0
    reading_stats: bool = False


@dataclass(frozen=True)
class RetiredReplica:
    """A replica taken out of service (it exited or failed its health checks)."""

    at: float  # time.time()
    deployment_id: DeploymentID
    replica_id: str
    pid: int | None
    reason: str


@dataclass
class DeploymentRecord:
    id: DeploymentID
    spec: DeploymentSpec
    replicas: list[ReplicaRecord] = field(default_factory=list)
    status: str = DeploymentState.UPDATING
    message: str = ""
    restarts: int = 0
    # Replicas being started by the reconciliation loop, by rank.
    starting: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    stopping: int = 0
    # Starts that failed in a row (0 once one succeeds), the last error, the next try.
    start_failures: int = 0
    last_error: str = ""
    retry_at: float = 0.0
    # Set once the deployment left its application: nothing may restart its replicas.
    removed: bool = False
    # Autoscaling: the policy, the target it (or an external scaler) chose (None: the
    # initial count), and timing.
    autoscaler: Autoscaler | None = None
    scaled_target: int | None = None
    scaling: bool = False
    next_sample: float = 0.0

    def __post_init__(self) -> None:
        auto = self.spec.options.autoscaling
        if auto is not None and self.autoscaler is None:
            self.autoscaler = Autoscaler(auto)

    @property
    def target(self) -> int:
        if self.scaled_target is not None:
            return self.scaled_target
        if self.autoscaler is not None:
            return self.spec.options.initial_replicas()  # may be 0: scale from zero on demand
        return max(1, self.spec.options.initial_replicas())

    def kept_target(self, spec: DeploymentSpec) -> int | None:
        """The chosen target (``scaled_target``) that stands when this deployment, which
        keeps its replicas, is deployed again as ``spec``; None: it starts over from
        ``spec``'s options.

        An autoscaler's choice stands while the autoscaling config is the same; an
        external scaler's while nothing of the deployment's options changed (as in
        Ray Serve, where a redeploy that changes nothing leaves the target alone).
        """
        if self.autoscaler is not None:
            same = spec.options.autoscaling == self.spec.options.autoscaling
        else:
            same = spec.options.autoscaling is None and spec.options == self.spec.options
        return self.scaled_target if same else None

    def missing_ranks(self) -> list[int]:
        """Ranks below the target that no running or starting replica holds."""
        taken = {r.rank for r in self.replicas} | set(self.starting)
        return [rank for rank in range(self.target) if rank not in taken]

    async def cancel_starts(self) -> None:
        """Cancel the replicas the loop is starting, and wait until they gave up."""
        tasks = list(self.starting.values())
        self.starting.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def refresh_state(self) -> None:
        """The deployment's state from its facts: HEALTHY only at its target."""
        if self.message:  # e.g. reconfigure raised: every replica runs, but not as asked
            self.status = DeploymentState.UNHEALTHY
        elif len(self.replicas) >= self.target and not self.starting:
            self.status = DeploymentState.HEALTHY
        elif self.start_failures:
            self.status = DeploymentState.UNHEALTHY
        else:
            self.status = DeploymentState.UPDATING


@dataclass
class ApplicationRecord:
    spec: ApplicationSpec
    deployments: dict[str, DeploymentRecord]
    status: str = ApplicationState.DEPLOYING
    message: str = ""
    deployed_at: float = field(default_factory=time.time)
