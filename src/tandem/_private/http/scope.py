"""What the proxy reads from an ASGI scope: the path routes match, the application
that serves it, the request id, the multiplexed model id, and the client's
deadline and priority."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from starlette.types import Scope

from tandem._private.calls import priority
from tandem._private.calls.context import RequestMetadata

# (route_prefix, application, ingress deployment), longest prefix first.
RouteTable = Callable[[], tuple[tuple[str, str, str], ...]]

_MODEL_ID_HEADERS = (b"serve_multiplexed_model_id", b"serve-multiplexed-model-id")

# A client's X-Request-Id (gRPC: request_id) is kept if it matches this; otherwise
# tandem makes one.
_REQUEST_ID = r"[A-Za-z0-9._:-]{1,128}"
REQUEST_ID = re.compile(_REQUEST_ID.encode())  # header values are bytes
REQUEST_ID_TEXT = re.compile(_REQUEST_ID)


def match_route(routes: tuple[tuple[str, str, str], ...], path: str) -> tuple[str, str, str] | None:
    """The (prefix, app, ingress) whose prefix is the longest match of ``path``.

    ``routes`` is sorted longest prefix first; "/api" matches "/api" and
    "/api/x" but not "/apix".
    """
    for route in routes:
        prefix = route[0]
        if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
            return route
    return None


def route_path(scope: Scope) -> str:
    """The path routes match: ``path`` after the scope's ``root_path`` (as Starlette reads it)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def request_id(scope: Scope) -> str:
    """The client's X-Request-Id if it is sane, else a new one (never raw text in logs)."""
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            if REQUEST_ID.fullmatch(value):
                return str(value.decode("ascii"))
            break
    return RequestMetadata.new_request_id()


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def client_hints(scope: Scope) -> tuple[float | None, int]:
    """The client's ``X-Request-Deadline-Ms`` (the milliseconds it gives the request to
    be answered in, counted from its arrival) in seconds, or None, and its
    ``X-Request-Priority`` (0 if none; see ``calls.priority``). ValueError if bad."""
    budget_s: float | None = None
    rank = 0
    for key, value in scope["headers"]:
        if key == b"x-request-deadline-ms":
            try:
                budget_ms = float(value)
            except ValueError:
                budget_ms = math.nan
            if not 0 < budget_ms < math.inf:
                raise ValueError(
                    "X-Request-Deadline-Ms must be a positive number of milliseconds "
                    f"(got {value.decode('latin-1')[:40]!r})"
                )
            budget_s = budget_ms / 1000
        elif key == b"x-request-priority":
            rank = priority.parsed(value.decode("latin-1"), "X-Request-Priority")
    return budget_s, rank


def model_id(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key in _MODEL_ID_HEADERS:
            return str(value.decode("latin-1"))
    return ""
