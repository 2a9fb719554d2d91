"""``GET /-/logs`` of the control endpoint: the replicas' recent log lines.

Query parameters (all optional): ``app``, ``deployment``, ``replica`` (a replica
id), ``request_id`` filter the lines; ``limit`` is how many of the newest to
send (default :data:`DEFAULT_LIMIT`); ``follow=1`` keeps the response open and
sends new lines as they come, one JSON object per line (NDJSON), asking the
replicas every :data:`POLL_S` seconds, until the client leaves or the server
stops. Without ``follow`` the answer is ``{"lines": [...]}``. Each line is the
dict ``controller.logs.recent_logs`` describes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

# Lines, cursors: what Controller.recent_logs returns.
LogsRead = tuple[list[dict[str, Any]], dict[str, int]]
ReadLogs = Callable[..., Awaitable[LogsRead]]

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
POLL_S = 0.3
_FILTERS = ("app", "deployment", "replica", "request_id")
_KNOWN = frozenset((*_FILTERS, "limit", "follow"))
_YES, _NO = frozenset({"1", "true", "yes"}), frozenset({"", "0", "false", "no"})


async def logs_response(request: Request, read: ReadLogs, closing: asyncio.Event) -> Response:
    """Answer one ``GET /-/logs`` (see the module docstring); ``closing`` is set when the
    server stops, which ends every followed response."""
    query = request.query_params
    unknown = sorted(set(query) - _KNOWN)
    if unknown:
        return _bad(
            f"Unknown parameter {unknown[0]!r}; /-/logs takes app, deployment, replica, "
            "request_id, limit and follow."
        )
    filters = {name: query[name] for name in _FILTERS if query.get(name)}
    raw_limit = query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = -1
    if not 1 <= limit <= MAX_LIMIT:
        return _bad(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {raw_limit!r}.")
    follow = query.get("follow", "").lower()
    if follow not in _YES | _NO:
        return _bad(f"follow takes 1 or 0, got {query['follow']!r}.")
    try:
        lines, cursors = await read(limit=limit, **filters)
    except LookupError as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)
    if follow not in _YES:
        return JSONResponse({"lines": lines})
    return StreamingResponse(
        _follow(request, read, filters, lines, cursors, closing),
        media_type="application/x-ndjson",
    )


async def _follow(
    request: Request,
    read: ReadLogs,
    filters: dict[str, str],
    lines: list[dict[str, Any]],
    cursors: dict[str, int],
    closing: asyncio.Event,
) -> AsyncIterator[bytes]:
    """The first lines, then every new one, until the client leaves or the server stops."""
    while True:
        if lines:
            yield "".join(json.dumps(line) + "\n" for line in lines).encode()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(closing.wait(), POLL_S)
        if closing.is_set() or await request.is_disconnected():
            return
        try:
            lines, cursors = await read(limit=MAX_LIMIT, after=cursors, **filters)
        except LookupError:  # e.g. the application is being redeployed: wait for it
            lines = []


def _bad(message: str) -> Response:
    return JSONResponse({"error": message}, status_code=400)
