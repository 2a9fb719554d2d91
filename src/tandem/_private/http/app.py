"""Putting the data port together: proxy + its own endpoints + metrics behind one server."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.registry import Collector

from tandem._private.app.backpressure import BackpressureConfig
from tandem._private.calls.runtime import Runtime
from tandem._private.http.direct import IngressPlanner
from tandem._private.http.endpoints import proxy_endpoints
from tandem._private.http.metrics import ProxyMetrics
from tandem._private.http.options import HTTPOptions
from tandem._private.http.proxy import Proxy
from tandem._private.http.replica_metrics import ReplicaMetrics
from tandem._private.http.server import HTTPServer


async def open_http(
    runtime: Runtime,
    options: HTTPOptions,
    collectors: Iterable[Collector] = (),
    direct: bool = False,
) -> HTTPServer:
    """Serve the runtime's applications over HTTP; runs on the runtime's loop.

    ``collectors``: more metrics for /metrics (the gRPC proxy's). ``direct``: ingress
    replicas serve HTTP on the same port too (http/direct.py).
    """
    controller = runtime.controller
    assert controller is not None
    metrics = ProxyMetrics(
        controller.status,
        controller.deployment_series,
        restarts=lambda: controller.replica_restarts,
        start_failures=lambda: controller.start_failures,
        user_metrics=controller.user_metrics,
        refresh=controller.refresh_reports,
        proxy_counts=controller.proxy_counts,
    )
    metrics.registry.register(ReplicaMetrics(controller.replica_rows, controller.queued_requests))
    for collector in collectors:
        metrics.registry.register(collector)
    endpoints = proxy_endpoints(routes=controller.route_prefixes, metrics=metrics.scrape)

    def backpressure(app: str, deployment: str) -> BackpressureConfig | None:
        deployed = controller.deployment_options(app, deployment)
        return None if deployed is None else deployed.backpressure_config

    proxy = Proxy(runtime, controller.routes, endpoints, options, metrics, backpressure)
    if direct:
        controller.serve_direct(None, None)  # refuses, before the port is bound, if it cannot
    server = HTTPServer(proxy, options, reuse_port=direct)
    await server.start()
    if direct:
        bound = options.model_copy(update={"port": server.address[1]})
        planner = IngressPlanner(controller, bound, metrics.scrape)
        planner.start()
        server.on_stop.append(planner.stop)
    return server
