"""The control endpoint: deploy, shutdown and detailed status, for the server's owner only.

``tandem run`` serves it on a Unix socket in the owner's private directory
(:mod:`tandem._private.rundir`, mode 0700), itself mode 0600, and checks
every connecting process's user id (``SO_PEERCRED``): only the user who runs
the server may use it. On request it also serves a TCP port, bound to
127.0.0.1 unless told otherwise, where every request must carry a random
bearer token that the server keeps in a 0600 file beside the socket.

It answers (JSON):

    GET  /-/healthz        "success"
    GET  /-/status         the detailed status (pids, replica ids, errors)
    GET  /-/routes         route prefix -> application
    PUT  /-/applications   apply a config file's content; applications it omits are deleted
    DELETE /-/applications/NAME   delete one application
    POST /-/shutdown       stop the server gracefully
    GET  /-/logs           the replicas' recent log lines (?app=, deployment=, replica=,
                           request_id=, limit=N; follow=1 streams new ones as NDJSON;
                           see :mod:`.control_logs`)
    GET  /-/dashboard      the dashboard page (its state: /-/dashboard/state;
                           ``tandem dashboard`` shows it in a browser)
    POST /api/v1/applications/APP/deployments/NAME/scale
                           set a deployment's replica count (Ray Serve's external
                           scaler API: {"target_num_replicas": N}; only for
                           applications deployed with external_scaler_enabled)

Nothing here is reachable from the data port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from tandem._private.app.external_scaler import ExternalScalerDisabledError, ScaleDeploymentRequest
from tandem._private.app.options import validation_problems
from tandem._private.dashboard.routes import dashboard_routes
from tandem._private.http.control_logs import ReadLogs, logs_response
from tandem._private.http.limits import ConnectionLimits, Refusals, protocol_class
from tandem._private.http.server import bind_socket

logger = logging.getLogger("tandem.control")

# Control requests are small; a config file of a few hundred applications fits.
MAX_CONTROL_BODY = 16 * 1024 * 1024
MAX_SCALE_BODY = 64 * 1024  # {"target_num_replicas": N} is a few bytes
# Only the owner (or a token holder) gets past the first request, but anyone who
# reaches a TCP control port could hold connections open before that.
CONTROL_LIMITS = ConnectionLimits(
    max_header_bytes=64 * 1024, header_timeout_s=10.0, max_connections=64
)
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass
class ControlActions:
    """What the control endpoint can do; each runs on the runtime's loop.

    ``apply_config`` raises ValueError for a config it refuses. ``scale(app,
    deployment, n)`` raises LookupError for an unknown application or deployment
    and ExternalScalerDisabledError when its application did not enable the
    external scaler (None: this server scales nothing from outside).
    """

    status: Callable[[], Awaitable[Any]]
    routes: Callable[[], dict[str, str]]
    apply_config: Callable[[Any], Awaitable[None]]
    delete: Callable[[str], Awaitable[bool]]  # False if there is no such application
    shutdown: Callable[[], None]
    scale: Callable[[str, str, int], Awaitable[None]] | None = None
    # Controller.recent_logs (controller/logs.py); None: no GET /-/logs.
    logs: ReadLogs | None = None
    # What the dashboard draws (Controller.overview); None: this server has no dashboard.
    overview: Callable[[], Awaitable[dict[str, Any]]] | None = None


_KNOWN = (
    "GET /-/healthz, GET /-/status, GET /-/routes, PUT /-/applications, "
    "DELETE /-/applications/NAME, POST /-/shutdown, GET /-/logs, GET /-/dashboard and "
    "POST /api/v1/applications/APP/deployments/NAME/scale"
)


class ControlApp:
    """The control endpoint's ASGI app (see the module docstring); to add a control
    request, add an action to :class:`ControlActions` and a route here."""

    def __init__(self, actions: ControlActions) -> None:
        self._actions = actions
        self.closing = asyncio.Event()  # set as the server stops: followed logs end
        self._router = Router(
            [
                Route("/-/healthz", self._healthz, methods=["GET"]),
                Route("/-/status", self._status, methods=["GET"]),
                Route("/-/routes", self._routes, methods=["GET"]),
                Route("/-/applications", self._apply, methods=["PUT"]),
                Route("/-/applications/{name:path}", self._delete, methods=["DELETE"]),
                Route("/-/shutdown", self._shutdown, methods=["POST"]),
                Route("/-/logs", self._logs, methods=["GET"]),
                Route(
                    "/api/v1/applications/{app}/deployments/{deployment}/scale",
                    self._scale,
                    methods=["POST"],
                ),
                *(dashboard_routes(actions.overview) if actions.overview is not None else ()),
            ],
            redirect_slashes=False,
            default=_not_a_control_request,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await self._router(scope, receive, send)

    async def _healthz(self, request: Request) -> Response:
        return PlainTextResponse("success")

    async def _status(self, request: Request) -> Response:
        return JSONResponse((await self._actions.status()).to_dict())

    async def _routes(self, request: Request) -> Response:
        return JSONResponse(self._actions.routes())

    async def _logs(self, request: Request) -> Response:
        if self._actions.logs is None:
            return JSONResponse({"error": "This server keeps no logs."}, status_code=404)
        return await logs_response(request, self._actions.logs, self.closing)

    async def _shutdown(self, request: Request) -> Response:
        self._actions.shutdown()
        return JSONResponse({"shutting_down": True})

    async def _delete(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not await self._actions.delete(name):
            return JSONResponse({"error": f"There is no application {name!r}."}, status_code=404)
        return JSONResponse({"deleted": name})

    async def _apply(self, request: Request) -> Response:
        body = await _read_body(request, MAX_CONTROL_BODY)
        if body is None:
            return JSONResponse(
                {"error": f"The config is larger than {MAX_CONTROL_BODY} bytes."},
                status_code=413,
            )
        try:
            config = json.loads(body)
        except ValueError as exc:
            return JSONResponse({"error": f"The body is not JSON: {exc}"}, status_code=400)
        try:
            await self._actions.apply_config(config)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Exception as exc:  # the owner may see it: this is the control endpoint
            logger.exception("Applying a config failed")
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
        return JSONResponse({"applied": True})

    async def _scale(self, request: Request) -> Response:
        """Ray Serve's scale request, with the status codes of its dashboard: 400 for a
        bad body, 404 for an unknown application or deployment, 412 when the
        application did not enable the external scaler."""
        app, deployment = request.path_params["app"], request.path_params["deployment"]
        body = await _read_body(request, MAX_SCALE_BODY)
        if body is None:
            return JSONResponse(
                {"error": f"The request body is larger than {MAX_SCALE_BODY} bytes."},
                status_code=413,
            )
        try:
            wanted = ScaleDeploymentRequest.model_validate(json.loads(body))
        except ValidationError as exc:
            problems = "; ".join(
                f"{where or 'the body'}: {what}" for where, what, _ in validation_problems(exc)
            )
            return _scale_refused(400, f'{problems} (send {{"target_num_replicas": N}}, N >= 0)')
        except ValueError as exc:
            return _scale_refused(400, f"the body is not JSON: {exc}")
        if self._actions.scale is None:
            return JSONResponse(
                {"error": "This server does not scale deployments from outside."}, status_code=404
            )
        try:
            await self._actions.scale(app, deployment, wanted.target_num_replicas)
        except LookupError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except ExternalScalerDisabledError as exc:
            return JSONResponse({"error": str(exc)}, status_code=412)
        except Exception as exc:  # the owner may see it: this is the control endpoint
            logger.exception("Scaling %s of %s failed", deployment, app)
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=503)
        return JSONResponse(
            {
                "message": f"Deployment {deployment!r} of application {app!r} scales to "
                f"{wanted.target_num_replicas} replica(s); replicas start or stop in the "
                "background."
            }
        )


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None once it grows past ``limit`` bytes."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return body


def _scale_refused(status: int, why: str) -> Response:
    return JSONResponse({"error": f"Invalid request body: {why}"}, status_code=status)


async def _not_a_control_request(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope)
    response = JSONResponse(
        {
            "error": f"{request.method} {request.url.path} is not a control request; the "
            f"control endpoint answers {_KNOWN}."
        },
        status_code=404,
    )
    await response(scope, receive, send)


class _RequireToken:
    """Lets through only requests that carry ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
        if not hmac.compare_digest(given, self._expected):
            response = JSONResponse(
                {
                    "error": "This control port needs the token of the server's token file "
                    "(Authorization: Bearer TOKEN; tandem's --token-file does this)."
                },
                status_code=401,
                headers={"www-authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self._app(scope, receive, send)


class _OwnerOnly:
    """Mixed into an HTTP protocol: hang up on processes of other users (Unix sockets)."""

    transport: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        uid = peer_uid(sock) if sock is not None else None
        if uid is not None and uid != os.getuid():
            logger.warning(
                "Refused a control connection from user id %d (only %d may control this server).",
                uid,
                os.getuid(),
            )
            self.transport = transport  # connection_lost, which follows, closes it
            transport.abort()
            return
        super().connection_made(transport)  # type: ignore[misc]


def _protocol(owner_only: bool) -> type[Any]:
    http = protocol_class(CONTROL_LIMITS, Refusals(CONTROL_LIMITS), parser="h11")
    if not owner_only:
        return http
    return type("OwnerOnlyHTTP", (_OwnerOnly, http), {})


def peer_uid(sock: Any) -> int | None:
    """The user id of the process at the other end of a Unix socket, where the OS tells."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None or sock.family != socket.AF_UNIX:
        return None
    _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size))
    return int(uid)


class ControlServer:
    """Serves :class:`ControlApp` on a Unix socket (and optionally a TCP port with a token).

    Start with :meth:`start` on the runtime's loop; :meth:`stop` removes the
    socket and token files it made.
    """

    def __init__(
        self,
        app: ControlApp,
        socket_path: Path,
        tcp: tuple[str, int] | None = None,
        token_path: Path | None = None,
    ) -> None:
        self._app = app
        self.socket_path = socket_path
        self._tcp = tcp
        self.token_path = token_path
        self.tcp_address: tuple[str, int] | None = None
        self._servers: list[tuple[uvicorn.Server, asyncio.Task[None], socket.socket]] = []
        self._made: list[Path] = []

    async def start(self) -> None:
        unix = _bind_unix(self.socket_path)
        self._made.append(self.socket_path)
        await self._serve(self._app, unix, _protocol(owner_only=True))
        if self._tcp is not None:
            assert self.token_path is not None
            token = secrets.token_urlsafe(32)
            _write_private(self.token_path, token + "\n")
            self._made.append(self.token_path)
            tcp = bind_socket(*self._tcp, what="the control port", advice="--control-port N")
            host, port = tcp.getsockname()[:2]
            self.tcp_address = (str(host), int(port))
            await self._serve(_RequireToken(self._app, token), tcp, _protocol(owner_only=False))

    async def _serve(self, app: ASGIApp, sock: socket.socket, protocol: type[Any]) -> None:
        config = uvicorn.Config(
            app,
            loop="none",
            lifespan="off",
            http=protocol,
            ws="none",
            log_level="warning",
            access_log=False,
            server_header=False,
            h11_max_incomplete_event_size=CONTROL_LIMITS.max_header_bytes,
            timeout_keep_alive=5,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        self._servers.append((server, task, sock))
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("The control endpoint stopped while starting.")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._app.closing.set()
        for server, _task, _sock in self._servers:
            server.should_exit = True
        for server, task, sock in self._servers:
            server.config.timeout_graceful_shutdown = 5
            try:
                await asyncio.wait_for(asyncio.shield(task), 10)
            except asyncio.TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            sock.close()
        self._servers.clear()
        for path in self._made:
            with contextlib.suppress(OSError):
                path.unlink()
        self._made.clear()


def _bind_unix(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        if _answers(path):
            raise OSError(
                f"Another tandem server of yours already has its control socket at {path} "
                "(it serves HTTP on the same port); stop it or choose another port."
            )
        path.unlink()  # left by a server that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Until this chmod the file has the umask's mode; the 0700 folder keeps
        # other users out meanwhile.
        os.chmod(path, 0o600)
    except OSError:
        sock.close()
        raise
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (replacing one left by an earlier run)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
