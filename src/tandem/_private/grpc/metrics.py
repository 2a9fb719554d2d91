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
from typing import Any

from prometheus_client.registry import Collector

from tandem._private.http.metrics import RequestCounts


class GRPCMetrics(RequestCounts, Collector):
    """RPCs, errors, latency and RPCs in flight per application, deployment and method."""

    def collect(self) -> Iterator[Any]:
        if self.empty:
            return  # no gRPC served yet: no empty families in every scrape
        yield from self.families(
            "tandem_grpc",
            "gRPC requests",
            "INTERNAL, timeouts, cancellations, shed",
            "Time from receiving an RPC to its status.",
        )
