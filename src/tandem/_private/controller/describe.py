"""What the controller reports: status records and request series, read from its records.

Pure reads of the controller's records and of what the backend last learned
about each replica (:meth:`Backend.facts`); the one-line message of a
deployment that is not at its target is written here, so ``tandem status``,
``tandem.status()`` and the control endpoint say the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from tandem._private.backends.base import Backend
from tandem._private.controller.records import (
    ApplicationRecord,
    DeploymentRecord,
    ReplicaRecord,
)
from tandem._private.controller.status import (
    ApplicationState,
    ApplicationStatus,
    DeploymentState,
    DeploymentStatus,
    ReplicaState,
    ReplicaStatus,
    Status,
)
from tandem._private.stats import ReplicaRow, Series


def describe_deployment(record: DeploymentRecord, now: float) -> str:
    """One sentence on what is missing, the last error and the next try."""
    running, target = len(record.replicas), record.target
    if record.status == DeploymentState.HEALTHY:
        return ""
    text = f"{running} of {target} replicas running"
    if record.starting:
        text += f", {len(record.starting)} starting"
    if record.start_failures:
        wait = max(0.0, record.retry_at - now)
        text += (
            f"; starting a replica failed {record.start_failures} time(s) in a row, "
            f"last: {record.last_error}; "
            + ("trying again now" if record.starting else f"next try in {wait:.1f} s")
        )
    return text + "."


def render_status(apps: Mapping[str, ApplicationRecord], backend: Backend, now: float) -> Status:
    """Every application, deployment and replica as ``tandem.status()`` returns them."""
    applications = {}
    for name, app in apps.items():
        deployments = {
            dname: _deployment_status(dname, record, backend, now)
            for dname, record in app.deployments.items()
        }
        app_status = app.status
        if app_status == ApplicationState.RUNNING and any(
            d.status == DeploymentState.UNHEALTHY for d in deployments.values()
        ):
            app_status = ApplicationState.UNHEALTHY
        applications[name] = ApplicationStatus(
            name=name,
            status=app_status,
            message=app.message,
            route_prefix=app.spec.route_prefix,
            ingress=app.spec.ingress,
            last_deployed_time_s=app.deployed_at,
            deployments=deployments,
        )
    return Status(backend=backend.name, applications=applications)


def _deployment_status(
    name: str, record: DeploymentRecord, backend: Backend, now: float
) -> DeploymentStatus:
    replicas = []
    for r in record.replicas:
        facts = backend.facts(r.info)
        replicas.append(
            ReplicaStatus(
                replica_id=r.replica_id,
                state=r.state,
                rank=r.rank,
                pid=facts.pid,
                in_flight=facts.in_flight,
                node=facts.node,
            )
        )
    states: dict[str, int] = {}
    for r in record.replicas:
        states[r.state] = states.get(r.state, 0) + 1
    for state, count in (
        (ReplicaState.STARTING, len(record.starting)),
        (ReplicaState.STOPPING, record.stopping),
        (ReplicaState.FAILED, record.start_failures),
    ):
        if count:
            states[state] = states.get(state, 0) + count
    autoscaler = record.autoscaler
    return DeploymentStatus(
        name=name,
        status=record.status,
        message=record.message or describe_deployment(record, now),
        target_replicas=record.target,
        last_scaling_decision=(
            autoscaler.last_decision.reason
            if autoscaler is not None and autoscaler.last_decision
            else ""
        ),
        running_replicas=states.get(ReplicaState.RUNNING, 0),
        replica_states=states,
        restarts=record.restarts,
        replicas=tuple(replicas),
    )


def each_replica(
    apps: Mapping[str, ApplicationRecord],
) -> Iterator[tuple[str, str, ReplicaRecord]]:
    """(application, deployment, replica) of every replica in the records."""
    for app_name, app in apps.items():
        for name, record in app.deployments.items():
            for replica in record.replicas:
                yield app_name, name, replica


def request_series(
    apps: Mapping[str, ApplicationRecord], backend: Backend
) -> list[tuple[str, str, str, Any]]:
    """(application, deployment, method, series) of every replica, for /metrics, and
    the calls that replicas' processes dropped before sending them (``caller_drops``)."""
    out = []
    for app_name, name, replica in each_replica(apps):
        facts = backend.facts(replica.info)
        stats = facts.stats
        for method, series in stats.by_method.items() if stats is not None else ():
            out.append((app_name, name, method, series))
        out.extend(dropped_series(facts.caller_drops or {}))
    return out


def replica_rows(apps: Mapping[str, ApplicationRecord], backend: Backend) -> list[ReplicaRow]:
    """Every replica, as /metrics shows it (``http.replica_metrics``)."""
    rows = []
    for app_name, name, replica in each_replica(apps):
        facts = backend.facts(replica.info)
        rows.append(
            ReplicaRow(
                app_name,
                name,
                replica.replica_id,
                replica.state,
                replica.info.model_ids,
                facts.in_flight,
                facts.stats,
            )
        )
    return rows


def dropped_series(drops: Mapping[tuple[str, str, str], int]) -> list[tuple[str, str, str, Any]]:
    """Calls a caller dropped before sending them, as series of dropped calls."""
    return [(*key, Series(dropped=count)) for key, count in drops.items()]


def user_metric_reports(
    apps: Mapping[str, ApplicationRecord], backend: Backend
) -> list[tuple[str, Any]]:
    """(replica id, its latest tandem.metrics report or None) of every replica, for /metrics."""
    return [
        (replica.replica_id, backend.facts(replica.info).user_metrics)
        for _, _, replica in each_replica(apps)
    ]


def proxy_counts(apps: Mapping[str, ApplicationRecord], backend: Backend) -> dict[str, Any]:
    """Replica id -> the request counts its process's own proxy reported (direct ingress)."""
    return {
        replica.replica_id: counts
        for _, _, replica in each_replica(apps)
        if (counts := backend.facts(replica.info).proxy_counts) is not None
    }
