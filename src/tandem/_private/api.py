"""The module-level API: run, delete, shutdown, status and handle lookups.

These are the only functions that start or stop tandem's runtime in this
process; they run the controller's coroutines on the runtime's loop and wait.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from tandem._private.app import routes
from tandem._private.app.deployment import Application, Deployment
from tandem._private.app.graph import build_application
from tandem._private.app.logging_config import LoggingConfig
from tandem._private.app.options import describe_validation_error, logging_config_of
from tandem._private.backends import Backend, create_backend, resolve_backend_name
from tandem._private.calls.context import DeploymentID, current_replica_context
from tandem._private.calls.control_plane import ControlPlane
from tandem._private.calls.runtime import Runtime, current_runtime, set_runtime
from tandem._private.controller.controller import Controller
from tandem._private.controller.status import Status
from tandem._private.http.options import HTTPOptions
from tandem.exceptions import DeploymentUnavailableError
from tandem.handle import DeploymentHandle

_lock = threading.RLock()
_DEFAULT_PREFIX = "/"
logger = logging.getLogger("tandem")


@dataclass
class _StartOptions:
    """What start() configured for this process's runtime (the next one, if none runs).

    shutdown() forgets them, as Ray Serve's does: a new start begins from the defaults.
    """

    http_options: HTTPOptions = field(default_factory=HTTPOptions)
    serve_http: bool = True


_options = _StartOptions()


def start(
    *,
    proxy_location: str | None = None,
    http_options: HTTPOptions | dict[str, Any] | None = None,
    grpc_options: Any = None,
    logging_config: Any = None,
    **unknown: Any,
) -> None:
    """Configure HTTP before applications run (Ray Serve's ``serve.start``).

    ``http_options``: host, port (0 picks a free one), request_timeout_s, ...;
    ``proxy_location="Disabled"`` serves no HTTP. If an HTTP server already
    runs with other options, it is restarted with these.
    """
    if unknown:
        raise TypeError(
            f"tandem.start() got unknown option(s) {', '.join(sorted(unknown))}; it takes "
            "proxy_location and http_options."
        )
    servicers = (
        grpc_options.get("grpc_servicer_functions")
        if isinstance(grpc_options, dict)
        else getattr(grpc_options, "grpc_servicer_functions", None)
    )
    if servicers:  # without servicer functions, Ray Serve starts no gRPC server either
        raise ValueError(
            "tandem does not serve gRPC yet: drop grpc_servicer_functions from grpc_options "
            "(HTTP and handles serve every application)."
        )
    if logging_config is not None:
        raise ValueError(
            "start(logging_config=...) is not supported: tandem's own logs follow Python's "
            "logging configuration (or `tandem run --log-level/--log-format`); set "
            "logging_config per deployment or in run() for your replicas' logs."
        )
    with _lock:
        if http_options is not None:
            try:
                _options.http_options = (
                    http_options
                    if isinstance(http_options, HTTPOptions)
                    else HTTPOptions.model_validate(http_options)
                )
            except ValidationError as exc:
                raise ValueError(describe_validation_error(exc, "http_options")) from None
        if proxy_location is not None:
            location = getattr(proxy_location, "value", proxy_location)
            if location not in ("Disabled", "HeadOnly", "EveryNode"):
                raise ValueError(
                    f"proxy_location must be 'Disabled', 'HeadOnly' or 'EveryNode', "
                    f"got {proxy_location!r}."
                )
            _options.serve_http = location != "Disabled"
        runtime = current_runtime()
        if runtime is not None and runtime.is_open and runtime.http is not None:
            runtime.run_sync(_stop_http(runtime))
            if _options.serve_http:
                _ensure_http(runtime)


def serve_http_now(http_options: HTTPOptions | None = None) -> str | None:
    """Serve HTTP now, even if no application has a route prefix or start() disabled
    the proxy (``tandem run`` does, once its applications and control endpoint run).

    Unlike run(), this raises OSError if the port is taken.
    """
    runtime = current_runtime()
    if runtime is None or not runtime.is_open:
        return None
    if http_options is not None:
        _options.http_options = http_options
    _options.serve_http = True
    _ensure_http(runtime, required=True)
    return http_url()


def http_url() -> str | None:
    """The base URL of this process's HTTP proxy, if one is running."""
    runtime = current_runtime()
    if runtime is None or runtime.http is None:
        return None
    return str(runtime.http.url)


def _ensure_http(runtime: Runtime, required: bool = False) -> None:
    """Start the proxy once, on the runtime's loop; a taken port is a warning unless required."""
    if runtime.http is not None or not _options.serve_http:
        return
    from tandem._private.http.app import open_http

    try:
        runtime.http = runtime.run_sync(open_http(runtime, _options.http_options))
    except OSError as exc:
        if required:
            raise
        logger.warning("%s Handles still work; HTTP is not served.", exc.strerror or exc)


async def _stop_http(runtime: Runtime, timeout_s: float = 20.0) -> None:
    http, runtime.http = runtime.http, None
    if http is not None:
        await http.stop(timeout_s)


def normalize_route_prefix(route_prefix: str | None) -> str | None:
    return routes.normalize_route_prefix(route_prefix)


def _controller(runtime: Runtime) -> ControlPlane:
    if runtime.controller is None:
        raise RuntimeError(
            "This process does not run tandem's controller; call this from the driver."
        )
    return runtime.controller


def open_runtime(backend: str | Backend | None) -> Runtime:
    """This process's runtime, started on ``backend`` (a name, or a backend made by
    ``create_backend``) if none runs; None means $TANDEM_BACKEND, else the default."""
    with _lock:
        runtime = current_runtime()
        if runtime is not None and runtime.is_open:
            wanted = backend.name if isinstance(backend, Backend) else backend
            if wanted is not None and runtime.backend_name != resolve_backend_name(wanted):
                raise ValueError(
                    f"tandem already runs here with the {runtime.backend_name!r} backend; "
                    f"call tandem.shutdown() before using the {wanted!r} backend."
                )
            if isinstance(backend, Backend):
                raise ValueError("tandem already runs here; call tandem.shutdown() first.")
            return runtime
        if not isinstance(backend, Backend):
            backend = create_backend(resolve_backend_name(backend))
        backend_name = backend.name
        backend.prepare()
        # At exit, stop the replicas before the libraries they use (Ray registers its
        # own handler when imported; handlers run last-in first-out).
        atexit.unregister(shutdown)
        atexit.register(shutdown)
        runtime = Runtime(backend.connect)
        runtime.backend_name = backend_name
        runtime.open()

        async def open_controller() -> Controller:
            controller = Controller(backend, runtime.publish, queued=runtime.queued)
            await controller.open()
            return controller

        try:
            runtime.controller = runtime.run_sync(open_controller())
        except BaseException:
            runtime.close()
            raise
        set_runtime(runtime)
        return runtime


def run(
    target: Application,
    *,
    blocking: bool = False,
    name: str = "default",
    route_prefix: str | None = _DEFAULT_PREFIX,
    logging_config: LoggingConfig | dict[str, Any] | None = None,
    backend: str | None = None,
    _local_testing_mode: bool = False,
    external_scaler_enabled: bool = False,
) -> DeploymentHandle:
    """Deploy an application (or update it in place) and return its ingress handle.

    ``logging_config`` applies to the application's deployments that set none of
    their own. ``external_scaler_enabled``: the replica counts are set from outside
    (the control endpoint's scale request); no deployment may autoscale then.
    Returns once every replica has been constructed. A constructor that raises
    makes ``run`` raise DeploymentFailedError with the original traceback, and
    leaves no part of the new version running.
    """
    if isinstance(target, Deployment):
        raise TypeError(f"tandem.run() takes an application; call {target.name}.bind(...) first.")
    if not isinstance(target, Application):
        raise TypeError(
            "tandem.run() takes an application built with Deployment.bind(), "
            f"got {type(target).__name__}."
        )
    if not isinstance(name, str) or not name:
        raise ValueError(f"The application name must be a non-empty string, got {name!r}.")
    prefix = normalize_route_prefix(route_prefix)
    if backend is not None or _local_testing_mode:
        resolve_backend_name("local" if _local_testing_mode else backend)  # a bad name fails now
    app_logging = logging_config_of(logging_config, f"application {name!r}")
    if not isinstance(external_scaler_enabled, bool):
        raise TypeError(
            f"external_scaler_enabled must be True or False, got {external_scaler_enabled!r}."
        )
    spec = build_application(target, name, prefix, app_logging)
    spec = dataclasses.replace(spec, external_scaler_enabled=external_scaler_enabled)
    runtime = open_runtime("local" if _local_testing_mode else backend)
    runtime.run_sync(_controller(runtime).deploy(spec))
    if prefix is not None:
        _ensure_http(runtime)
    handle = DeploymentHandle(spec.ingress, name)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            shutdown()
    return handle


def delete(name: str, _blocking: bool = True) -> None:
    """Delete an application: its replicas drain and stop. Unknown names are ignored."""
    runtime = current_runtime()
    if runtime is None or not runtime.is_open:
        return
    runtime.run_sync(_controller(runtime).delete(name))


def shutdown() -> None:
    """Stop every application and tandem's runtime in this process."""
    global _options
    with _lock:
        runtime = current_runtime()
        if runtime is not None and runtime.on_loop_thread():
            raise RuntimeError("tandem.shutdown() cannot be called from inside a deployment.")
        _options = _StartOptions()
        if runtime is None:
            return
        try:
            # HTTP first: requests in flight finish while their deployments still run.
            if runtime.is_open:
                runtime.run_sync(_stop_http(runtime), timeout=60)
            if runtime.is_open and runtime.controller is not None:
                runtime.run_sync(runtime.controller.close(), timeout=120)
        finally:
            set_runtime(None)
            runtime.close()


def status() -> Status:
    """Applications → deployments → state, replica counts and the last error message."""
    runtime = current_runtime()
    if runtime is None or not runtime.is_open or runtime.controller is None:
        return Status(backend="", applications={})
    controller = runtime.controller
    if runtime.on_loop_thread():
        return controller.status()

    async def read() -> Status:
        await controller.refresh_reports()
        return controller.status()

    return runtime.run_sync(read())


def _running() -> Runtime:
    runtime = current_runtime()
    if runtime is None or not runtime.is_open:
        raise DeploymentUnavailableError(
            "tandem is not running in this process; start an application with tandem.run() first."
        )
    return runtime


def get_app_handle(name: str) -> DeploymentHandle:
    """A handle to the ingress deployment of the application ``name``."""
    runtime = _running()
    controller = _controller(runtime)
    ingress = controller.ingress(name)
    if ingress is None:
        known = ", ".join(repr(n) for n in controller.app_names()) or "none"
        raise DeploymentUnavailableError(
            f"There is no application {name!r}; running applications: {known}."
        )
    return DeploymentHandle(ingress, name)


def get_deployment_handle(deployment_name: str, app_name: str | None = None) -> DeploymentHandle:
    """A handle to a deployment; ``app_name`` defaults to the caller's own application."""
    runtime = _running()
    if app_name is None:
        context = current_replica_context()
        if context is not None:
            app_name = context.app_name
        elif runtime.controller is not None and len(runtime.controller.app_names()) == 1:
            app_name = runtime.controller.app_names()[0]
        else:
            raise ValueError(
                "Pass app_name= to get_deployment_handle(): it cannot be inferred outside a "
                "deployment when zero or several applications run."
            )
    if not runtime.knows(DeploymentID(app_name, deployment_name)):
        raise DeploymentUnavailableError(
            f"There is no deployment {deployment_name!r} in application {app_name!r}."
        )
    return DeploymentHandle(deployment_name, app_name)
