"""Prometheus metrics of the proxy, in a registry of its own (no global state)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


class _ReplicaCounts(Collector):
    """Replicas per deployment and state, read from status() at scrape time."""

    def __init__(self, status: Callable[[], Any]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tandem_deployment_replicas",
            "Replicas of each deployment, by state.",
            labels=["application", "deployment", "state"],
        )
        for app in self._status().applications.values():
            for dep in app.deployments.values():
                for state, count in dep.replica_states.items():
                    family.add_metric([app.name, dep.name, state], count)
                if not dep.replica_states:
                    family.add_metric([app.name, dep.name, "RUNNING"], 0)
        yield family


class ProxyMetrics:
    """Requests, errors, latency and in-flight requests per application, deployment and method."""

    def __init__(self, status: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["application", "deployment", "method"]
        self.requests = Counter(
            "tandem_http_requests",
            "HTTP requests answered, by status code.",
            [*labels, "status_code"],
            registry=self.registry,
        )
        self.errors = Counter(
            "tandem_http_request_errors",
            "HTTP requests that failed (status >= 500, timeouts and disconnects), by error.",
            [*labels, "error"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tandem_http_request_latency_seconds",
            "Time from receiving a request to the end of its response.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tandem_http_requests_in_flight",
            "HTTP requests being served now.",
            ["application"],
            registry=self.registry,
        )
        self.registry.register(_ReplicaCounts(status))

    def observe(
        self, app: str, deployment: str, method: str, status: int, seconds: float, error: str | None
    ) -> None:
        self.requests.labels(app, deployment, method, str(status)).inc()
        self.latency.labels(app, deployment, method).observe(seconds)
        if error is not None:
            self.errors.labels(app, deployment, method, error).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
