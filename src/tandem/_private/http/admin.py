"""Admin endpoints under ``/-/`` plus ``/metrics``, for people and for the ``tandem`` CLI.

GET /-/healthz, /-/routes, /-/status and /metrics read; POST /-/shutdown and
PUT /-/applications (a config file's content) act, when the server that runs
the proxy provides those actions.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send


class Admin:
    """The admin ASGI app. ``apply_config`` raises ValueError for a bad config."""

    def __init__(
        self,
        status: Callable[[], Any],
        routes: Callable[[], dict[str, str]],
        metrics: Callable[[], bytes],
        shutdown: Callable[[], None] | None = None,
        apply_config: Callable[[Any], Awaitable[None]] | None = None,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._status = status
        self._refresh = refresh
        self._routes = routes
        self._metrics = metrics
        self._shutdown = shutdown
        self._apply_config = apply_config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._respond(Request(scope, receive))
        await response(scope, receive, send)

    async def _respond(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        if method == "GET":
            if path == "/-/healthz":
                return PlainTextResponse("success")
            if path == "/-/routes":
                return JSONResponse(self._routes())
            if path == "/-/status":
                if self._refresh is not None:
                    await self._refresh()
                return JSONResponse(self._status().to_dict())
            if path == "/metrics":
                return Response(self._metrics(), media_type="text/plain; version=0.0.4")
        if path == "/-/shutdown" and method == "POST" and self._shutdown is not None:
            self._shutdown()
            return JSONResponse({"shutting_down": True})
        if path == "/-/applications" and method == "PUT" and self._apply_config is not None:
            try:
                config = json.loads(await request.body())
            except ValueError as exc:
                return JSONResponse({"error": f"The body is not JSON: {exc}"}, status_code=400)
            try:
                await self._apply_config(config)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except Exception as exc:
                return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
            return JSONResponse({"applied": True})
        known = "/-/healthz, /-/routes, /-/status, /metrics"
        return PlainTextResponse(
            f"Not Found: {method} {path} is not an admin endpoint (try {known}).\n",
            status_code=404,
        )
