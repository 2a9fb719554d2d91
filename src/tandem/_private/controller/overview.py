"""What the dashboard shows, as one JSON-ready dict read from the controller's records.

For every application: its deployments (state, replicas with their pid, node,
in-flight requests, models and last failed request; the replicas lately taken
out of service; autoscaling decisions; request counts), and the edges of its
graph. An edge is a handle the bound graph passed from one deployment to
another, or calls seen at a replica from a caller the graph does not show (the
driver, another application). Request counts are cumulative, with the latency
histogram's bucket counts: the page turns two readings into rates and
percentiles, so the server keeps no history for it.

Pure reads, like :mod:`describe`; the caller refreshes the replicas' reports first.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from tandem._private.backends.base import Backend
from tandem._private.controller.describe import render_status
from tandem._private.controller.records import ApplicationRecord, RetiredReplica
from tandem._private.stats import LATENCY_BUCKETS, RequestStats, Series

# The caller of requests that came through the HTTP or gRPC proxy (or the driver).
OUTSIDE = ""


def overview(
    apps: Mapping[str, ApplicationRecord],
    backend: Backend,
    series: Iterable[tuple[str, str, str, Series]],
    queued: Mapping[tuple[str, str], int],
    retired: Iterable[RetiredReplica],
    now: float,
) -> dict[str, Any]:
    """The dashboard's view (see the module docstring). ``series`` are the per-method
    request series of /metrics (which keep what stopped replicas served); ``now`` is
    the controller's clock."""
    totals: dict[tuple[str, str], Series] = {}
    for app_name, name, _method, one in series:
        totals.setdefault((app_name, name), Series()).add(one)
    gone: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for replica in retired:
        key = (replica.deployment_id.app_name, replica.deployment_id.name)
        gone.setdefault(key, []).append(
            {
                "at": replica.at,
                "replica_id": replica.replica_id,
                "pid": replica.pid,
                "reason": replica.reason,
            }
        )
    status = render_status(apps, backend, now)
    applications = []
    for app_name, app in apps.items():
        app_status = status.applications[app_name]
        deployments = []
        for name, record in app.deployments.items():
            described = app_status.deployments[name]
            # Status lists the replicas in the records' order, with their facts.
            replicas = [
                {
                    "replica_id": shown.replica_id,
                    "state": str(shown.state),
                    "rank": shown.rank,
                    "pid": shown.pid,
                    "node": shown.node,
                    "in_flight": shown.in_flight,
                    "models": sorted(r.info.model_ids),
                    "last_failure": _failure(backend.facts(r.info).stats),
                }
                for r, shown in zip(record.replicas, described.replicas, strict=True)
            ]
            autoscaler = record.autoscaler
            deployments.append(
                {
                    "name": name,
                    "status": str(described.status),
                    "message": described.message,
                    "target_replicas": described.target_replicas,
                    "running_replicas": described.running_replicas,
                    "replica_states": {str(k): v for k, v in described.replica_states.items()},
                    "restarts": described.restarts,
                    "queued": queued.get((app_name, name), 0),
                    "series": _series(totals.get((app_name, name))),
                    "replicas": replicas,
                    "retired": gone.get((app_name, name), []),
                    "autoscaling": None
                    if autoscaler is None
                    else [
                        {
                            "at": d.at,
                            "from": d.from_replicas,
                            "to": d.to_replicas,
                            "reason": d.reason,
                        }
                        for d in autoscaler.decisions
                    ],
                }
            )
        applications.append(
            {
                "name": app_name,
                "status": str(app_status.status),
                "message": app_status.message,
                "route_prefix": app_status.route_prefix,
                "ingress": app_status.ingress,
                "deployments": deployments,
                "edges": _edges(app, backend),
            }
        )
    return {
        "time": time.time(),
        "backend": backend.name,
        "latency_buckets": list(LATENCY_BUCKETS),
        "applications": applications,
    }


def _edges(app: ApplicationRecord, backend: Backend) -> list[dict[str, Any]]:
    """The graph's handles, and callers seen at the replicas, with the calls each made."""
    seen: dict[tuple[str, str], Series] = {}
    for name, record in app.deployments.items():
        for replica in record.replicas:
            stats = backend.facts(replica.info).stats
            for caller, one in stats.by_caller.items() if stats is not None else ():
                seen.setdefault((caller, name), Series()).add(one)
    edges = []
    declared = set()
    if app.spec.route_prefix is not None:
        declared.add((OUTSIDE, app.spec.ingress))
    for spec in app.spec.deployments:
        for dependency in spec.dependencies:
            declared.add((spec.name, dependency))
    for caller, callee in sorted(declared | set(seen)):
        edges.append(
            {
                "from": caller,
                "to": callee,
                "declared": (caller, callee) in declared,
                "series": _series(seen.get((caller, callee))),
            }
        )
    return edges


def _series(series: Series | None) -> dict[str, Any]:
    if series is None:
        series = Series()
    return {
        "requests": series.requests,
        "errors": series.errors,
        "seconds": series.seconds,
        "buckets": list(series.buckets),
    }


def _failure(stats: RequestStats | None) -> dict[str, Any] | None:
    failure = stats.last_failure if stats is not None else None
    if failure is None:
        return None
    return {"at": failure.at, "request_id": failure.request_id, "error": failure.error}
