"""The ``tandem`` command: run, status, shutdown, build, deploy, delete, logs.

Thin by design: parse the command line, build a config, hand it to a
:class:`ServeSession` (``run``) or to a running server's control endpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from tandem._private.cli.dashboard import dashboard
from tandem._private.cli.flags import control_options, grpc_flags
from tandem._private.cli.logs import logs

if TYPE_CHECKING:
    pass

# Marks the server process that a --reload watcher runs (hidden; the watcher adds it).
_RELOADED_FLAG = "--reloaded"


class _Failure(click.ClickException):
    """An error the user can fix: printed without a traceback, exit code 1."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tandem-serve", prog_name="tandem")
def cli() -> None:
    """Serve compositions of models and business logic (Ray Serve's API, embedded)."""


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("import_path")
@click.argument("arguments", nargs=-1)
@click.option("--host", default=None, help="Interface to listen on [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port to listen on [default: 8000].")
@click.option(
    "--route-prefix", default=None, help="HTTP path prefix of the application [default: /]."
)
@click.option("--name", default=None, help="Application name [default: default].")
@click.option(
    "--backend",
    type=click.Choice(["local", "process", "ray"]),
    default=None,
    help="Where replicas run [default: $TANDEM_BACKEND or process].",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster to run replicas on, e.g. 10.0.0.5:6379 "
    "(implies --backend ray) [default: $RAY_ADDRESS, else a new local Ray].",
)
@click.option(
    "--working-dir",
    default=None,
    help="Directory (or remote .zip URI) shipped to every replica on Ray and made its "
    "working directory, as Ray's runtime_env working_dir (implies --backend ray).",
)
@click.option(
    "--runtime-env-json",
    default=None,
    help='Ray runtime_env for every replica, as JSON, e.g. \'{"pip": ["emoji"]}\' '
    "(implies --backend ray).",
)
@click.option("--reload", is_flag=True, help="Restart when files in the working directory change.")
@click.option(_RELOADED_FLAG, "reloaded", is_flag=True, hidden=True)
@click.option("--request-timeout-s", type=float, default=None, help="Answer 408 after this long.")
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=0),
    default=None,
    help="Answer 413 to a request body larger than this [default: 100 MiB].",
)
@click.option(
    "--max-header-bytes",
    type=click.IntRange(min=1024),
    default=None,
    help="Answer 431 (and close) when a request line and headers exceed this [default: 64 KiB].",
)
@click.option(
    "--header-timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Answer 408 (and close) when a request line and headers take longer [default: 30].",
)
@click.option(
    "--keep-alive-timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Close a kept-alive connection idle this long [default: 5].",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=None,
    help="Answer 503 (and close) to connections past this many "
    "[default: the open-file limit less a reserve of 25%, at least 256].",
)
@grpc_flags
@click.option(
    "--direct-ingress",
    is_flag=True,
    help="Ingress replicas serve HTTP on the port themselves too, sharing it with the proxy "
    "(process backend; same as TANDEM_DIRECT_INGRESS=1).",
)
@click.option(
    "--control-port",
    type=int,
    default=None,
    help="Also serve the control endpoint on this TCP port, for tandem status/deploy/shutdown "
    "from another machine; requests need the token the server writes to a 0600 file "
    "[default: only the owner's Unix socket].",
)
@click.option(
    "--control-host",
    default="127.0.0.1",
    show_default=True,
    help="Interface of the control port (needs --control-port).",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--log-level", default="INFO", show_default=True)
def run(
    import_path: str,
    arguments: tuple[str, ...],
    host: str | None,
    port: int | None,
    route_prefix: str | None,
    name: str | None,
    backend: str | None,
    address: str | None,
    working_dir: str | None,
    runtime_env_json: str | None,
    reload: bool,
    reloaded: bool,
    request_timeout_s: float | None,
    max_body_bytes: int | None,
    max_header_bytes: int | None,
    header_timeout_s: float | None,
    keep_alive_timeout_s: float | None,
    max_connections: int | None,
    grpc_port: int | None,
    grpc_servicer_functions: tuple[str, ...],
    grpc_request_timeout_s: float | None,
    grpc_enable_reflection: bool | None,
    direct_ingress: bool,
    control_port: int | None,
    control_host: str,
    log_format: str,
    log_level: str,
) -> None:
    """Serve IMPORT_PATH until Ctrl-C or SIGTERM.

    IMPORT_PATH is module:app (a bound application), module:builder followed by
    key=value ARGUMENTS for the builder, or a config file (.yaml/.json).
    """
    if reload:
        _run_with_reload()
        return
    if direct_ingress:  # read where HTTP starts; replica processes inherit it
        from tandem._private.http.options import DIRECT_INGRESS_ENV

        os.environ[DIRECT_INGRESS_ENV] = "1"
    from tandem._private.cli.run_options import (
        grpc_options_with,
        http_options_with,
        ray_settings,
    )

    try:
        chosen = ray_settings(backend, address, working_dir, runtime_env_json)
    except (ValueError, ImportError) as exc:
        raise _Failure(str(exc)) from None
    from tandem._private.app.config_file import (
        ApplicationConfig,
        ServeConfig,
        is_config_path,
        load_config,
    )
    from tandem._private.app.importing import parse_cli_args
    from tandem._private.cli.serving import ServeSession
    from tandem._private.http.limits import raise_open_file_limit
    from tandem._private.http.logs import configure_logging

    configure_logging(log_level, json_format=log_format == "json")
    # Before the server (whose default max_connections derives from it) and the replicas
    # (which inherit it) start.
    raise_open_file_limit()
    try:
        if is_config_path(import_path):
            if arguments:
                raise ValueError(
                    "A config file takes no key=value arguments; put them under args:."
                )
            config = load_config(import_path)
            if name or route_prefix:
                raise ValueError(
                    "--name and --route-prefix apply to an import path, not a config file."
                )
        else:
            config = ServeConfig(
                applications=[
                    ApplicationConfig(
                        name=name or "default",
                        route_prefix=route_prefix or "/",
                        import_path=import_path,
                        args=parse_cli_args(arguments),
                    )
                ]
            )
        http = http_options_with(
            config.http_options,
            host=host,
            port=port,
            request_timeout_s=request_timeout_s,
            max_body_bytes=max_body_bytes,
            max_header_bytes=max_header_bytes,
            header_timeout_s=header_timeout_s,
            keep_alive_timeout_s=keep_alive_timeout_s,
            max_connections=max_connections,
        )
        grpc = grpc_options_with(
            config.grpc_options,
            port=grpc_port,
            grpc_servicer_functions=list(grpc_servicer_functions) or None,
            request_timeout_s=grpc_request_timeout_s,
            enable_reflection=grpc_enable_reflection,
        )
        config = config.model_copy(update={"http_options": http, "grpc_options": grpc})
    except ValueError as exc:
        raise _Failure(str(exc)) from None

    session = ServeSession(chosen, None if control_port is None else (control_host, control_port))
    stops = 0
    first_stop = 0.0
    # Under --reload, one Ctrl-C reaches us twice: from the terminal and from the watcher.
    dedup_s = 2.0 if reloaded else 0.0

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stops, first_stop
        if stops and time.monotonic() - first_stop < dedup_s:
            return
        stops += 1
        first_stop = first_stop or time.monotonic()
        if stops > 1:
            click.echo("tandem: stopping now.", err=True)
            os._exit(130)
        click.echo(
            "tandem: shutting down (in-flight requests finish; Ctrl-C again to force).", err=True
        )
        session.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        url = session.deploy(config)
    except Exception as exc:
        session.close()
        raise _Failure(str(exc)) from None
    names = ", ".join(repr(a.name) for a in config.applications)
    where = f"at {url}" if url else "without HTTP (proxy_location: Disabled)"
    click.echo(f"tandem: serving {names} {where} (Ctrl-C to stop)", err=True)
    grpc_address = session.grpc_address()
    if grpc_address is not None:
        click.echo(f"tandem: gRPC at {grpc_address}", err=True)
    _describe_control(session, config.http_options.host)
    try:
        session.wait()
    finally:
        session.close()
    click.echo("tandem: stopped.", err=True)


def _describe_control(session: Any, http_host: str | None) -> None:
    """Say where the control endpoint is, and warn about what the network can reach."""
    control = session.control
    if control is None:
        return
    if http_host is not None and not _is_loopback(http_host):
        click.echo(
            f"tandem: --host {http_host}: the data port is reachable from the network; "
            "the control endpoint is not (it is a Unix socket only you can use).",
            err=True,
        )
    click.echo(f"tandem: control socket {control.socket_path} (owner only)", err=True)
    if control.tcp_address is not None:
        host, port = control.tcp_address
        click.echo(f"tandem: control port {host}:{port}, token in {control.token_path}", err=True)
        if not _is_loopback(host):
            click.echo(
                f"tandem: --control-host {host}: the control port is reachable from the "
                "network; its token travels in clear text unless you tunnel it (see "
                "SECURITY.md).",
                err=True,
            )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _run_with_reload() -> None:
    import watchfiles

    argv = [a for a in sys.argv[1:] if a != "--reload"]
    argv.insert(argv.index("run") + 1, _RELOADED_FLAG)
    command = shlex.join([sys.executable, "-m", "tandem", *argv])
    click.echo(f"tandem: watching {os.getcwd()} for changes", err=True)
    # The watcher stops on KeyboardInterrupt, which Python raises only if SIGINT was not
    # ignored when it started; a background job of a non-interactive shell starts with it
    # ignored. The server process sets its own handler either way, so without this it
    # would stop on Ctrl-C and leave the watcher running for ever.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watchfiles.run_process(".", target=command, target_type="command")
    except KeyboardInterrupt:
        pass


@cli.command()
@control_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def status(address: str, control: str | None, token_file: str | None, as_json: bool) -> None:
    """Print the applications of a running server, with replica details and errors."""
    data = _request(address, control, token_file, "GET", "/-/status")
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@cli.command()
@control_options
def shutdown(address: str, control: str | None, token_file: str | None) -> None:
    """Stop a running server gracefully."""
    _request(address, control, token_file, "POST", "/-/shutdown")
    click.echo("tandem: the server is shutting down.")


@cli.command()
@click.argument("name")
@control_options
def delete(name: str, address: str, control: str | None, token_file: str | None) -> None:
    """Delete the application NAME from a running server (its replicas drain and stop)."""
    from urllib.parse import quote

    _request(address, control, token_file, "DELETE", f"/-/applications/{quote(name, safe='')}")
    click.echo(f"tandem: deleted {name!r}.")


@cli.command()
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@control_options
def deploy(config_file: str, address: str, control: str | None, token_file: str | None) -> None:
    """Apply CONFIG_FILE to a running server (it keeps its applications if the file is bad)."""
    from tandem._private.app.config_file import load_config

    try:
        config = load_config(config_file)
    except ValueError as exc:
        raise _Failure(str(exc)) from None
    body = config.model_dump(mode="json", exclude_unset=True)
    _request(address, control, token_file, "PUT", "/-/applications", body)
    click.echo(f"tandem: applied {config_file}.")


@cli.command()
@click.argument("import_paths", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write here instead of stdout.",
)
@click.option(
    "--grpc-servicer-functions",
    multiple=True,
    help="Import path of an add_XServicer_to_server function for the config's grpc_options "
    "(repeat for several).",
)
def build(
    import_paths: tuple[str, ...], output: str | None, grpc_servicer_functions: tuple[str, ...]
) -> None:
    """Write a config file for one or more IMPORT_PATHS (module:app)."""
    from tandem._private.app.importing import build_app, import_attribute

    applications = []
    for index, import_path in enumerate(import_paths):
        try:
            app = build_app(import_attribute(import_path), {}, import_path)
        except ValueError as exc:
            raise _Failure(str(exc)) from None
        applications.append(
            {
                "name": "default" if len(import_paths) == 1 else f"app{index + 1}",
                "route_prefix": "/" if len(import_paths) == 1 else f"/app{index + 1}",
                "import_path": import_path,
                "args": {},
                "deployments": _deployment_entries(app),
            }
        )
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        **(
            {"grpc_options": {"port": 9000, "grpc_servicer_functions": [*grpc_servicer_functions]}}
            if grpc_servicer_functions
            else {}
        ),
        "applications": applications,
    }
    text = yaml.safe_dump(config, sort_keys=False)
    if output:
        Path(output).write_text(text)
        click.echo(f"tandem: wrote {output}.", err=True)
    else:
        click.echo(text.rstrip())


def _deployment_entries(app: Any) -> list[dict[str, Any]]:
    from tandem._private.app.graph import build_application

    entries = []
    for spec in build_application(app, "default", "/").deployments:
        entry: dict[str, Any] = {"name": spec.name}
        options = spec.options
        entry["num_replicas"] = options.num_replicas if options.num_replicas is not None else 1
        entry["max_ongoing_requests"] = options.max_ongoing_requests
        if options.user_config is not None:
            entry["user_config"] = options.user_config
        if options.autoscaling_config is not None:
            entry["autoscaling_config"] = options.autoscaling_config.model_dump(exclude_none=True)
            entry.pop("num_replicas")
        if options.ray_actor_options is not None:
            entry["ray_actor_options"] = options.ray_actor_options.model_dump(exclude_none=True)
        entries.append(entry)
    return entries


def _request(
    address: str,
    control: str | None,
    token_file: str | None,
    method: str,
    path: str,
    body: Any = None,
) -> Any:
    from tandem._private.cli.control_client import ControlError, find_control, request

    try:
        return request(find_control(address, control, token_file), method, path, body)
    except ControlError as exc:
        raise _Failure(str(exc)) from None


cli.add_command(logs)
cli.add_command(dashboard)


def main() -> None:
    cli(prog_name="tandem")
