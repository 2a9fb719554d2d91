"""The proxy's own endpoints on the data port: ``/-/healthz``, ``/-/routes`` and ``/metrics``.

They only read, and show nothing internal: Ray Serve's proxy endpoints and
Prometheus metrics. Everything that changes the server or shows its internals
(deploy, shutdown, detailed status) is on the control endpoint
(:mod:`tandem._private.http.control`), which only the server's owner can reach.
To add an endpoint here, add a route below, and keep it read-only and free of
internals (pids, replica ids, exception text, paths).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

_KNOWN = "GET /-/healthz, GET /-/routes, GET /metrics"


def proxy_endpoints(
    routes: Callable[[], dict[str, str]], metrics: Callable[[], bytes | Awaitable[bytes]]
) -> Router:
    """An ASGI app for the paths under ``/-/`` and ``/metrics`` of the data port
    (``metrics`` may be a coroutine function: it may ask replicas for fresh numbers)."""

    async def render_metrics() -> Response:
        body = metrics()
        if not isinstance(body, bytes):
            body = await body
        return Response(body, media_type="text/plain; version=0.0.4")

    return Router(
        [
            _get("/-/healthz", lambda: PlainTextResponse("success")),
            _get("/-/routes", lambda: JSONResponse(routes())),
            _get("/metrics", render_metrics),
        ],
        redirect_slashes=False,
        default=_not_found,
    )


# Makes the response to a GET: at once, or as a coroutine.
Respond = Callable[[], Response | Awaitable[Response]]


def _get(path: str, respond: Respond) -> Route:
    """A route that answers GET (and HEAD) with ``respond()``, and 405 to other methods."""
    return Route(path, _GetOnly(path, respond))


class _GetOnly:
    """An ASGI endpoint (so the route passes it every method, and it says which it takes)."""

    def __init__(self, path: str, respond: Respond) -> None:
        self._path = path
        self._respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in ("GET", "HEAD"):
            made = self._respond()
            response = made if isinstance(made, Response) else await made
        else:
            response = PlainTextResponse(
                f"Method Not Allowed: {self._path} only answers GET.\n",
                status_code=405,
                headers={"allow": "GET, HEAD"},
            )
        await response(scope, receive, send)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    response = PlainTextResponse(
        f"Not Found: the proxy serves {_KNOWN} under these paths.\n", status_code=404
    )
    await response(scope, receive, send)
