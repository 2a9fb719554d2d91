"""The reconciliation loop: every running deployment, kept at its target for as long as it exists.

One pass (:meth:`Reconciler._reconcile`) over a deployment retires replicas
that exited or failed their health checks, stops the surplus when the target
went down, starts the missing replicas once the backoff allows, asks the
autoscaler for a new target, and refreshes the deployment's state. It decides
without waiting: starts, stops, health checks and load samples run as tasks
of their own, so a slow constructor in one deployment delays no other. An
application with an application-level autoscaling policy is sampled and
decided as a whole (``controller/autoscaling.py`` says how). A start
that fails, for any reason, is tried again with exponential backoff and jitter,
never given up, so a deployment recovers by itself once the cause is gone.

Applications being deployed or deleted are left alone: the controller's
deploy and delete own them meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping

from tandem._private.calls.context import DeploymentID
from tandem._private.controller.autoscaling import ApplicationAutoscaler, Autoscaler
from tandem._private.controller.autoscaling_context import AutoscalingContext
from tandem._private.controller.describe import render_status
from tandem._private.controller.health import HealthChecks
from tandem._private.controller.records import (
    ApplicationRecord,
    DeploymentRecord,
    ReplicaRecord,
    RetiredReplica,
)
from tandem._private.controller.replicas import Fleet, retry_delay, start_failure
from tandem._private.controller.status import ApplicationState, Status
from tandem._private.queues import wait_event

logger = logging.getLogger("tandem")

# Autoscaled deployments report their load at least this often (seconds).
AUTOSCALE_SAMPLE_S = 0.5
# Replicas taken out of service that the dashboard lists (the latest).
KEPT_RETIRED = 100


class Reconciler:
    """See the module docstring. :meth:`open` starts the loop, :meth:`close` ends it."""

    def __init__(
        self,
        apps: Mapping[str, ApplicationRecord],
        fleet: Fleet,
        clock: Callable[[], float],
        queued: Callable[[DeploymentID], int],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._apps = apps  # the controller's, read as they are now on every pass
        self._fleet = fleet
        self._backend = fleet.backend
        self._clock = clock
        self._wall_clock = wall_clock  # autoscaling's time: policies see real timestamps
        self._queued = queued
        # Applications with an application-level autoscaling policy, by name.
        self._app_autoscalers: dict[str, ApplicationAutoscaler] = {}
        self._random = random.Random()
        self._wakeup = asyncio.Event()
        self._exited: set[str] = set()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._health = HealthChecks(
            self._backend,
            clock,
            on_unhealthy=lambda record, replica, why: self.retire(
                record, replica, why, "health_check"
            ),
            checked=self._wakeup.set,
            routing_stats_changed=self._fleet.publish,
        )
        # Counts for /metrics: (application, deployment, reason) -> events.
        self.replica_restarts: dict[tuple[str, str, str], int] = {}
        self.start_failures: dict[tuple[str, str, str], int] = {}
        # The latest replicas taken out of service, oldest first (the dashboard's).
        self.retired: deque[RetiredReplica] = deque(maxlen=KEPT_RETIRED)

    def open(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="tandem-controller-watch")

    async def close(self) -> None:
        """Stop the loop and its health checks; nothing is retired or restarted after this."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._health.close()

    # -- what the backend reports ------------------------------------------

    def replica_exited(self, replica_id: str) -> None:
        self._exited.add(replica_id)
        self._wakeup.set()

    def status(self) -> Status:
        return render_status(self._apps, self._backend, self._clock())

    def models_changed(self, replica_id: str, model_ids: frozenset[str]) -> None:
        """A replica's loaded models changed: routers prefer it for those models."""
        for app in self._apps.values():
            for record in app.deployments.values():
                for replica in record.replicas:
                    if replica.replica_id == replica_id:
                        replica.info = dataclasses.replace(replica.info, model_ids=model_ids)
                        self._fleet.publish(record)
                        return

    # -- the loop ----------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            now = self._clock()
            next_due = now + 1.0
            for app in list(self._apps.values()):
                if app.status in (ApplicationState.DEPLOYING, ApplicationState.DELETING):
                    continue  # deploy() and delete() own it meanwhile
                for record in list(app.deployments.values()):
                    next_due = min(next_due, self._reconcile(record, now))
                next_due = min(next_due, self._autoscale_if_due(app, now))
            for name in set(self._app_autoscalers) - set(self._apps):
                del self._app_autoscalers[name]
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
                self.retire(record, replica, "the replica exited", "exited", timeout_s=0)
                continue
            next_due = min(next_due, self._health.check_if_due(record, replica, now))
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
            self._fleet.publish(record)
            self._fleet.stop_later(surplus, record=record)
        # Too few: start what is missing, once the backoff allows.
        missing = record.missing_ranks()
        if missing:
            if record.retry_at <= now:
                for rank in missing:
                    record.starting[rank] = self._fleet.in_background(self._start_one(record, rank))
            else:
                next_due = min(next_due, record.retry_at)
        record.refresh_state()
        return next_due

    # -- replacing replicas ------------------------------------------------

    async def _start_one(self, record: DeploymentRecord, rank: int) -> None:
        """Start the replica of ``rank`` for the loop; on failure, schedule the next try."""
        try:
            replica = await self._fleet.start(record, rank)
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
            self._fleet.stop_later([replica], timeout_s=0)
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
        record.refresh_state()
        self._fleet.publish(record)

    def _start_failed(self, record: DeploymentRecord, exc: Exception) -> None:
        record.start_failures += 1
        delay = retry_delay(record.start_failures, self._random)
        record.retry_at = self._clock() + delay
        reason, record.last_error, details = start_failure(exc)
        key = (record.id.app_name, record.id.name, reason)
        self.start_failures[key] = self.start_failures.get(key, 0) + 1
        # The whole traceback the first time; one line for each failure after it.
        logger.warning(
            "Starting a replica of %s failed (%d in a row): %s; next try in %.1f s.%s",
            record.id, record.start_failures, record.last_error, delay,
            f"\n{details}" if record.start_failures == 1 else "",
        )  # fmt: skip
        record.refresh_state()
        self._fleet.publish(record)

    def retire(
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
        pid = self._backend.facts(replica.info).pid
        self.retired.append(RetiredReplica(time.time(), record.id, replica.replica_id, pid, reason))
        record.replicas.remove(replica)
        record.restarts += 1
        key = (record.id.app_name, record.id.name, kind)
        self.replica_restarts[key] = self.replica_restarts.get(key, 0) + 1
        record.refresh_state()
        self._fleet.publish(record)
        self._fleet.stop_later([replica], timeout_s=timeout_s, record=record)
        self._wakeup.set()

    # -- autoscaling -------------------------------------------------------

    def _autoscale_if_due(self, app: ApplicationRecord, now: float) -> float:
        """Start the autoscaling passes that are due; return when the next one is."""
        scaled = [r for r in app.deployments.values() if r.autoscaler is not None]
        policy = app.spec.autoscaling_policy
        if policy is None or not scaled:
            self._app_autoscalers.pop(app.spec.name, None)
            next_due = float("inf")
            for record in scaled:
                if record.scaling:
                    continue
                if record.next_sample <= now:
                    record.scaling = True
                    self._fleet.in_background(self._autoscale([record], None))
                else:
                    next_due = min(next_due, record.next_sample)
            return next_due
        # One policy for the whole application: all of it is sampled and decided at once.
        whole = self._app_autoscalers.get(app.spec.name)
        if whole is None or whole.policy != policy:
            whole = self._app_autoscalers[app.spec.name] = ApplicationAutoscaler(
                app.spec.name, policy
            )
            for record in scaled:
                own = record.spec.options.autoscaling
                if own is not None and not own.policy.is_default_policy_function():
                    logger.warning(
                        "Deployment %s has an autoscaling policy of its own and its "
                        "application has one too; the application's decides (as in Ray Serve).",
                        record.id,
                    )
        if any(r.scaling for r in scaled):
            return float("inf")  # the pass under way wakes the loop when it ends
        due = min(r.next_sample for r in scaled)
        if due > now:
            return due
        for record in scaled:
            record.scaling = True
        self._fleet.in_background(self._autoscale(scaled, whole))
        return float("inf")

    async def _autoscale(
        self, records: list[DeploymentRecord], whole: ApplicationAutoscaler | None
    ) -> None:
        """Sample the deployments' load and custom metrics, ask the policy (theirs, or
        ``whole``, the application's) and set the targets it chooses."""
        # A redeploy may replace an autoscaler meanwhile: this pass keeps to these.
        scalers = [(r, r.autoscaler) for r in records if r.autoscaler is not None]
        try:
            await asyncio.gather(*(self._sample(r, a) for r, a in scalers))
            now = self._wall_clock()
            members: dict[DeploymentID, tuple[Autoscaler, AutoscalingContext]] = {}
            for record, autoscaler in scalers:
                replica_ids = [r.replica_id for r in record.replicas]
                ctx = autoscaler.context(record.id, replica_ids, record.target, now)
                members[record.id] = (autoscaler, ctx)
            if whole is not None:
                targets = whole.decide(members, now)
            else:
                targets = {dep: auto.decide(ctx) for dep, (auto, ctx) in members.items()}
            for record, autoscaler in scalers:
                if record.id in targets and record.autoscaler is autoscaler:
                    self._scale(record, autoscaler, targets[record.id])
        except Exception:  # a fault of tandem's (policies' own errors are handled inside)
            logger.exception("Autoscaling %s failed.", ", ".join(str(r.id) for r in records))
        finally:
            for record in records:
                record.scaling = False
                if record.autoscaler is not None:
                    interval = min(record.autoscaler.config.metrics_interval_s, AUTOSCALE_SAMPLE_S)
                    record.next_sample = self._clock() + interval
            self._wakeup.set()

    async def _sample(self, record: DeploymentRecord, autoscaler: Autoscaler) -> None:
        """Record the deployment's requests (running and queued) and custom metrics."""
        backend = self._backend
        replicas = list(record.replicas)
        if replicas:
            await asyncio.wait(
                [asyncio.ensure_future(backend.refresh(r.info)) for r in replicas],
                timeout=AUTOSCALE_SAMPLE_S,
            )
        facts = {r.replica_id: backend.facts(r.info) for r in replicas}
        queued = self._queued(record.id) + backend.queued(record.id)
        in_flight = sum(f.in_flight for f in facts.values())
        stats = {replica_id: f.autoscaling_stats for replica_id, f in facts.items()}
        autoscaler.record(self._wall_clock(), in_flight + queued, queued, stats)

    def _scale(self, record: DeploymentRecord, autoscaler: Autoscaler, target: int) -> None:
        """Set the target the autoscaler chose; the loop starts or stops replicas to match."""
        decision = autoscaler.last_decision
        self.set_target(record, target, decision.reason if decision else "")

    def set_target(self, record: DeploymentRecord, target: int, why: str) -> None:
        """Set a deployment's target (the autoscaler's or an external scaler's choice) and
        wake the loop, which starts or stops replicas to match."""
        if target == record.target or self._closing or record.removed:
            return
        logger.info(
            "Scaling %s from %d to %d replicas (%s).", record.id, record.target, target, why
        )
        if target > record.target:
            record.retry_at = 0.0  # new demand: do not wait out an old backoff
        record.scaled_target = target
        record.refresh_state()
        self._wakeup.set()
