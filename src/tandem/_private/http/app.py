"""Putting the HTTP side together: proxy + admin + metrics behind one server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tandem._private.http.admin import Admin
from tandem._private.http.metrics import ProxyMetrics
from tandem._private.http.options import HTTPOptions
from tandem._private.http.proxy import Proxy
from tandem._private.http.server import HTTPServer
from tandem._private.runtime import Runtime


async def open_http(
    runtime: Runtime,
    options: HTTPOptions,
    shutdown: Callable[[], None] | None = None,
    apply_config: Callable[[Any], Awaitable[None]] | None = None,
) -> HTTPServer:
    """Serve the runtime's applications over HTTP; runs on the runtime's loop."""
    controller = runtime.controller
    assert controller is not None
    metrics = ProxyMetrics(controller.status, controller.deployment_series)
    admin = Admin(
        status=controller.status,
        refresh=controller.refresh_reports,
        routes=controller.route_prefixes,
        metrics=metrics.render,
        shutdown=shutdown,
        apply_config=apply_config,
    )
    proxy = Proxy(runtime, controller.routes, admin, options, metrics)
    server = HTTPServer(proxy, options)
    await server.start()
    return server
