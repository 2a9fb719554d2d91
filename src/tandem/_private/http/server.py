"""uvicorn serving the proxy on tandem's event loop (no extra thread, no extra hop),
behind the connection limits of :mod:`tandem._private.http.limits`, over HTTPS when
``http_options`` give a key and certificate (:mod:`tandem._private.http.tls`)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from tandem._private.http.limits import ConnectionLimits, Refusals, protocol_class
from tandem._private.http.options import HTTPOptions
from tandem._private.http.tls import TLSAcceptor, tls_context

logger = logging.getLogger("tandem.proxy")

# A WebSocket message's size limit when request bodies have none (uvicorn's default).
WS_MAX_SIZE = 16 * 1024 * 1024


def bind_socket(
    host: str,
    port: int,
    what: str = "HTTP",
    advice: str = "tandem run --port N, or tandem.start(http_options={'port': N})",
    reuse_port: bool = False,
) -> socket.socket:
    """Bind a listening socket ourselves, so a taken port is a clear OSError, not an exit.

    ``reuse_port``: share the port with other sockets of this user that set it too
    (direct ingress: the kernel spreads connections across them).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno,
            f"Cannot serve {what} on {host}:{port}: {exc.strerror}. Choose another port "
            f"({advice}).",
        ) from None
    sock.set_inheritable(True)
    return sock


class HTTPServer:
    """Start with :meth:`start` (on the loop), stop with :meth:`stop`."""

    def __init__(self, app: Any, options: HTTPOptions, reuse_port: bool = False) -> None:
        self._app = app
        self._options = options
        self._reuse_port = reuse_port
        self.on_stop: list[Callable[[], None]] = []  # called when stop() begins
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self._refusals: Refusals | None = None
        self._tls: TLSAcceptor | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._socket is not None
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"{self._options.scheme}://{'[' + host + ']' if ':' in host else host}:{port}"

    async def start(self) -> None:
        """Listen and serve; raises ValueError for unusable HTTPS files, OSError for the port."""
        options = self._options
        if options.host is None:
            raise ValueError("http_options.host is None: there is no address to serve HTTP on.")
        context = tls_context(options)  # before binding: a bad file leaves no socket behind
        self._socket = bind_socket(options.host, options.port, reuse_port=self._reuse_port)
        limits = ConnectionLimits.from_options(options)
        self._refusals = Refusals(limits)
        http: Any = protocol_class(limits, self._refusals)
        if context is not None:
            self._tls = http = TLSAcceptor(http, context, limits, self._refusals)
        config = uvicorn.Config(
            self._app,
            loop="none",
            lifespan="off",
            log_level="warning",
            access_log=False,
            http=http,
            # Requests arrive without it; the app sees it in the scope (Ray Serve's root_path).
            root_path=options.root_path,
            # uvicorn annotates an int but only hands it to loop.call_later: a float works.
            timeout_keep_alive=options.keep_alive_timeout_s,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=limits.max_header_bytes,  # for the h11 fallback
            # WebSockets (``http.websocket``): the sans-I/O implementation bounds what it
            # buffers both ways; a message may be as large as a request body.
            ws="websockets-sansio",
            ws_max_size=options.max_body_bytes or WS_MAX_SIZE,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._watcher = asyncio.create_task(self._app.watch())
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                await self._task  # raises what stopped it
                raise RuntimeError("The HTTP server stopped while starting.")
            await asyncio.sleep(0.005)

    async def stop(self, timeout_s: float = 20.0) -> None:
        """Stop accepting connections; let in-flight requests finish (up to ``timeout_s``)."""
        callbacks, self.on_stop = self.on_stop, []
        for callback in callbacks:
            callback()
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(int(timeout_s), 1)
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s + 5)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._server = None
        self._task = None
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._tls is not None:
            self._tls.close()  # e.g. connections still shaking hands
            self._tls = None
        if self._socket is not None:
            self._socket.close()
        if self._refusals is not None:
            self._refusals.flush()  # log the refusals the last interval held back
