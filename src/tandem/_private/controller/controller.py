"""The controller: target state versus running state, for every deployment.

It deploys applications (starting replicas in dependency order, so a parent's
constructor can already call its children), updates them in place, deletes
them, and publishes each deployment's replica set to the routers. Only a
deploy can fail for good: it makes ``run()`` raise and leaves nothing behind.

Once a deployment runs, one reconciliation loop (:meth:`Controller._watch`)
keeps it at its target: it retires replicas that exit or fail health checks,
starts the missing ones, stops the surplus when the autoscaler lowers the
target, and keeps the status truthful. A replica that fails to start, for
any reason, is retried with exponential backoff and jitter for as long as the
deployment exists, so a deployment recovers by itself once the cause is gone.
The loop decides without waiting: starting and stopping replicas run as tasks
of their own, so a slow constructor in one deployment delays no other.

It runs on the runtime's event loop; its background tasks (the loop, health
checks, starts, stops) are started by :meth:`open` or the loop and awaited by
:meth:`close`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import secrets
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tandem._private.app.spec import ApplicationSpec, DeploymentSpec
from tandem._private.backends.base import Backend, ReplicaStartError
from tandem._private.calls.context import DeploymentID
from tandem._private.calls.router import ReplicaInfo, ReplicaSet
from tandem._private.controller.autoscaling import AutoscalingPolicy
from tandem._private.controller.status import (
    ApplicationState,
    ApplicationStatus,
    DeploymentState,
    DeploymentStatus,
    ReplicaState,
    ReplicaStatus,
    Status,
)
from tandem._private.queues import wait_event
from tandem._private.replica.replica import ReplicaSpec
from tandem.exceptions import DeploymentFailedError

logger = logging.getLogger("tandem")

# A replica that failed to start is tried again after a delay that starts here and
# doubles with every failure in a row, up to the cap, with jitter of +-20%.
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0
RETRY_JITTER = 0.2
# Autoscaled deployments report their load at least this often (seconds).
AUTOSCALE_SAMPLE_S = 0.5


@dataclass
class ReplicaRecord:
    replica_id: str
    rank: int
    info: ReplicaInfo
    graceful_shutdown_timeout_s: float
    state: str = ReplicaState.RUNNING
    next_health_check: float = 0.0
    checking: bool = False


@dataclass
class DeploymentRecord:
    id: DeploymentID
    spec: DeploymentSpec
    replicas: list[ReplicaRecord] = field(default_factory=list)
    status: str = DeploymentState.UPDATING
    message: str = ""
    restarts: int = 0
    # Replicas being started by the reconciliation loop, by rank.
    starting: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    stopping: int = 0
    # Starts that failed in a row (0 once one succeeds), the last error, the next try.
    start_failures: int = 0
    last_error: str = ""
    retry_at: float = 0.0
    # Set once the deployment left its application: nothing may restart its replicas.
    removed: bool = False
    # Autoscaling: the policy, the target it chose (None: the initial count), and timing.
    autoscaler: AutoscalingPolicy | None = None
    scaled_target: int | None = None
    scaling: bool = False
    next_sample: float = 0.0

    def missing_ranks(self) -> list[int]:
        """Ranks below the target that no running or starting replica holds."""
        taken = {r.rank for r in self.replicas} | set(self.starting)
        return [rank for rank in range(self.target) if rank not in taken]

    def __post_init__(self) -> None:
        auto = self.spec.options.autoscaling
        if auto is not None and self.autoscaler is None:
            self.autoscaler = AutoscalingPolicy(auto)

    @property
    def target(self) -> int:
        if self.scaled_target is not None:
            return self.scaled_target
        if self.autoscaler is not None:
            return self.spec.options.initial_replicas()  # may be 0: scale from zero on demand
        return max(1, self.spec.options.initial_replicas())


@dataclass
class ApplicationRecord:
    spec: ApplicationSpec
    deployments: dict[str, DeploymentRecord]
    status: str = ApplicationState.DEPLOYING
    message: str = ""
    deployed_at: float = field(default_factory=time.time)


class _StartFailed(Exception):
    def __init__(self, deployment: DeploymentID, error: ReplicaStartError) -> None:
        super().__init__(str(error))
        self.deployment = deployment
        self.error = error


class Controller:
    """See the module docstring."""

    def __init__(
        self,
        backend: Backend,
        publish: Callable[[ReplicaSet], None],
        clock: Callable[[], float] = time.monotonic,
        queued: Callable[[DeploymentID], int] = lambda _: 0,
    ) -> None:
        self.backend = backend
        self._publish_set = publish
        self._queued = queued
        self._clock = clock
        self._apps: dict[str, ApplicationRecord] = {}
        self._lock = asyncio.Lock()
        self._versions = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._exited: set[str] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._checks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._random = random.Random()
        self.route_table: tuple[tuple[str, str, str], ...] = ()
        # Counts for /metrics: (application, deployment, reason) -> events.
        self.replica_restarts: dict[tuple[str, str, str], int] = {}
        self.start_failures: dict[tuple[str, str, str], int] = {}

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        self.backend.on_models = self._on_models
        await self.backend.open(self._on_replica_exit)
        self._watch_task = asyncio.create_task(self._watch(), name="tandem-controller-watch")

    async def close(self) -> None:
        """Stop every application and the watch loop."""
        self._closing = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        for check in list(self._checks):  # a hanging check_health must not delay shutdown
            check.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
        for app in self._apps.values():
            for record in app.deployments.values():
                await self._cancel_starts(record)
        async with self._lock:
            await asyncio.gather(*(self._remove_app(name) for name in list(self._apps)))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.backend.close()

    # -- applications ------------------------------------------------------

    def app_names(self) -> list[str]:
        return list(self._apps)

    def ingress(self, app_name: str) -> str | None:
        app = self._apps.get(app_name)
        return None if app is None else app.spec.ingress

    def route_prefixes(self) -> dict[str, str]:
        return {prefix: app for prefix, app, _ in self.route_table}

    def routes(self) -> tuple[tuple[str, str, str], ...]:
        """(prefix, application, ingress) of every running application, longest prefix first."""
        return self.route_table

    def _refresh_routes(self) -> None:
        table = [
            (app.spec.route_prefix, name, app.spec.ingress)
            for name, app in self._apps.items()
            if app.spec.route_prefix is not None and app.status != ApplicationState.DELETING
        ]
        table.sort(key=lambda route: len(route[0]), reverse=True)
        self.route_table = tuple(table)

    async def deploy(self, spec: ApplicationSpec) -> None:
        """Deploy or update one application; return once all its replicas serve."""
        async with self._lock:
            self._check_route_prefix(spec)
            old = self._apps.get(spec.name)
            if old is not None:
                # The deploy decides the replica count now; the loop's starts would race it.
                for running in old.deployments.values():
                    await self._cancel_starts(running)
            app = ApplicationRecord(spec, {})
            fresh: list[DeploymentRecord] = []
            kept: list[tuple[DeploymentRecord, DeploymentSpec]] = []
            for dspec in spec.deployments:
                prev = old.deployments.get(dspec.name) if old else None
                if prev is not None and prev.spec.same_code(dspec):
                    kept.append((prev, dspec))
                    app.deployments[dspec.name] = prev
                    continue
                record = DeploymentRecord(DeploymentID(spec.name, dspec.name), dspec)
                fresh.append(record)
                app.deployments[dspec.name] = record
                if prev is None:
                    # Callers may resolve it now; they wait until replicas are published.
                    self._publish(record, replicas=())
            self._apps[spec.name] = app
            started: dict[str, list[ReplicaRecord]] = {}
            try:
                brand_new = {
                    r.spec.name for r in fresh if old is None or r.spec.name not in old.deployments
                }
                await self._start_all(fresh, kept, started, brand_new)
            except BaseException as exc:
                await self._stop_replicas([r for rs in started.values() for r in rs], timeout_s=0)
                for record in fresh:
                    if old is None or record.spec.name not in old.deployments:
                        self._publish(record, replicas=(), state="deleted")
                if old is None:
                    del self._apps[spec.name]
                else:
                    self._apps[spec.name] = old
                self._refresh_routes()
                if isinstance(exc, _StartFailed):
                    raise _failure_error(exc) from exc.error.error
                raise
            await self._commit(app, old, fresh, kept, started)

    async def _start_all(
        self,
        fresh: list[DeploymentRecord],
        kept: list[tuple[DeploymentRecord, DeploymentSpec]],
        started: dict[str, list[ReplicaRecord]],
        brand_new: set[str],
    ) -> None:
        """Start new replicas, children before parents, siblings at once."""
        ready = {record.spec.name: asyncio.Event() for record in fresh}

        async def start(record: DeploymentRecord, count: int, first_rank: int, new: bool) -> None:
            for dependency in record.spec.dependencies:
                if dependency in ready:
                    await ready[dependency].wait()
            bucket = started.setdefault(record.spec.name, [])

            async def one(rank: int) -> None:
                bucket.append(await self._start_replica(record, rank))

            siblings = [asyncio.ensure_future(one(first_rank + i)) for i in range(count)]
            try:
                await asyncio.gather(*siblings)
            except BaseException:
                # One failed: the others must not finish starting behind our back.
                for sibling in siblings:
                    sibling.cancel()
                await asyncio.gather(*siblings, return_exceptions=True)
                raise
            if new:
                if record.spec.name in brand_new:
                    # Routable at once, so the constructors of its parents can call it.
                    record.replicas = sorted(bucket, key=lambda r: r.rank)
                    self._publish(record)
                ready[record.spec.name].set()

        jobs = [start(record, record.target, 0, True) for record in fresh]
        for prev, dspec in kept:
            same_scaling = prev.spec.options.autoscaling == dspec.options.autoscaling
            if prev.autoscaler is not None and same_scaling:
                wanted = prev.target  # the autoscaler's choice stands
            else:
                wanted = DeploymentRecord(prev.id, dspec).target
            if wanted > len(prev.replicas):
                record = DeploymentRecord(prev.id, dspec)
                jobs.append(start(record, wanted - len(prev.replicas), len(prev.replicas), False))
        tasks = [asyncio.ensure_future(job) for job in jobs]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _commit(
        self,
        app: ApplicationRecord,
        old: ApplicationRecord | None,
        fresh: list[DeploymentRecord],
        kept: list[tuple[DeploymentRecord, DeploymentSpec]],
        started: dict[str, list[ReplicaRecord]],
    ) -> None:
        retired: list[ReplicaRecord] = []
        for record in fresh:
            record.replicas = sorted(started.get(record.spec.name, []), key=lambda r: r.rank)
            self._refresh_state(record)
            self._publish(record)
            prev = old.deployments.get(record.spec.name) if old else None
            if prev is not None:
                prev.removed = True
                retired.extend(prev.replicas)
        problems: list[str] = []
        for prev, dspec in kept:
            prev.message = ""
            old_config = prev.spec.options.user_config
            if prev.spec.options.autoscaling != dspec.options.autoscaling:
                auto = dspec.options.autoscaling
                prev.autoscaler = AutoscalingPolicy(auto) if auto is not None else None
                prev.scaled_target = None
            prev.spec = dspec
            prev.replicas.extend(sorted(started.get(dspec.name, []), key=lambda r: r.rank))
            resized = bool(started.get(dspec.name)) or len(prev.replicas) > prev.target
            if len(prev.replicas) > prev.target:
                retired.extend(prev.replicas[prev.target :])
                del prev.replicas[prev.target :]
            if resized:
                # The deployment changed size: every replica learns its place anew.
                for rank, replica in enumerate(prev.replicas):
                    replica.rank = rank
                await asyncio.gather(
                    *(self.backend.set_rank(r.info, r.rank, prev.target) for r in prev.replicas)
                )
            self._refresh_state(prev)
            if dspec.options.user_config != old_config and dspec.options.user_config is not None:
                results = await asyncio.gather(
                    *(
                        self.backend.reconfigure(r.info, dspec.options.user_config)
                        for r in prev.replicas
                    ),
                    return_exceptions=True,
                )
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    prev.message = f"reconfigure raised {type(errors[0]).__name__}: {errors[0]}"
                    self._refresh_state(prev)
                    problems.append(f"Deployment {dspec.name!r}: {prev.message}")
            self._publish(prev)
        if old is not None:
            for name, record in old.deployments.items():
                if name not in app.deployments:
                    record.removed = True
                    self._publish(record, replicas=(), state="deleted")
                    retired.extend(record.replicas)
        app.status = ApplicationState.UNHEALTHY if problems else ApplicationState.RUNNING
        app.message = " ".join(problems)
        self._refresh_routes()
        self._in_background(self._stop_replicas(retired))
        if problems:
            raise DeploymentFailedError(
                f"Application {app.spec.name!r} was updated, but: " + " ".join(problems)
            )

    async def delete(self, name: str) -> bool:
        async with self._lock:
            if name not in self._apps:
                return False
            await self._remove_app(name)
            return True

    async def _remove_app(self, name: str) -> None:
        app = self._apps[name]
        app.status = ApplicationState.DELETING
        self._refresh_routes()
        replicas: list[ReplicaRecord] = []
        for record in app.deployments.values():
            record.removed = True
            self._publish(record, replicas=(), state="deleted")
            await self._cancel_starts(record)
            replicas.extend(record.replicas)
        await self._stop_replicas(replicas)
        for record in app.deployments.values():
            record.replicas.clear()
        del self._apps[name]
        self._refresh_routes()

    def _check_route_prefix(self, spec: ApplicationSpec) -> None:
        if spec.route_prefix is None:
            return
        for name, app in self._apps.items():
            if name != spec.name and app.spec.route_prefix == spec.route_prefix:
                raise ValueError(
                    f"Route prefix {spec.route_prefix!r} is already used by application "
                    f"{name!r}; choose another route_prefix or delete that application first."
                )

    # -- replicas ----------------------------------------------------------

    async def _start_replica(self, record: DeploymentRecord, rank: int) -> ReplicaRecord:
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
            raise _StartFailed(record.id, exc) from None
        options = record.spec.options
        return ReplicaRecord(
            replica_id,
            rank,
            info,
            graceful_shutdown_timeout_s=options.graceful_shutdown_timeout_s,
            next_health_check=self._clock() + options.health_check_period_s,
        )

    def _serves_http(self, deployment: DeploymentID) -> bool:
        app = self._apps.get(deployment.app_name)
        return (
            app is not None
            and app.spec.ingress == deployment.name
            and app.spec.route_prefix is not None
        )

    async def _stop_replicas(
        self,
        replicas: list[ReplicaRecord],
        timeout_s: float | None = None,
        record: DeploymentRecord | None = None,
    ) -> None:
        """Stop replicas (each within its graceful timeout, or ``timeout_s``), counted
        as stopping in ``record``'s status meanwhile."""
        if record is not None:
            record.stopping += len(replicas)
        try:
            await asyncio.gather(*(self._stop_one(r, timeout_s) for r in replicas))
        finally:
            if record is not None:
                record.stopping -= len(replicas)

    async def _stop_one(self, replica: ReplicaRecord, timeout_s: float | None) -> None:
        replica.state = ReplicaState.STOPPING
        timeout = replica.graceful_shutdown_timeout_s if timeout_s is None else timeout_s
        try:
            await self.backend.stop_replica(replica.info, timeout)
        except Exception:
            logger.exception("Stopping replica %s failed", replica.replica_id)

    def _publish(
        self,
        record: DeploymentRecord,
        replicas: tuple[ReplicaInfo, ...] | None = None,
        state: str = "running",
    ) -> None:
        infos = (
            tuple(r.info for r in record.replicas if r.state == ReplicaState.RUNNING)
            if replicas is None
            else replicas
        )
        # No replica, and starting one fails: callers get an answer now, not a wait.
        failed = not infos and record.start_failures > 0
        self._broadcast(
            ReplicaSet(
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
            )
        )

    def _broadcast(self, replica_set: ReplicaSet) -> None:
        self._publish_set(replica_set)  # to the routers in this process
        self.backend.publish(replica_set)  # and to those in replica processes

    def _in_background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- watching: health checks and replacement ---------------------------

    def _on_models(self, replica_id: str, model_ids: frozenset[str]) -> None:
        for app in self._apps.values():
            for record in app.deployments.values():
                for replica in record.replicas:
                    if replica.replica_id == replica_id:
                        replica.info = dataclasses.replace(replica.info, model_ids=model_ids)
                        self._publish(record)
                        return

    def _on_replica_exit(self, replica_id: str) -> None:
        self._exited.add(replica_id)
        self._wakeup.set()

    async def _watch(self) -> None:
        """The reconciliation loop: bring every running deployment to its target."""
        while True:
            now = self._clock()
            next_due = now + 1.0
            for app in list(self._apps.values()):
                if app.status in (ApplicationState.DEPLOYING, ApplicationState.DELETING):
                    continue  # deploy() and delete() own it meanwhile
                for record in list(app.deployments.values()):
                    next_due = min(next_due, self._reconcile(record, now))
            self._wakeup.clear()
            await wait_event(self._wakeup, max(0.005, next_due - now))

    def _reconcile(self, record: DeploymentRecord, now: float) -> float:
        """One pass over one deployment (decisions only; work runs in tasks).

        Returns when it next needs a look.
        """
        next_due = now + 1.0
        for replica in list(record.replicas):
            if replica.replica_id in self._exited:
                self._exited.discard(replica.replica_id)
                self._retire(record, replica, "the replica exited", "exited", timeout_s=0)
                continue
            if replica.checking or replica.state != ReplicaState.RUNNING:
                continue
            if replica.next_health_check <= now:
                replica.checking = True
                check = asyncio.ensure_future(self._check(record, replica))
                self._checks.add(check)
                check.add_done_callback(self._checks.discard)
            else:
                next_due = min(next_due, replica.next_health_check)
        # Too many (the target went down): drop starts first, then the highest ranks.
        for rank in sorted(record.starting, reverse=True):
            if len(record.replicas) + len(record.starting) <= record.target:
                break
            if rank >= record.target:
                record.starting.pop(rank).cancel()
        if len(record.replicas) > record.target:
            record.replicas.sort(key=lambda r: r.rank)
            surplus = record.replicas[record.target :]
            del record.replicas[record.target :]
            self._publish(record)
            self._in_background(self._stop_replicas(surplus, record=record))
        # Too few: start what is missing, once the backoff allows.
        missing = record.missing_ranks()
        if missing:
            if record.retry_at <= now:
                for rank in missing:
                    task = asyncio.ensure_future(self._start_one(record, rank))
                    record.starting[rank] = task
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
            else:
                next_due = min(next_due, record.retry_at)
        if record.autoscaler is not None and not record.scaling:
            if record.next_sample <= now:
                record.scaling = True
                self._in_background(self._autoscale(record))
            else:
                next_due = min(next_due, record.next_sample)
        self._refresh_state(record)
        return next_due

    async def _start_one(self, record: DeploymentRecord, rank: int) -> None:
        """Start the replica of ``rank`` for the loop; on failure, schedule the next try."""
        try:
            replica = await self._start_replica(record, rank)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._start_failed(record, exc)
            return
        finally:
            if record.starting.get(rank) is asyncio.current_task():
                del record.starting[rank]
            self._wakeup.set()
        if self._closing or record.removed:
            self._in_background(self._stop_replicas([replica], timeout_s=0))
            return
        if record.start_failures:
            logger.info(
                "Deployment %s recovered: replica %s started after %d failed start(s).",
                record.id, replica.replica_id, record.start_failures,
            )  # fmt: skip
        record.start_failures = 0
        record.last_error = ""
        record.retry_at = 0.0
        record.replicas.append(replica)
        record.replicas.sort(key=lambda r: r.rank)
        self._refresh_state(record)
        self._publish(record)

    def _start_failed(self, record: DeploymentRecord, exc: Exception) -> None:
        record.start_failures += 1
        delay = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (record.start_failures - 1))
        delay *= 1 + self._random.uniform(-RETRY_JITTER, RETRY_JITTER)
        record.retry_at = self._clock() + delay
        if isinstance(exc, _StartFailed):
            error = exc.error
            reason = "constructor" if "Traceback" in error.traceback_text else "refused"
            record.last_error = _last_line(error.traceback_text) or str(error)
            details = error.traceback_text
        else:  # the backend itself could not start it (e.g. out of file descriptors)
            reason = "backend"
            record.last_error = f"{type(exc).__name__}: {exc}"
            details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        key = (record.id.app_name, record.id.name, reason)
        self.start_failures[key] = self.start_failures.get(key, 0) + 1
        # The whole traceback the first time; one line for each failure after it.
        logger.warning(
            "Starting a replica of %s failed (%d in a row): %s; next try in %.1f s.%s",
            record.id, record.start_failures, record.last_error, delay,
            f"\n{details}" if record.start_failures == 1 else "",
        )  # fmt: skip
        self._refresh_state(record)
        self._publish(record)

    def _retire(
        self,
        record: DeploymentRecord,
        replica: ReplicaRecord,
        reason: str,
        kind: str,
        timeout_s: float | None = None,
    ) -> None:
        """Take a replica out of service and stop it; the loop starts its replacement."""
        if self._closing or record.removed or replica not in record.replicas:
            return
        logger.warning("Replacing replica %s of %s: %s.", replica.replica_id, record.id, reason)
        record.replicas.remove(replica)
        record.restarts += 1
        key = (record.id.app_name, record.id.name, kind)
        self.replica_restarts[key] = self.replica_restarts.get(key, 0) + 1
        self._refresh_state(record)
        self._publish(record)
        self._in_background(self._stop_replicas([replica], timeout_s=timeout_s, record=record))
        self._wakeup.set()

    async def _cancel_starts(self, record: DeploymentRecord) -> None:
        tasks = list(record.starting.values())
        record.starting.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _refresh_state(self, record: DeploymentRecord) -> None:
        """The deployment's state from its facts: HEALTHY only at its target."""
        running, target = len(record.replicas), record.target
        if record.message:  # e.g. reconfigure raised: every replica runs, but not as asked
            record.status = DeploymentState.UNHEALTHY
        elif running >= target and not record.starting:
            record.status = DeploymentState.HEALTHY
        elif record.start_failures:
            record.status = DeploymentState.UNHEALTHY
        else:
            record.status = DeploymentState.UPDATING

    def _describe(self, record: DeploymentRecord) -> str:
        """One sentence on what is missing, the last error and the next try."""
        running, target = len(record.replicas), record.target
        if record.status == DeploymentState.HEALTHY:
            return ""
        text = f"{running} of {target} replicas running"
        if record.starting:
            text += f", {len(record.starting)} starting"
        if record.start_failures:
            wait = max(0.0, record.retry_at - self._clock())
            text += (
                f"; starting a replica failed {record.start_failures} time(s) in a row, "
                f"last: {record.last_error}; "
                + ("trying again now" if record.starting else f"next try in {wait:.1f} s")
            )
        return text + "."

    async def _autoscale(self, record: DeploymentRecord) -> None:
        """Sample the deployment's load, ask its policy, and set the target it chooses."""
        policy = record.autoscaler
        assert policy is not None
        try:
            if record.replicas:
                await asyncio.wait(
                    [asyncio.ensure_future(self.backend.refresh(r.info)) for r in record.replicas],
                    timeout=AUTOSCALE_SAMPLE_S,
                )
            in_flight = sum(
                self.backend.describe(r.info).get("in_flight", 0) for r in record.replicas
            )
            now = self._clock()
            queued = self._queued(record.id) + self.backend.queued(record.id)
            policy.record(now, in_flight + queued)
            target = policy.decide(now, record.target)
            if target == record.target or self._closing or record.removed:
                return
            logger.info(
                "Scaling %s from %d to %d replicas (%s).",
                record.id, record.target, target,
                policy.last_decision.reason if policy.last_decision else "",
            )  # fmt: skip
            record.scaled_target = target
            if target > record.target:
                record.retry_at = 0.0  # new demand: do not wait out an old backoff
            self._wakeup.set()  # the loop starts or stops replicas to match
        finally:
            record.scaling = False
            interval = min(policy.config.metrics_interval_s, AUTOSCALE_SAMPLE_S)
            record.next_sample = self._clock() + interval

    async def _check(self, record: DeploymentRecord, replica: ReplicaRecord) -> None:
        options = record.spec.options
        try:
            await asyncio.wait_for(
                self.backend.check_health(replica.info), timeout=options.health_check_timeout_s
            )
        except asyncio.TimeoutError:
            self._retire(
                record,
                replica,
                f"check_health took longer than {options.health_check_timeout_s} s",
                "health_check",
            )
        except Exception as exc:
            self._retire(
                record,
                replica,
                f"check_health raised {type(exc).__name__}: {exc}",
                "health_check",
            )
        finally:
            replica.checking = False
            replica.next_health_check = self._clock() + options.health_check_period_s
            self._wakeup.set()

    # -- status ------------------------------------------------------------

    async def refresh_reports(self, timeout_s: float = 0.5) -> None:
        """Ask every replica for its in-flight count and request stats (bounded wait)."""
        infos = [
            r.info
            for app in self._apps.values()
            for d in app.deployments.values()
            for r in d.replicas
        ]
        if infos:
            await asyncio.wait(
                [asyncio.ensure_future(self.backend.refresh(info)) for info in infos],
                timeout=timeout_s,
            )

    def deployment_series(self) -> list[tuple[str, str, str, Any]]:
        """Per-method request series of every replica, for /metrics."""
        out = []
        for app_name, app in self._apps.items():
            for name, record in app.deployments.items():
                for replica in record.replicas:
                    stats = self.backend.describe(replica.info).get("stats")
                    for method, series in getattr(stats, "by_method", {}).items():
                        out.append((app_name, name, method, series))
        return out

    def status(self) -> Status:
        apps = {}
        for name, app in self._apps.items():
            deployments = {}
            for dname, record in app.deployments.items():
                replicas = []
                for r in record.replicas:
                    facts = self.backend.describe(r.info)
                    replicas.append(
                        ReplicaStatus(
                            replica_id=r.replica_id,
                            state=r.state,
                            rank=r.rank,
                            pid=facts.get("pid"),
                            in_flight=facts.get("in_flight", 0),
                            node=facts.get("node"),
                        )
                    )
                states: dict[str, int] = {}
                for r in record.replicas:
                    states[r.state] = states.get(r.state, 0) + 1
                for state, count in (
                    (ReplicaState.STARTING, len(record.starting)),
                    (ReplicaState.STOPPING, record.stopping),
                    (ReplicaState.FAILED, record.start_failures),
                ):
                    if count:
                        states[state] = states.get(state, 0) + count
                deployments[dname] = DeploymentStatus(
                    name=dname,
                    status=record.status,
                    message=record.message or self._describe(record),
                    target_replicas=record.target,
                    last_scaling_decision=(
                        record.autoscaler.last_decision.reason
                        if record.autoscaler is not None and record.autoscaler.last_decision
                        else ""
                    ),
                    running_replicas=states.get(ReplicaState.RUNNING, 0),
                    replica_states=states,
                    restarts=record.restarts,
                    replicas=tuple(replicas),
                )
            app_status = app.status
            if app_status == ApplicationState.RUNNING and any(
                d.status == DeploymentState.UNHEALTHY for d in deployments.values()
            ):
                app_status = ApplicationState.UNHEALTHY
            apps[name] = ApplicationStatus(
                name=name,
                status=app_status,
                message=app.message,
                route_prefix=app.spec.route_prefix,
                ingress=app.spec.ingress,
                last_deployed_time_s=app.deployed_at,
                deployments=deployments,
            )
        return Status(backend=self.backend.name, applications=apps)


def _last_line(traceback_text: str) -> str:
    """The exception line of a traceback ("ValueError: ..."), for one-line messages."""
    lines = [line for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _failure_error(failure: _StartFailed) -> DeploymentFailedError:
    where = f"Deployment {failure.deployment.name!r} of application {failure.deployment.app_name!r}"
    error = failure.error
    if "Traceback" not in error.traceback_text:  # refused before any user code ran
        return DeploymentFailedError(f"{where} cannot start: {error.traceback_text}")
    return DeploymentFailedError(
        f"{where} failed to start: its constructor raised {error}.\n\n"
        f"Original traceback:\n{error.traceback_text}"
    )
