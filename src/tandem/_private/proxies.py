"""The proxies of this process's runtime: HTTP, and gRPC when ``grpc_options`` name
servicer functions.

Both run on the runtime's loop, in the process that runs the controller. They
start once an application with a route prefix runs (or ``tandem run`` asks),
start again when ``start()`` changes their options, and stop before the
applications, so requests in flight finish while their deployments still run.
gRPC listens on HTTP's interface and only where HTTP is served (Ray Serve runs
both in its proxies, which ``proxy_location="Disabled"`` turns off). The gRPC
proxy's metrics join HTTP's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from tandem._private.calls.runtime import Runtime, current_runtime
from tandem._private.grpc.metrics import GRPCMetrics
from tandem._private.grpc.options import gRPCOptions
from tandem._private.http.options import (
    DEFAULT_HOST,
    HTTPOptions,
    ProxyLocation,
    direct_ingress_enabled,
)

logger = logging.getLogger("tandem")


@dataclass
class ProxyOptions:
    """What start() configured for this process's proxies (the next ones, if none run).

    shutdown() forgets them, as Ray Serve's does: a new start begins from the defaults.
    """

    http_options: HTTPOptions = field(default_factory=HTTPOptions)
    proxy_location: ProxyLocation | None = None
    serve_http: bool = True
    grpc_options: gRPCOptions = field(default_factory=gRPCOptions)


@dataclass
class _GRPCState:
    """The gRPC server of this process's runtime, and the metrics it keeps across restarts."""

    runtime: Runtime | None = None
    server: Any = None  # a grpc.server.GRPCServer: its module needs grpcio
    metrics: GRPCMetrics = field(default_factory=GRPCMetrics)


options = ProxyOptions()
_grpc = _GRPCState()


def reset() -> None:
    """Back to the defaults (shutdown(); the proxies are stopped by then)."""
    global options, _grpc
    options = ProxyOptions()
    _grpc = _GRPCState()


def ensure(runtime: Runtime, required: bool = False) -> None:
    """Start the proxies that should run and do not; a taken port is a warning unless
    ``required`` (then OSError)."""
    if not options.serve_http:
        return
    serve_grpc = options.grpc_options.serves
    # gRPC first: once the HTTP port answers (what clients and scripts wait for),
    # the gRPC port does too.
    if serve_grpc and _grpc.server is None:
        from tandem._private.grpc.server import open_grpc

        host = options.http_options.host or DEFAULT_HOST
        try:
            _grpc.server = runtime.run_sync(
                open_grpc(runtime, options.grpc_options, host, _grpc.metrics)
            )
            _grpc.runtime = runtime
        except OSError as exc:
            if required:
                raise
            logger.warning("%s Handles still work; gRPC is not served.", exc.strerror or exc)
    if runtime.http is None:
        from tandem._private.http.app import open_http

        collectors = [_grpc.metrics] if serve_grpc else []
        try:
            runtime.http = runtime.run_sync(
                open_http(runtime, options.http_options, collectors, direct_ingress_enabled())
            )
        except OSError as exc:
            if required:
                raise
            logger.warning("%s Handles still work; HTTP is not served.", exc.strerror or exc)


async def stop(runtime: Runtime, timeout_s: float = 20.0) -> None:
    """Stop the runtime's proxies (on its loop): in-flight requests get ``timeout_s``."""
    http, runtime.http = runtime.http, None
    server = _grpc.server if _grpc.runtime is runtime else None
    if server is not None:
        _grpc.server = _grpc.runtime = None
    await asyncio.gather(*(proxy.stop(timeout_s) for proxy in (server, http) if proxy is not None))


def serve_now(
    http_options: HTTPOptions | None = None, grpc_options: gRPCOptions | None = None
) -> str | None:
    """Serve HTTP (and gRPC, if configured) now, even if no application has a route
    prefix or start() disabled the proxy (``tandem run`` does, once its applications and
    control endpoint run). Unlike run(), this raises OSError if a port is taken."""
    runtime = current_runtime()
    if runtime is None or not runtime.is_open:
        return None
    if http_options is not None:
        options.http_options = http_options
    if grpc_options is not None:
        options.grpc_options = grpc_options
    options.serve_http = True
    ensure(runtime, required=True)
    return http_url()


def http_url() -> str | None:
    """The base URL of this process's HTTP proxy, if one is running."""
    runtime = current_runtime()
    if runtime is None or runtime.http is None:
        return None
    return str(runtime.http.url)


def grpc_address() -> str | None:
    """``host:port`` of this process's gRPC proxy, if one is running."""
    server = _grpc.server
    return None if server is None else str(server.address)
