"""Recent log lines of the running replicas, gathered for ``tandem logs`` and the dashboard.

Each replica keeps its own lines (``replica/log_buffer.py``); this asks every
replica that matches the filters for its lines through the backend, all at
once, and merges them in time order. A replica that does not answer within
:data:`REPLY_TIMEOUT_S` is left out of this answer (and asked again next time).

Readers that follow pass back the ``cursors`` of the previous answer: the
number of the newest line each replica had, so they get only newer ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from tandem._private.backends.base import Backend
from tandem._private.controller.describe import each_replica
from tandem._private.controller.records import ApplicationRecord
from tandem._private.replica.log_buffer import LogRead

# How long a replica may take to send its lines before the answer goes without them.
REPLY_TIMEOUT_S = 1.0
# How many lines one answer may hold at most (a buffer holds 1,000 per replica).
MAX_LIMIT = 10_000


class UnknownLogSource(LookupError):
    """The filters name an application, deployment or replica that is not running."""


async def recent_logs(
    apps: Mapping[str, ApplicationRecord],
    backend: Backend,
    *,
    app: str | None = None,
    deployment: str | None = None,
    replica: str | None = None,
    request_id: str | None = None,
    limit: int = 100,
    after: Mapping[str, int] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The newest ``limit`` log lines of the running replicas that match every filter
    given (application, deployment name, replica id, request id), oldest first, and
    the cursors to pass as ``after`` to get only newer lines next time.

    Each line is a JSON-ready dict: ``seq`` (its number in its replica), ``time``
    (seconds since the epoch), ``level``, ``logger``, ``message``, ``application``,
    ``deployment``, ``replica``, ``request_id`` (None outside a request) and
    ``exception`` (traceback text, or None). ``after`` maps replica id -> the
    number of the last line seen of it (a replica missing from it: all its lines).
    Raises UnknownLogSource (a LookupError) when no running application, deployment
    or replica matches ``app``, ``deployment`` or ``replica``.
    """
    infos = {
        record.replica_id: record.info
        for app_name, name, record in each_replica(apps)
        if (app is None or app_name == app)
        and (deployment is None or name == deployment)
        and (replica is None or record.replica_id == replica)
    }
    if not infos:
        _check_known(apps, app, deployment, replica)
    seen = after or {}
    asks = {
        replica_id: asyncio.ensure_future(
            backend.logs(info, seen.get(replica_id, 0), limit, request_id)
        )
        for replica_id, info in infos.items()
    }
    if asks:
        await asyncio.wait(asks.values(), timeout=REPLY_TIMEOUT_S)
    lines: list[dict[str, Any]] = []
    cursors: dict[str, int] = {}
    for replica_id, ask in asks.items():
        read = _answer(ask)
        if read is None:  # slow or gone: it keeps its place
            if replica_id in seen:
                cursors[replica_id] = seen[replica_id]
            continue
        lines.extend(read.lines)
        cursors[replica_id] = max(read.last, seen.get(replica_id, 0))
    lines.sort(key=lambda line: (line["time"], line["replica"], line["seq"]))
    return (lines[-limit:] if limit > 0 else []), cursors


def _answer(ask: asyncio.Future[LogRead]) -> LogRead | None:
    if not ask.done():
        ask.cancel()
        ask.add_done_callback(_retrieve)
        return None
    if ask.cancelled() or ask.exception() is not None:
        return None
    return ask.result()


def _retrieve(ask: asyncio.Future[LogRead]) -> None:
    if not ask.cancelled():
        ask.exception()  # a replica that failed late: nobody waits for it any more


def _check_known(
    apps: Mapping[str, ApplicationRecord],
    app: str | None,
    deployment: str | None,
    replica: str | None,
) -> None:
    """Raise UnknownLogSource if a filter names something that is not running."""
    if app is not None and app not in apps:
        known = ", ".join(sorted(apps)) or "none"
        raise UnknownLogSource(f"There is no application {app!r} (applications: {known}).")
    deployments = sorted(
        f"{app_name}/{name}" if len(apps) > 1 else name
        for app_name, record in apps.items()
        if app is None or app_name == app
        for name in record.deployments
    )
    if deployment is not None and not any(
        deployment in record.deployments
        for app_name, record in apps.items()
        if app is None or app_name == app
    ):
        where = "" if app is None else f" in application {app!r}"
        raise UnknownLogSource(
            f"There is no deployment {deployment!r}{where} (deployments: "
            f"{', '.join(deployments) or 'none'})."
        )
    if replica is not None:
        raise UnknownLogSource(
            f"There is no running replica {replica!r} (`tandem status` lists the replicas "
            "of each deployment)."
        )
