"""A serving session: what ``tandem run`` keeps running until it is told to stop.

It deploys the applications of a config, serves HTTP, and opens the control
endpoint (:mod:`tandem._private.http.control`) through which its owner applies
new configs in place, reads the detailed status and stops it. Every
application of a new config is imported and built before any is deployed, so
a bad config changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Any

from tandem._private import api, proxies
from tandem._private.app.config_file import (
    ApplicationConfig,
    ServeConfig,
    build_applications,
    validate_config,
)
from tandem._private.app.deployment import Application
from tandem._private.app.graph import build_application
from tandem._private.app.spec import ApplicationSpec
from tandem._private.backends import Backend
from tandem._private.calls.runtime import current_runtime
from tandem._private.controller.status import Status
from tandem._private.grpc.services import read_services
from tandem._private.http.control import ControlActions, ControlApp, ControlServer
from tandem._private.http.options import ProxyLocation
from tandem._private.http.server import bind_socket
from tandem._private.http.tls import tls_context
from tandem._private.rundir import control_socket_path

logger = logging.getLogger("tandem")


class ServeSession:
    """Start with :meth:`deploy`; :meth:`wait` blocks until a stop is requested."""

    def __init__(
        self, backend: str | Backend | None, control_tcp: tuple[str, int] | None = None
    ) -> None:
        """``backend``: a name, or a backend made by ``create_backend`` (with its options);
        ``control_tcp``: also serve the control endpoint on this (host, port), with a token."""
        self._backend = backend
        self._control_tcp = control_tcp
        self.control: ControlServer | None = None
        self.stop_requested = threading.Event()

    def deploy(self, config: ServeConfig) -> str | None:
        """Deploy every application of ``config``, serve HTTP and the control endpoint;
        return the URL."""
        built = build_applications(config)
        http_options = config.http_options
        where = http_options.proxy_location(config.proxy_location)
        serve_http = where is not ProxyLocation.Disabled
        grpc_options = config.grpc_options
        if serve_http:
            tls_context(http_options)  # an unusable HTTPS file fails now, before any constructor
            read_services(grpc_options.load_servicers())  # so do bad servicer functions
        if serve_http and grpc_options.serves and grpc_options.port and http_options.host:
            advice = "tandem run --grpc-port N, or grpc_options: {port: N} in the config"
            bind_socket(http_options.host, grpc_options.port, "gRPC", advice).close()
        if http_options.host is not None:
            # A taken port fails now too; port 0 becomes a real one, which names the control
            # socket.
            probe = bind_socket(http_options.host, http_options.port)
            port = int(probe.getsockname()[1])
            probe.close()
            http_options = http_options.model_copy(update={"port": port})
        specs = _specs(config, built)
        runtime = api.open_runtime(self._backend)
        controller = runtime.controller
        assert controller is not None
        for spec in specs:
            runtime.run_sync(controller.deploy(spec))
        # HTTP starts once every application runs, so the first request finds them all,
        # and after the control endpoint: whoever finds the data port up can control it.
        self._open_control(http_options.port)
        if not serve_http:
            return None  # handles only, as Ray Serve without proxies
        url = api.serve_http_now(http_options, grpc_options)
        return http_options.root_url or url

    def _open_control(self, port: int) -> None:
        runtime = current_runtime()
        assert runtime is not None
        controller = runtime.controller
        assert controller is not None

        async def status() -> _StatusWithProxies:
            await controller.refresh_reports()
            return _StatusWithProxies(controller.status(), api.grpc_address())

        async def overview() -> dict[str, Any]:
            await controller.refresh_reports()
            return controller.overview()

        async def delete(name: str) -> bool:
            if name not in controller.app_names():
                return False
            logger.info("Deleting application %r (tandem delete).", name)
            await controller.delete(name)
            return True

        actions = ControlActions(
            status=status,
            routes=controller.route_prefixes,
            apply_config=self.apply_config,
            delete=delete,
            shutdown=self.request_stop,
            scale=controller.scale,
            logs=controller.recent_logs,
            overview=overview,
        )
        socket_path = control_socket_path(port)
        token_path = socket_path.with_suffix(".token") if self._control_tcp else None
        control = ControlServer(ControlApp(actions), socket_path, self._control_tcp, token_path)
        runtime.run_sync(control.start())
        self.control = control

    def grpc_address(self) -> str | None:
        """Where the gRPC proxy listens (``host:port``), if it serves."""
        return api.grpc_address()

    def request_stop(self) -> None:
        self.stop_requested.set()

    def wait(self) -> None:
        while not self.stop_requested.wait(0.5):
            pass

    def close(self) -> None:
        runtime = current_runtime()
        control, self.control = self.control, None
        if control is not None and runtime is not None and runtime.is_open:
            runtime.run_sync(control.stop(), timeout=30)
        api.shutdown()

    async def apply_config(self, data: Any) -> None:
        """Apply a config sent to a running server (runs on the runtime's loop)."""
        config = validate_config(data, "config")
        running = proxies.options.grpc_options
        if "grpc_options" in config.model_fields_set and config.grpc_options != running:
            # As in Ray Serve: the gRPC server keeps the options it started with.
            raise ValueError(
                "grpc_options cannot change while the server runs: leave them out of the "
                "config (or give the running ones), or restart `tandem run` with the new ones."
            )
        loop = asyncio.get_running_loop()
        # Importing user code may take a while: keep the loop serving meanwhile.
        built = await loop.run_in_executor(None, build_applications, config, True)
        runtime = current_runtime()
        assert runtime is not None and runtime.controller is not None
        controller = runtime.controller
        specs = _specs(config, built)
        wanted = {spec.name for spec in specs}
        for name in controller.app_names():
            if name not in wanted:
                logger.info("Deleting application %r: it is not in the new config.", name)
                await controller.delete(name)
        for spec in specs:
            logger.info("Deploying application %r.", spec.name)
            await controller.deploy(spec)


@dataclasses.dataclass(frozen=True)
class _StatusWithProxies:
    """The status ``tandem status`` prints, with where the gRPC proxy listens."""

    status: Status
    grpc_address: str | None

    def to_dict(self) -> dict[str, Any]:
        data = self.status.to_dict()
        if self.grpc_address is not None:
            data["grpc"] = {"address": self.grpc_address}
        return data


def _specs(
    config: ServeConfig, built: list[tuple[ApplicationConfig, Application]]
) -> list[ApplicationSpec]:
    return [
        dataclasses.replace(
            build_application(
                app,
                app_config.name,
                api.normalize_route_prefix(app_config.route_prefix),
                config.app_logging(app_config),
            ),
            autoscaling_policy=app_config.autoscaling_policy,
            external_scaler_enabled=app_config.external_scaler_enabled,
        )
        for app_config, app in built
    ]
