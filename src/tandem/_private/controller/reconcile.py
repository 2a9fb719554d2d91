"""The reconciliation loop: every running deployment, kept at its target for as long as it exists.

One pass (:meth:`Reconciler._reconcile`) over a deployment retires replicas
that exited or failed their health checks, stops the surplus when the target
went down, starts the missing replicas once the backoff allows, asks the
autoscaler for a new target, and refreshes the deployment's state. It decides
without waiting: starts, stops, health checks and load samples run as tasks
of their own, so a slow constructor in one deployment delays no other. A start
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
from collections.abc import Callable, Mapping

from tandem._private.calls.context import DeploymentID
from tandem._private.controller.health import HealthChecks
from tandem._private.controller.records import ApplicationRecord, DeploymentRecord, ReplicaRecord
from tandem._private.controller.replicas import Fleet, retry_delay, start_failure
from tandem._private.controller.status import ApplicationState
from tandem._private.queues import wait_event

logger = logging.getLogger("tandem")

# Autoscaled deployments report their load at least this often (seconds).
AUTOSCALE_SAMPLE_S = 0.5


class Reconciler:
    """See the module docstring. :meth:`open` starts the loop, :meth:`close` ends it."""

    def __init__(
        self,
        apps: Mapping[str, ApplicationRecord],
        fleet: Fleet,
        clock: Callable[[], float],
        queued: Callable[[DeploymentID], int],
    ) -> None:
        self._apps = apps  # the controller's, read as they are now on every pass
        self._fleet = fleet
        self._backend = fleet.backend
        self._clock = clock
        self._queued = queued
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
        )
        # Counts for /metrics: (application, deployment, reason) -> events.
        self.replica_restarts: dict[tuple[str, str, str], int] = {}
        self.start_failures: dict[tuple[str, str, str], int] = {}

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
        if record.autoscaler is not None and not record.scaling:
            if record.next_sample <= now:
                record.scaling = True
                self._fleet.in_background(self._autoscale(record))
            else:
                next_due = min(next_due, record.next_sample)
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
        record.replicas.remove(replica)
        record.restarts += 1
        key = (record.id.app_name, record.id.name, kind)
        self.replica_restarts[key] = self.replica_restarts.get(key, 0) + 1
        record.refresh_state()
        self._fleet.publish(record)
        self._fleet.stop_later([replica], timeout_s=timeout_s, record=record)
        self._wakeup.set()

    # -- autoscaling -------------------------------------------------------

    async def _autoscale(self, record: DeploymentRecord) -> None:
        """Sample the deployment's load, ask its policy, and set the target it chooses."""
        policy = record.autoscaler
        assert policy is not None
        backend = self._backend
        try:
            if record.replicas:
                await asyncio.wait(
                    [asyncio.ensure_future(backend.refresh(r.info)) for r in record.replicas],
                    timeout=AUTOSCALE_SAMPLE_S,
                )
            in_flight = sum(backend.facts(r.info).in_flight for r in record.replicas)
            now = self._clock()
            queued = self._queued(record.id) + backend.queued(record.id)
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
