"""The module-level API: run, delete, shutdown, status and handle lookups.

These are the only functions that start or stop tandem's runtime in this
process; they run the controller's coroutines on the runtime's loop and wait.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pydantic import ValidationError

from tandem._private import proxies, tracing
from tandem._private.app import routes
from tandem._private.app.deployment import Application, Deployment
from tandem._private.app.graph import build_application
from tandem._private.app.logging_config import LoggingConfig
from tandem._private.app.options import describe_validation_error, logging_config_of
from tandem._private.backends import Backend, create_backend, resolve_backend_name
from tandem._private.backends.local import LocalBackend
from tandem._private.calls.context import DeploymentID, current_replica_context
from tandem._private.calls.control_plane import ControlPlane
from tandem._private.calls.runtime import Runtime, current_runtime, set_runtime
from tandem._private.controller.controller import Controller
from tandem._private.controller.status import Status
from tandem._private.grpc.options import gRPCOptions
from tandem._private.grpc.services import read_services
from tandem._private.http.logs import configure_logging
from tandem._private.http.options import HTTPOptions, ProxyLocation
from tandem._private.http.tls import tls_context
from tandem.exceptions import DeploymentUnavailableError
from tandem.handle import DeploymentHandle

_lock = threading.RLock()
_DEFAULT_PREFIX = "/"
logger = logging.getLogger("tandem")


def start(
    *,
    proxy_location: str | None = None,
    http_options: HTTPOptions | dict[str, Any] | None = None,
    grpc_options: gRPCOptions | dict[str, Any] | None = None,
    logging_config: Any = None,
    **unknown: Any,
) -> None:
    """Configure the proxies before applications run (Ray Serve's ``serve.start``).

    ``http_options``: host, port (0 picks a free one), root_path, HTTPS files
    (``ssl_*``, loaded now: a bad one raises ValueError here), request_timeout_s, ...;
    ``proxy_location="Disabled"`` serves neither HTTP nor gRPC. ``grpc_options``: port,
    grpc_servicer_functions (imported now; none: no gRPC server), request_timeout_s,
    enable_reflection. A proxy that runs is restarted with the new options.
    """
    if unknown:
        raise TypeError(
            f"tandem.start() got unknown option(s) {', '.join(sorted(unknown))}; it takes "
            "proxy_location, http_options, grpc_options and logging_config."
        )
    grpc = _grpc_options(grpc_options)
    system_logging = logging_config_of(logging_config, "tandem.start()")
    with _lock:
        if system_logging is not None:
            # As Ray Serve's: the logs of the system itself (controller, proxy, access
            # log); replicas follow their deployment's or application's logging_config.
            configure_logging(
                system_logging.log_level,
                json_format=system_logging.encoding == "JSON",
                logs_dir=system_logging.logs_dir,
                access_log=system_logging.enable_access_log,
                attributes=system_logging.additional_log_standard_attrs,
            )
        requested = None if proxy_location is None else ProxyLocation.of(proxy_location)
        options = proxies.options
        if http_options is not None:
            try:
                http = (
                    http_options
                    if isinstance(http_options, HTTPOptions)
                    else HTTPOptions.model_validate(http_options)
                )
            except ValidationError as exc:
                raise ValueError(describe_validation_error(exc, "http_options")) from None
            tls_context(http)  # a bad key, certificate or password fails now
            options.http_options = http
        if grpc is not None:
            options.grpc_options = grpc
        if requested is not None:
            options.proxy_location = requested
        if http_options is not None or requested is not None:
            where = options.http_options.proxy_location(options.proxy_location)
            options.serve_http = where is not ProxyLocation.Disabled
        runtime = current_runtime()
        serving = runtime is not None and (
            runtime.http is not None or proxies.grpc_address() is not None
        )
        if runtime is not None and runtime.is_open and serving:
            runtime.run_sync(proxies.stop(runtime))
            proxies.ensure(runtime)


def _grpc_options(given: gRPCOptions | dict[str, Any] | None) -> gRPCOptions | None:
    """``grpc_options`` as start() takes them: validated, their servicer functions
    imported (ImportError naming the extra to install when grpcio is missing)."""
    if given is None:
        return None
    try:
        options = given if isinstance(given, gRPCOptions) else gRPCOptions.model_validate(given)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, "grpc_options")) from None
    read_services(options.load_servicers())  # a function that registers no service fails now
    return options


serve_http_now = proxies.serve_now
http_url = proxies.http_url
grpc_address = proxies.grpc_address


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
        runtime = _new_runtime(backend)
        set_runtime(runtime)
        return runtime


def _new_runtime(backend: Backend) -> Runtime:
    """A runtime with its controller, on ``backend`` (not yet this process's runtime)."""
    backend.prepare()
    tracing.configure()  # from the environment as it is now, before anything is served
    # At exit, stop the replicas before the libraries they use (Ray registers its
    # own handler when imported; handlers run last-in first-out).
    atexit.unregister(shutdown)
    atexit.register(shutdown)
    runtime = Runtime(backend.connect)
    runtime.backend_name = backend.name
    runtime.open()

    async def open_controller() -> Controller:
        controller = Controller(
            backend, runtime.publish, queued=runtime.queued, drops=runtime.deadline_drops
        )
        await controller.open()
        return controller

    try:
        runtime.controller = runtime.run_sync(open_controller())
    except BaseException:
        runtime.close()
        raise
    return runtime


# Applications run in local testing mode while another backend's runtime runs here:
# Ray Serve runs those in-process, apart from the rest, and so does this runtime.
_testing_runtime: Runtime | None = None


def _local_testing_runtime() -> Runtime:
    """Where ``run(..., _local_testing_mode=True)`` deploys: this process's runtime if
    it is (or will be) a local one, else a local runtime of its own whose handles and
    replicas call each other, and nothing else."""
    global _testing_runtime
    with _lock:
        runtime = current_runtime()
        if runtime is None or not runtime.is_open or runtime.backend_name == "local":
            return open_runtime("local")
        if _testing_runtime is None or not _testing_runtime.is_open:
            backend = LocalBackend()
            _testing_runtime = _new_runtime(backend)
            backend.runtime = _testing_runtime
        return _testing_runtime


def run(
    target: Application,
    *,
    blocking: bool = False,
    name: str = "default",
    route_prefix: str | None = _DEFAULT_PREFIX,
    logging_config: LoggingConfig | dict[str, Any] | None = None,
    backend: str | None = None,
    _local_testing_mode: bool = False,
    controller_options: Any = None,
    external_scaler_enabled: bool = False,
) -> DeploymentHandle[Any]:
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
    _refuse_controller_options(controller_options)
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
    runtime = _local_testing_runtime() if _local_testing_mode else open_runtime(backend)
    runtime.run_sync(_controller(runtime).deploy(spec))
    handle: DeploymentHandle[Any] = DeploymentHandle(spec.ingress, name)
    if runtime is _testing_runtime:
        handle._runtime = runtime  # no HTTP either: Ray serves none in local testing mode
    elif prefix is not None:
        proxies.ensure(runtime)
    if blocking:
        _block_until_interrupted()
    return handle


def _refuse_controller_options(options: Any) -> None:
    """Ray Serve's ``controller_options`` configure its controller actor (a runtime_env);
    tandem's controller runs in this process, so only empty options are taken."""
    given = options if isinstance(options, dict) else getattr(options, "__dict__", options)
    if options is None or given == {} or (isinstance(given, dict) and not any(given.values())):
        return
    raise ValueError(
        "controller_options is not supported: tandem's controller runs in this process, "
        "not in an actor with a runtime_env of its own. Leave controller_options out (set "
        "runtime_env on the deployments' ray_actor_options instead)."
    )


def _block_until_interrupted() -> None:
    """``blocking=True``: serve until Ctrl-C, then shut down."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shutdown()


def delete(name: str, _blocking: bool = True) -> None:
    """Delete an application: its replicas drain and stop. Unknown names are ignored."""
    runtime = current_runtime()
    if runtime is None or not runtime.is_open:
        return
    runtime.run_sync(_controller(runtime).delete(name))


def shutdown() -> None:
    """Stop every application and tandem's runtime in this process."""
    global _testing_runtime
    with _lock:
        runtime = current_runtime()
        if runtime is not None and runtime.on_loop_thread():
            raise RuntimeError("tandem.shutdown() cannot be called from inside a deployment.")
        proxies.reset()
        testing, _testing_runtime = _testing_runtime, None
        if testing is not None:
            _close(testing)
        if runtime is None:
            return
        try:
            _close(runtime, before_close=lambda: set_runtime(None))
        finally:
            set_runtime(None)
            tracing.flush()  # the spans of the last requests, before the process may exit


def _close(runtime: Runtime, before_close: Callable[[], None] = lambda: None) -> None:
    """Stop the proxies (requests in flight finish while their deployments still run),
    then the applications, then the loop."""
    try:
        if runtime.is_open:
            runtime.run_sync(proxies.stop(runtime), timeout=60)
        if runtime.is_open and runtime.controller is not None:
            runtime.run_sync(runtime.controller.close(), timeout=120)
    finally:
        before_close()  # the process's runtime is unset before its loop goes
        runtime.close()


def status() -> Status:
    """Applications → deployments → state, replica counts and the last error message."""
    runtime = current_runtime()
    if runtime is None or not runtime.is_open:
        return Status(backend="", applications={})
    if runtime.controller is None:  # in a replica: the driver knows
        if runtime.driver_status is None:
            raise RuntimeError(
                "tandem.status() inside a replica works on the local and process backends; "
                "on the ray backend, call it from the driver (or `tandem status`)."
            )
        driver_status = runtime.driver_status
        return cast(Status, runtime.run_sync(driver_status()))
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


def get_app_handle(name: str) -> DeploymentHandle[Any]:
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


def get_deployment_handle(
    deployment_name: str, app_name: str | None = None
) -> DeploymentHandle[Any]:
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
    if not runtime.knows(DeploymentID(name=deployment_name, app_name=app_name)):
        raise DeploymentUnavailableError(
            f"There is no deployment {deployment_name!r} in application {app_name!r}."
        )
    return DeploymentHandle(deployment_name, app_name)


@dataclass(frozen=True)
class RunTarget:
    """One application for :func:`run_many` (Ray Serve's ``RunTarget``)."""

    target: Application
    name: str = "default"
    route_prefix: str | None = _DEFAULT_PREFIX
    logging_config: LoggingConfig | dict[str, Any] | None = None
    external_scaler_enabled: bool = False


def run_many(
    targets: list[RunTarget] | tuple[RunTarget, ...],
    *,
    blocking: bool = False,
    wait_for_ingress_deployment_creation: bool = True,
    wait_for_applications_running: bool = True,
    _local_testing_mode: bool = False,
    controller_options: Any = None,
    backend: str | None = None,
) -> list[DeploymentHandle[Any]]:
    """Deploy several applications and return their ingress handles, in order.

    Every target is checked (types, names, route prefixes unique among them) before
    the first deploys. Like run(), each returns once its replicas are constructed:
    tandem has no "deploying in the background" state to return earlier in, so the
    two ``wait_for_*`` flags only ever make it wait, as True does.
    """
    targets = list(targets)
    for target in targets:
        if not isinstance(target, RunTarget):
            raise TypeError(
                f"tandem.run_many() takes RunTarget objects, got {type(target).__name__}."
            )
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"Application names must be unique in run_many(), got {names}.")
    prefixes = [p for t in targets if (p := normalize_route_prefix(t.route_prefix)) is not None]
    if len(set(prefixes)) != len(prefixes):
        raise ValueError(f"Route prefixes must be unique in run_many(), got {prefixes}.")
    handles = [
        run(
            t.target,
            name=t.name,
            route_prefix=t.route_prefix,
            logging_config=t.logging_config,
            external_scaler_enabled=t.external_scaler_enabled,
            controller_options=controller_options,
            backend=backend,
            _local_testing_mode=_local_testing_mode,
        )
        for t in targets
    ]
    if blocking:
        _block_until_interrupted()
    return handles


async def shutdown_async() -> None:
    """shutdown() for async code: stops everything without blocking the caller's loop."""
    await asyncio.to_thread(shutdown)


def get_trace_context() -> Any:
    """The OpenTelemetry context of the request being served: spans started with it
    (``tracer.start_as_current_span(name, context=tandem.get_trace_context())``) are
    children of the request's span. None while tracing is off, as in Ray Serve."""
    return tracing.get_trace_context()
