"""The dashboard's routes on the control endpoint (the owner's side only).

``GET /-/dashboard`` is the page, ``/-/dashboard/assets/NAME`` its script and
style sheet, ``/-/dashboard/state`` what it draws (``Controller.overview``).
The page needs no build step and loads nothing from elsewhere, so it works
offline; it polls the state (and ``/-/logs``) about once a second.

A browser cannot reach the control socket, nor send the control port's
token: ``tandem dashboard`` (:mod:`tandem._private.cli.dashboard`) serves
these routes to a browser on this machine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

PAGE_PATH = "/-/dashboard"
STATE_PATH = "/-/dashboard/state"
_ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# Nothing but the page's own files, and no framing (clickjacking).
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def dashboard_routes(state: Callable[[], Awaitable[dict[str, Any]]]) -> list[Route]:
    """The page, its assets and ``state`` (the overview, after fresh reports)."""

    async def page(request: Request) -> Response:
        return Response(_read("page.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        kind = _ASSETS.get(name)
        if kind is None:
            return JSONResponse({"error": f"The dashboard has no file {name!r}."}, status_code=404)
        return Response(_read(name), media_type=kind, headers=_HEADERS)

    async def current(request: Request) -> Response:
        return JSONResponse(await state(), headers={"cache-control": "no-store"})

    return [
        Route(PAGE_PATH, page, methods=["GET"]),
        Route(STATE_PATH, current, methods=["GET"]),
        Route(PAGE_PATH + "/assets/{name}", asset, methods=["GET"]),
    ]


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()
