"""Direct ingress: an ingress replica's process serves HTTP itself.

On the process backend a request through the driver's proxy crosses three
processes (proxy, ingress, the deployments it calls), and the one proxy is the
ceiling of the whole server. With direct ingress (``tandem run
--direct-ingress``, or ``TANDEM_DIRECT_INGRESS=1``) every replica of an
application's ingress deployment also listens on the data port: the driver's
proxy and these processes share it with ``SO_REUSEPORT``, the kernel spreads
connections across them, and a request accepted by an ingress process is
served by the replica in that process, without a hop.

Each of these proxies is the driver's proxy (``proxy.Proxy``): the same limits,
timeouts, request ids, error bodies, backpressure answers and access log; it
routes every application, so a request for another application's prefix
still gets there (through this process's handles). The driver sends each
ingress process an :class:`IngressPlan` (options, route table, backpressure
settings) whenever one of them changes; a replica that stops serving as an
ingress, or stops, closes its listener first and finishes what it accepted.
The requests a process served are counted here and reported with the
replica's facts; the driver's ``/metrics`` adds them to its own, and the
``/metrics`` of an ingress process is the driver's (asked over the control
line), so every listener tells the same numbers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tandem._private.app.backpressure import BackpressureConfig
from tandem._private.calls.runtime import Runtime
from tandem._private.http import logs
from tandem._private.http.endpoints import proxy_endpoints
from tandem._private.http.metrics import RequestCounts
from tandem._private.http.options import DIRECT_INGRESS_ENV as ENV
from tandem._private.http.options import HTTPOptions
from tandem._private.http.options import direct_ingress_enabled as enabled
from tandem._private.http.proxy import Proxy
from tandem._private.http.server import HTTPServer

logger = logging.getLogger("tandem.proxy")

__all__ = ["ENV", "DirectIngress", "IngressPlan", "IngressPlanner", "enabled"]

# How long an ingress process's proxy lets accepted requests finish when it stops.
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class IngressPlan:
    """What an ingress process needs to serve HTTP as the driver's proxy does."""

    options: HTTPOptions  # with the port the driver's proxy actually listens on
    routes: tuple[tuple[str, str, str], ...]  # (prefix, application, ingress deployment)
    backpressure: dict[tuple[str, str], BackpressureConfig] = field(default_factory=dict)
    logging: dict[str, Any] | None = None  # the driver's configure_logging() arguments

    def serves(self, app: str, deployment: str) -> bool:
        """Whether a replica of ``deployment`` in ``app`` listens under this plan."""
        return any(a == app and d == deployment for _, a, d in self.routes)


class DirectIngress:
    """The HTTP proxy of one ingress replica's process (see the module docstring).

    ``metrics`` returns the driver's /metrics page.
    """

    def __init__(
        self, runtime: Runtime, app: str, deployment: str, metrics: Callable[[], Awaitable[bytes]]
    ) -> None:
        self._runtime = runtime
        self._app = app
        self._deployment = deployment
        self._metrics = metrics
        self._plan: IngressPlan | None = None
        self._server: HTTPServer | None = None
        self.counts = RequestCounts()

    async def update(self, plan: IngressPlan | None) -> None:
        """Serve under ``plan`` (None, or a plan without this deployment: stop serving)."""
        if plan is not None and not plan.serves(self._app, self._deployment):
            plan = None
        previous, self._plan = self._plan, plan
        logging_setup = None if plan is None else plan.logging
        if logging_setup is not None and (previous is None or previous.logging != logging_setup):
            logs.configure_logging(**logging_setup)  # the access log, as the driver writes it
        same_options = (
            plan is not None and previous is not None and plan.options == previous.options
        )
        if self._server is not None and not same_options:
            server, self._server = self._server, None
            await server.stop(STOP_TIMEOUT_S)
        if plan is None or self._server is not None:
            return  # stopped, or serving already (new routes are read per request)
        server = HTTPServer(self._proxy(plan.options), plan.options, reuse_port=True)
        try:
            await server.start()
        except (OSError, ValueError) as exc:
            logger.warning(
                "The ingress replica of %r could not serve HTTP itself (%s); the driver's "
                "proxy serves its requests.",
                self._app,
                exc,
            )
            return
        self._server = server

    async def stop(self) -> None:
        await self.update(None)

    def _proxy(self, options: HTTPOptions) -> Proxy:
        def routes() -> tuple[tuple[str, str, str], ...]:
            plan = self._plan
            return () if plan is None else plan.routes

        def prefixes() -> dict[str, str]:
            return {prefix: app for prefix, app, _ in routes()}

        def backpressure(app: str, deployment: str) -> BackpressureConfig | None:
            plan = self._plan
            return None if plan is None else plan.backpressure.get((app, deployment))

        endpoints = proxy_endpoints(routes=prefixes, metrics=self._metrics)
        return Proxy(self._runtime, routes, endpoints, options, self.counts, backpressure)


class IngressPlanner:
    """The driver's side: sends the backend a new plan whenever the routes or the
    logging setup change.

    ``controller`` is the runtime's ControlPlane (calls/control_plane.py);
    ``options`` carry the port the driver's proxy listens on; ``metrics`` renders
    the driver's /metrics.
    """

    def __init__(
        self,
        controller: Any,
        options: HTTPOptions,
        metrics: Callable[[], Awaitable[bytes]],
    ) -> None:
        self._controller = controller
        self._options = options
        self._metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    def start(self) -> None:
        """Publish now and on every change (it runs on the runtime's loop)."""
        self._loop = asyncio.get_running_loop()
        self._controller.routes_changed.append(self.publish)
        logs.on_configured.append(self._publish_soon)
        self.publish()

    def _publish_soon(self) -> None:
        """From any thread (configure_logging runs in the caller's)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.publish)

    def publish(self) -> None:
        if self._stopped:  # a late call: the ingress processes were told to stop
            return
        routes = self._controller.routes()
        backpressure = {}
        for _, app, ingress in routes:
            options = self._controller.deployment_options(app, ingress)
            if options is not None and options.backpressure_config is not None:
                backpressure[(app, ingress)] = options.backpressure_config
        plan = IngressPlan(self._options, routes, backpressure, logs.last_config)
        self._controller.serve_direct(plan, self._metrics)

    def stop(self) -> None:
        self._stopped = True
        if self.publish in self._controller.routes_changed:
            self._controller.routes_changed.remove(self.publish)
        if self._publish_soon in logs.on_configured:
            logs.on_configured.remove(self._publish_soon)
        self._controller.serve_direct(None, None)
