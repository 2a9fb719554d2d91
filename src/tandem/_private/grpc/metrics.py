"""Prometheus metrics of the gRPC proxy: the gRPC counterpart of the HTTP proxy's.

Counted in plain numbers on the runtime's loop, turned into families when
``/metrics`` is scraped (this collector joins the HTTP proxy's registry).
The families mirror ``tandem_http_*``, with the gRPC status code's name
(``OK``, ``INTERNAL``, ...) where HTTP has its number, and the RPC's full
method (``/package.Service/Method``) where HTTP has its verb:

- ``tandem_grpc_requests{application, deployment, method, status_code}``
- ``tandem_grpc_request_errors{application, deployment, method, error}``: ``server_error``
  (INTERNAL), ``timeout``, ``cancelled`` (the client left), ``backpressure``, ``unavailable``
- ``tandem_grpc_request_latency_seconds{application, deployment, method}``
- ``tandem_grpc_requests_in_flight{application}``

Like HTTP's 404s, RPCs for no application (NOT_FOUND) are only in the access log.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tandem._private.stats import Series

_LABELS = ["application", "deployment", "method"]


@dataclass
class _RPCSeries:
    """Counts for one (application, deployment, RPC method)."""

    by_code: dict[str, int] = field(default_factory=dict)
    by_error: dict[str, int] = field(default_factory=dict)
    latency: Series = field(default_factory=Series)


class GRPCMetrics(Collector):
    """RPCs, errors, latency and RPCs in flight per application, deployment and method."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str], _RPCSeries] = {}
        self._in_flight: dict[str, int] = {}

    def started(self, app: str) -> None:
        self._in_flight[app] = self._in_flight.get(app, 0) + 1

    def observe(
        self, app: str, deployment: str, method: str, code: str, seconds: float, error: str | None
    ) -> None:
        """One RPC that :meth:`started` ended with status ``code`` (its name)."""
        self._in_flight[app] -= 1
        key = (app, deployment, method)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _RPCSeries()
        series.by_code[code] = series.by_code.get(code, 0) + 1
        series.latency.observe(seconds, error is not None)
        if error is not None:
            series.by_error[error] = series.by_error.get(error, 0) + 1

    def in_flight(self, app: str) -> int:
        return self._in_flight.get(app, 0)

    def collect(self) -> Iterator[Any]:
        if not self._series and not self._in_flight:
            return  # no gRPC served yet: no empty families in every scrape
        requests = CounterMetricFamily(
            "tandem_grpc_requests",
            "gRPC requests answered, by status code.",
            labels=[*_LABELS, "status_code"],
        )
        errors = CounterMetricFamily(
            "tandem_grpc_request_errors",
            "gRPC requests that failed (INTERNAL, timeouts, cancellations, shed), by error.",
            labels=[*_LABELS, "error"],
        )
        latency = HistogramMetricFamily(
            "tandem_grpc_request_latency_seconds",
            "Time from receiving an RPC to its status.",
            labels=_LABELS,
        )
        for key, series in list(self._series.items()):
            for code, count in sorted(series.by_code.items()):
                requests.add_metric([*key, code], count)
            for error, count in sorted(series.by_error.items()):
                errors.add_metric([*key, error], count)
            latency.add_metric(
                list(key), series.latency.cumulative_buckets(), series.latency.seconds
            )
        in_flight = GaugeMetricFamily(
            "tandem_grpc_requests_in_flight",
            "gRPC requests being served now.",
            labels=["application"],
        )
        for app, count in sorted(self._in_flight.items()):
            in_flight.add_metric([app], count)
        yield from (requests, errors, latency, in_flight)
