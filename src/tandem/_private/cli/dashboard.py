"""``tandem dashboard``: show a running server's dashboard in a browser on this machine.

A browser can reach neither the control socket nor, without its token, the
control port; so this command serves the dashboard's pages on a loopback port
and passes each GET on to the control endpoint as the owner. Only the
dashboard's own read-only routes pass (the page, its assets, its state, the
logs); nothing that changes the server does.

Other users of the machine can reach a loopback port too: the address printed
carries a random token, which the first visit trades for a cookie, and every
request without it is refused. Requests whose Host header is not this
loopback address are refused as well (a web page elsewhere cannot rebind its
name to it and read the dashboard).
"""

from __future__ import annotations

import errno
import hmac
import http.server
import secrets
import threading
import urllib.parse
import webbrowser
from typing import Any

import click

from tandem._private.cli.control_client import (
    ControlEndpoint,
    ControlError,
    fetch,
    find_control,
)
from tandem._private.cli.flags import control_options
from tandem._private.dashboard.routes import PAGE_PATH

DEFAULT_PORT = 8265
# What the browser may ask the control endpoint for (all GET, none changes anything).
_PASSED = {PAGE_PATH, PAGE_PATH + "/state", "/-/logs"}
_ASSETS = PAGE_PATH + "/assets/"
_HOSTS = ("127.0.0.1", "localhost")
_PASSED_HEADERS = (
    "content-type",
    "content-security-policy",
    "x-content-type-options",
    "referrer-policy",
    "cache-control",
)


class DashboardServer(http.server.ThreadingHTTPServer):
    """Serves the dashboard of the server at ``endpoint`` on 127.0.0.1:``port``."""

    daemon_threads = True

    def __init__(self, endpoint: ControlEndpoint, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.endpoint = endpoint
        self.token = secrets.token_urlsafe(24)
        self.cookie = f"tandem_dashboard_{self.server_address[1]}"

    @property
    def url(self) -> str:
        """The address to open: it carries the token."""
        return f"http://127.0.0.1:{self.server_address[1]}/?token={self.token}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: DashboardServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        server = self.server
        host = (self.headers.get("host") or "").rpartition(":")
        if host[0] not in _HOSTS or host[2] != str(server.server_address[1]):
            self._answer(403, "This dashboard answers only at its loopback address.")
            return
        target = urllib.parse.urlsplit(self.path)
        given = urllib.parse.parse_qs(target.query).get("token", [""])[0]
        if target.path == "/" and given:
            if not hmac.compare_digest(given, server.token):
                self._answer(401, "This token is not the one `tandem dashboard` printed.")
                return
            self.send_response(303)
            self.send_header("location", "/")
            self.send_header(
                "set-cookie", f"{server.cookie}={server.token}; HttpOnly; SameSite=Strict; Path=/"
            )
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if not hmac.compare_digest(self._cookie(), server.token):
            self._answer(
                401, "Open the address that `tandem dashboard` printed: it carries the token."
            )
            return
        path = PAGE_PATH if target.path == "/" else target.path
        asset = path.startswith(_ASSETS) and "/" not in path[len(_ASSETS) :]
        if path not in _PASSED and not asset:
            self._answer(404, f"The dashboard has no page {target.path}.")
            return
        if "follow" in urllib.parse.parse_qs(target.query):
            self._answer(400, "The dashboard reads logs without follow; `tandem logs -f` follows.")
            return
        self._forward(path + (f"?{target.query}" if target.query else ""))

    def _forward(self, path: str) -> None:
        try:
            response, body = fetch(self.server.endpoint, path)
        except ControlError as exc:
            self._answer(502, str(exc))
            return
        self.send_response(response.status)
        for name in _PASSED_HEADERS:
            value = response.getheader(name)
            if value is not None:
                self.send_header(name, value)
        self.send_header("x-frame-options", "DENY")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _cookie(self) -> str:
        for part in (self.headers.get("cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.server.cookie:
                return value
        return ""

    def _answer(self, status: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a browser polling once a second would fill the terminal


def open_server(endpoint: ControlEndpoint, port: int) -> DashboardServer:
    """A dashboard server on ``port``; if the default port is taken, on any free one."""
    try:
        return DashboardServer(endpoint, port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or port != DEFAULT_PORT:
            raise ControlError(
                f"Cannot serve the dashboard on 127.0.0.1:{port} ({exc.strerror or exc}); "
                "pick another --port (0: any free one)."
            ) from None
        return DashboardServer(endpoint, 0)


@click.command()
@control_options
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Loopback port to show the dashboard on (0: any free one).",
)
@click.option("--no-browser", is_flag=True, help="Print the address instead of opening it.")
def dashboard(
    address: str, control: str | None, token_file: str | None, port: int, no_browser: bool
) -> None:
    """Show a running server's dashboard (its graph, replicas, scaling and logs) in a browser."""
    try:
        endpoint = find_control(address, control, token_file)
        _check(endpoint)
        server = open_server(endpoint, port)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Dashboard of {endpoint.address or endpoint.describe()}: {server.url}", err=True)
    click.echo("Press Ctrl-C to stop.", err=True)
    if not no_browser:
        threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _check(endpoint: ControlEndpoint) -> None:
    """Raise ControlError unless the server answers and has a dashboard."""
    response, _ = fetch(endpoint, PAGE_PATH + "/state", timeout=10)
    if response.status == 401:
        raise ControlError("The control port refused the token (see --token-file).")
    if response.status != 200:
        raise ControlError(
            f"The server at {endpoint.describe()} has no dashboard (it answered "
            f"{response.status}); is it an older tandem?"
        )
