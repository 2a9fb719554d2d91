"""Starting, stopping and publishing replicas through the backend (:class:`Fleet`),
and what a failed start means.

A replica that fails to start is tried again after :func:`retry_delay`, which
grows with every failure in a row (exponential backoff with jitter); a failed
start is described in one line for the status and in full once in the log
(:func:`start_failure`); only a first deploy turns it into an error for the
caller (:func:`deploy_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from tandem._private.backends.base import Backend, ReplicaStartError
from tandem._private.calls.context import DeploymentID, ReplicaID
from tandem._private.calls.custom_routing import RouterSpec
from tandem._private.calls.router import ReplicaInfo, ReplicaSet
from tandem._private.controller.records import DeploymentRecord, ReplicaRecord
from tandem._private.controller.status import ReplicaState
from tandem._private.queues import bounded
from tandem._private.replica.replica import ReplicaSpec
from tandem._private.stats import RequestStats, Series
from tandem.exceptions import DeploymentFailedError

logger = logging.getLogger("tandem")

# A replica that failed to start is tried again after a delay that starts here and
# doubles with every failure in a row, up to the cap, with jitter of +-20%.
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0
RETRY_JITTER = 0.2


# How long a replica that stops may take to send its last counts first.
LAST_REPORT_S = 0.5


class StartFailed(Exception):
    """The backend started a replica, and it refused or its constructor raised."""

    def __init__(self, deployment: DeploymentID, error: ReplicaStartError) -> None:
        super().__init__(str(error))
        self.deployment = deployment
        self.error = error


class Fleet:
    """The replicas of every deployment as the backend runs them.

    Starts and stops them, publishes each deployment's replica set to the routers
    (here and, through the backend, in replica processes), and owns the background
    tasks that stop replicas nobody waits for; :meth:`close` waits for those.
    """

    def __init__(
        self,
        backend: Backend,
        publish: Callable[[ReplicaSet], None],
        serves_http: Callable[[DeploymentID], bool],
        clock: Callable[[], float],
    ) -> None:
        self.backend = backend
        self._publish_here = publish
        self._serves_http = serves_http
        self._clock = clock
        self._versions = itertools.count(1)
        self._background: set[asyncio.Task[Any]] = set()
        # The calls served by replicas that stopped, and those stopping, so a
        # deployment's counts in /metrics never go down (see served_series).
        self._served_before: dict[tuple[str, str, str], Series] = {}
        self._stopping: dict[str, ReplicaRecord] = {}
        # The stats of replicas being stopped, as they were just before the stop began.
        self._last_stats: dict[str, RequestStats | None] = {}

    async def start(self, record: DeploymentRecord, rank: int) -> ReplicaRecord:
        """Start the replica of ``rank``; returns once it serves, raises StartFailed if it
        refused, and whatever the backend raises if it could not start it at all."""
        replica_id = f"{record.id.app_name}#{record.id.name}#{secrets.token_hex(3)}"
        spec = ReplicaSpec(
            replica_id=replica_id,
            deployment_id=record.id,
            target=record.spec.target,
            init_args=record.spec.init_args,
            init_kwargs=record.spec.init_kwargs,
            options=record.spec.options,
            rank=rank,
            world_size=record.target,
            serves_http=self._serves_http(record.id),
        )
        try:
            info = await self.backend.start_replica(spec)
        except ReplicaStartError as exc:
            raise StartFailed(record.id, exc) from None
        options = record.spec.options
        return ReplicaRecord(
            replica_id,
            rank,
            info,
            graceful_shutdown_timeout_s=options.graceful_shutdown_timeout_s,
            next_health_check=self._clock() + options.health_check_period_s,
        )

    async def stop(
        self,
        replicas: list[ReplicaRecord],
        timeout_s: float | None = None,
        record: DeploymentRecord | None = None,
    ) -> None:
        """Stop replicas (each within its graceful timeout, or ``timeout_s``), counted
        as stopping in ``record``'s status meanwhile."""
        self.leaving(replicas)
        if record is not None:
            record.stopping += len(replicas)
        try:
            await asyncio.gather(*(self._stop_one(r, timeout_s) for r in replicas))
        finally:
            if record is not None:
                record.stopping -= len(replicas)

    def leaving(self, replicas: list[ReplicaRecord]) -> None:
        """``replicas`` left the records and will be stopped: /metrics counts what they
        served from now until their counts are kept."""
        self._stopping.update((r.replica_id, r) for r in replicas)

    def stop_later(
        self,
        replicas: list[ReplicaRecord],
        timeout_s: float | None = None,
        record: DeploymentRecord | None = None,
    ) -> None:
        """:meth:`stop`, as a background task: whoever retires replicas does not wait."""
        self.leaving(replicas)
        self.in_background(self.stop(replicas, timeout_s=timeout_s, record=record))

    async def _stop_one(self, replica: ReplicaRecord, timeout_s: float | None) -> None:
        replica.state = ReplicaState.STOPPING
        timeout = replica.graceful_shutdown_timeout_s if timeout_s is None else timeout_s
        last = None
        try:
            # What it served so far (a replica elsewhere takes its counts along as it stops).
            with contextlib.suppress(Exception):
                await bounded(self.backend.refresh(replica.info), LAST_REPORT_S)
            last = self.backend.facts(replica.info).stats
            # The backend may forget the replica's facts as its process exits, before
            # stop_replica returns: /metrics counts these meanwhile.
            self._last_stats[replica.replica_id] = last
            await self.backend.stop_replica(replica.info, timeout)
        except Exception:
            logger.exception("Stopping replica %s failed", replica.replica_id)
        finally:
            self._stopping.pop(replica.replica_id, None)
            self._last_stats.pop(replica.replica_id, None)
            self._keep_served(replica, self.backend.facts(replica.info).stats or last)

    def _keep_served(self, replica: ReplicaRecord, stats: RequestStats | None) -> None:
        for app, deployment, method, series in _served(replica, stats):
            self._served_before.setdefault((app, deployment, method), Series()).add(series)

    def served_series(self, listed: set[str]) -> list[tuple[str, str, str, Series]]:
        """What replicas no longer in the records served: those that stopped, and those
        stopping that are not among the ``listed`` replica ids."""
        out = [(*key, series) for key, series in self._served_before.items()]
        for replica_id, replica in self._stopping.items():
            if replica_id not in listed:
                stats = self.backend.facts(replica.info).stats
                out.extend(_served(replica, stats or self._last_stats.get(replica_id)))
        return out

    def forget_served(self, app_name: str) -> None:
        """The application was deleted: its counts go with it."""
        for key in [key for key in self._served_before if key[0] == app_name]:
            del self._served_before[key]

    def publish(
        self,
        record: DeploymentRecord,
        replicas: tuple[ReplicaInfo, ...] | None = None,
        state: str = "running",
    ) -> None:
        """Tell every router the deployment's replicas (by default, its running ones)."""
        infos = (
            tuple(r.info for r in record.replicas if r.state == ReplicaState.RUNNING)
            if replicas is None
            else replicas
        )
        # No replica, and starting one fails: callers get an answer now, not a wait.
        failed = not infos and record.start_failures > 0
        replica_set = ReplicaSet(
            deployment_id=record.id,
            replicas=infos,
            max_queued_requests=record.spec.options.max_queued_requests,
            state="failed" if failed and state == "running" else state,
            message=(
                f"no replica is running; starting one failed {record.start_failures} "
                f"time(s) in a row (last: {record.last_error}), and tandem keeps trying"
                if failed
                else ""
            ),
            version=next(self._versions),
            request_router=_router_spec(record),
        )
        self._publish_here(replica_set)  # to the routers in this process
        self.backend.publish(replica_set)  # and to those in replica processes

    def in_background(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task that :meth:`close` waits for."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        """Wait for the background tasks (stops, mostly) to end."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _router_spec(record: DeploymentRecord) -> RouterSpec | None:
    config = record.spec.options.request_router_config
    return None if config is None else config.router_spec()


def retry_delay(failures: int, rng: random.Random) -> float:
    """Seconds to wait before the next start, after ``failures`` failed starts in a row."""
    delay = min(MAX_RETRY_S, FIRST_RETRY_S * 2.0 ** (failures - 1))
    return delay * (1 + rng.uniform(-RETRY_JITTER, RETRY_JITTER))


def start_failure(exc: Exception) -> tuple[str, str, str]:
    """(reason for metrics, one line for the status, details for the log) of a failed start."""
    if isinstance(exc, StartFailed):
        error = exc.error
        reason = "constructor" if "Traceback" in error.traceback_text else "refused"
        return reason, _last_line(error.traceback_text) or str(error), error.traceback_text
    # The backend itself could not start it (e.g. out of file descriptors).
    details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return "backend", f"{type(exc).__name__}: {exc}", details


def deploy_error(failure: StartFailed) -> DeploymentFailedError:
    """What a deploy whose replica failed to start raises to its caller."""
    where = f"Deployment {failure.deployment.name!r} of application {failure.deployment.app_name!r}"
    error = failure.error
    if "Traceback" not in error.traceback_text:  # refused before any user code ran
        return DeploymentFailedError(f"{where} cannot start: {error.traceback_text}")
    return DeploymentFailedError(
        f"{where} failed to start: its constructor raised {error}.\n\n"
        f"Original traceback:\n{error.traceback_text}"
    )


def _last_line(traceback_text: str) -> str:
    """The exception line of a traceback ("ValueError: ..."), for one-line messages."""
    lines = [line for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _served(
    replica: ReplicaRecord, stats: RequestStats | None
) -> list[tuple[str, str, str, Series]]:
    if stats is None:
        return []
    replica_id = ReplicaID.from_full_id_str(replica.replica_id)
    app, deployment = replica_id.deployment_id.app_name, replica_id.deployment_id.name
    return [(app, deployment, method, series) for method, series in stats.by_method.items()]
