"""The proxy's own endpoints on the data port: ``/-/healthz``, ``/-/routes`` and ``/metrics``.

They only read, and show nothing internal: Ray Serve's proxy endpoints and
Prometheus metrics. Everything that changes the server or shows its internals
(deploy, shutdown, detailed status) is on the control endpoint
(:mod:`tandem._private.http.control`), which only the server's owner can reach.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

_KNOWN = "GET /-/healthz, GET /-/routes, GET /metrics"


class ProxyEndpoints:
    """An ASGI app for the paths under ``/-/`` and ``/metrics`` of the data port."""

    def __init__(self, routes: Callable[[], dict[str, str]], metrics: Callable[[], bytes]) -> None:
        self._routes = routes
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self._respond(scope["method"], scope["path"])
        await response(scope, receive, send)

    def _respond(self, method: str, path: str) -> Response:
        if path in ("/-/healthz", "/-/routes", "/metrics"):
            if method not in ("GET", "HEAD"):
                return PlainTextResponse(
                    f"Method Not Allowed: {path} only answers GET.\n",
                    status_code=405,
                    headers={"allow": "GET, HEAD"},
                )
            if path == "/-/healthz":
                return PlainTextResponse("success")
            if path == "/-/routes":
                return JSONResponse(self._routes())
            return Response(self._metrics(), media_type="text/plain; version=0.0.4")
        return PlainTextResponse(
            f"Not Found: the proxy serves {_KNOWN} under these paths.\n", status_code=404
        )
