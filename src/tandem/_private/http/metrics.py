"""Prometheus metrics of the proxy, in a registry of its own (no global state).

The proxy counts into plain Python numbers (it runs on one event loop, so no
locks are needed, and a request costs a few dict operations instead of the
locked updates of prometheus-client's metric objects); a collector turns the
counts into Prometheus families when /metrics is scraped. The same registry
exports the custom metrics of replicas and of the driver (``user_metrics.py``).
A scrape first asks replicas elsewhere for fresh reports (at most one round per
``REFRESH_INTERVAL_S``, however often /metrics is asked for).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tandem._private.http.user_metrics import ReplicaReports, UserMetrics
from tandem._private.stats import Series

_LABELS = ["application", "deployment", "method"]

# (application, deployment, method, series) for every replica's methods.
DeploymentSeries = Callable[[], Iterable[tuple[str, str, str, Series]]]
# (application, deployment, reason) -> count, for replica restarts and failed starts.
EventCounts = Callable[[], dict[tuple[str, str, str], int]]

# A scrape refreshes replicas' reports unless the last refresh is younger than this.
REFRESH_INTERVAL_S = 0.5


@dataclass
class _Series:
    """Counts for one (application, deployment, method)."""

    by_status: dict[Any, int] = field(default_factory=dict)
    by_error: dict[str, int] = field(default_factory=dict)
    latency: Series = field(default_factory=Series)


class RequestCounts:
    """The requests one proxy (HTTP or gRPC) answered, in plain numbers: by status and
    error kind, their latency, and those in flight per application."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._in_flight: dict[str, int] = {}

    def started(self, app: str) -> None:
        self._in_flight[app] = self._in_flight.get(app, 0) + 1

    def observe(
        self, app: str, deployment: str, method: str, status: Any, seconds: float, error: str | None
    ) -> None:
        """One request that :meth:`started` ended with ``status`` (and ``error``, if it failed)."""
        self._in_flight[app] -= 1
        key = (app, deployment, method)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.by_status[status] = series.by_status.get(status, 0) + 1
        series.latency.observe(seconds, error is not None)
        if error is not None:
            series.by_error[error] = series.by_error.get(error, 0) + 1

    def in_flight(self, app: str) -> int:
        return self._in_flight.get(app, 0)

    def add(self, other: RequestCounts, in_flight: bool = True) -> None:
        """Add ``other``'s counts to these (its requests in flight too, if ``in_flight``)."""
        for key, theirs in other._series.items():
            ours = self._series.get(key)
            if ours is None:
                ours = self._series[key] = _Series()
            for status, count in theirs.by_status.items():
                ours.by_status[status] = ours.by_status.get(status, 0) + count
            for error, count in theirs.by_error.items():
                ours.by_error[error] = ours.by_error.get(error, 0) + count
            ours.latency.add(theirs.latency)
        if in_flight:
            for app, count in other._in_flight.items():
                self._in_flight[app] = self._in_flight.get(app, 0) + count

    @property
    def empty(self) -> bool:
        return not self._series and not self._in_flight

    def families(self, prefix: str, noun: str, failures: str, latency: str) -> list[Any]:
        """The four families ``{prefix}_requests``, ``_request_errors``,
        ``_request_latency_seconds`` and ``_requests_in_flight``."""
        requests = CounterMetricFamily(
            f"{prefix}_requests",
            f"{noun} answered, by status code.",
            labels=[*_LABELS, "status_code"],
        )
        errors = CounterMetricFamily(
            f"{prefix}_request_errors",
            f"{noun} that failed ({failures}), by error.",
            labels=[*_LABELS, "error"],
        )
        latencies = HistogramMetricFamily(
            f"{prefix}_request_latency_seconds", latency, labels=_LABELS
        )
        for key, series in list(self._series.items()):
            for status, count in sorted(series.by_status.items()):
                requests.add_metric([*key, str(status)], count)
            for error, count in sorted(series.by_error.items()):
                errors.add_metric([*key, error], count)
            latencies.add_metric(
                list(key), series.latency.cumulative_buckets(), series.latency.seconds
            )
        in_flight = GaugeMetricFamily(
            f"{prefix}_requests_in_flight", f"{noun} being served now.", labels=["application"]
        )
        for app, count in sorted(self._in_flight.items()):
            in_flight.add_metric([app], count)
        return [requests, errors, latencies, in_flight]


class ProxyMetrics(RequestCounts, Collector):
    """Requests, errors, latency and in-flight requests per application, deployment and method."""

    def __init__(
        self,
        status: Callable[[], Any],
        deployment_series: DeploymentSeries,
        restarts: EventCounts = dict,
        start_failures: EventCounts = dict,
        user_metrics: ReplicaReports = list,
        refresh: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        proxy_counts: Callable[[], dict[str, RequestCounts]] = dict,
    ) -> None:
        self._status = status
        # Direct ingress: the counts of the replica processes' own proxies, as last
        # reported, by replica; those of replicas gone since, folded into one.
        self._proxy_counts = proxy_counts
        self._reported: dict[str, RequestCounts] = {}
        self._gone = RequestCounts()
        self._deployment_series = deployment_series
        self._restarts = restarts
        self._start_failures = start_failures
        self._refresh = refresh
        self._clock = clock
        self._refreshed_at = float("-inf")
        self._refreshing = asyncio.Lock()
        super().__init__()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.registry.register(UserMetrics(user_metrics))

    def _all_counts(self) -> RequestCounts:
        """This proxy's counts plus those of every ingress process's proxy."""
        reported = self._proxy_counts()
        if not reported and not self._reported:
            return self
        for replica_id, counts in self._reported.items():
            if replica_id not in reported:  # gone: its answered requests still count
                self._gone.add(counts, in_flight=False)
        self._reported = dict(reported)
        total = RequestCounts()
        for counts in (self, self._gone, *reported.values()):
            total.add(counts)
        return total

    def collect(self) -> Iterator[Any]:
        yield from self._all_counts().families(
            "tandem_http",
            "HTTP requests",
            "status >= 500, timeouts, disconnects",
            "Time from receiving a request to the end of its response.",
        )
        replicas = GaugeMetricFamily(
            "tandem_deployment_replicas",
            "Replicas of each deployment, by state.",
            labels=["application", "deployment", "state"],
        )
        for app_status in self._status().applications.values():
            for dep in app_status.deployments.values():
                for state, count in sorted(dep.replica_states.items()):
                    replicas.add_metric([app_status.name, dep.name, state], count)
                if not dep.replica_states:
                    replicas.add_metric([app_status.name, dep.name, "RUNNING"], 0)
        yield replicas
        yield from self._replica_events()
        yield from self._deployment_families()

    def _replica_events(self) -> Iterator[Any]:
        """Replicas replaced and starts that failed, by deployment and reason."""
        labels = ["application", "deployment", "reason"]
        restarts = CounterMetricFamily(
            "tandem_replica_restarts",
            "Replicas taken out of service and replaced (reason: exited, health_check).",
            labels=labels,
        )
        for key, count in sorted(self._restarts().items()):
            restarts.add_metric(list(key), count)
        failures = CounterMetricFamily(
            "tandem_replica_start_failures",
            "Replica starts that failed and will be retried (reason: constructor, refused, "
            "backend).",
            labels=labels,
        )
        for key, count in sorted(self._start_failures().items()):
            failures.add_metric(list(key), count)
        yield from (restarts, failures)

    def _deployment_families(self) -> Iterator[Any]:
        """Calls served by replicas (through handles and HTTP), per deployment method."""
        requests = CounterMetricFamily(
            "tandem_deployment_requests",
            "Calls served by the replicas of a deployment.",
            labels=_LABELS,
        )
        errors = CounterMetricFamily(
            "tandem_deployment_request_errors",
            "Calls that raised, by deployment and method.",
            labels=_LABELS,
        )
        latency = HistogramMetricFamily(
            "tandem_deployment_request_latency_seconds",
            "Time a replica spent serving a call (queueing excluded).",
            labels=_LABELS,
        )
        expired = CounterMetricFamily(
            "tandem_deployment_deadline_exceeded",
            "Calls whose deadline passed: dropped before they started, in a caller's "
            "queue or a replica's (stage=queued), or cancelled while they ran "
            "(stage=running).",
            labels=[*_LABELS, "stage"],
        )
        totals: dict[tuple[str, str, str], Series] = {}
        for app, deployment, method, series in self._deployment_series():
            totals.setdefault((app, deployment, method), Series()).add(series)
        for key, total in sorted(totals.items()):
            requests.add_metric(list(key), total.requests)
            errors.add_metric(list(key), total.errors)
            latency.add_metric(list(key), total.cumulative_buckets(), total.seconds)
            if total.dropped or total.timed_out:
                expired.add_metric([*key, "queued"], total.dropped)
                expired.add_metric([*key, "running"], total.timed_out)
        yield from (requests, errors, latency, expired)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """Render, after refreshing replicas' reports if the last refresh is not recent."""
        if self._refresh is not None:
            async with self._refreshing:  # concurrent scrapes share one refresh
                if self._clock() - self._refreshed_at >= REFRESH_INTERVAL_S:
                    await self._refresh()
                    self._refreshed_at = self._clock()
        return self.render()
