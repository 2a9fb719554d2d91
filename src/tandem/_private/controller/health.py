"""Health checks: each running replica's ``check_health``, every ``health_check_period_s``.

The reconciliation loop asks :meth:`HealthChecks.check_if_due` about each
replica it looks at; a check that is due runs as a task of its own (a slow one
delays nothing else). A check that raises, or takes longer than
``health_check_timeout_s``, hands the replica to ``on_unhealthy``, which
replaces it. The tasks belong to :class:`HealthChecks`; :meth:`close` cancels
them, so a hanging check cannot delay shutdown.

Replicas whose class has ``record_routing_stats`` have their routing stats read
(from the replica's facts, see ``replica/routing_stats.py``) every
``request_routing_stats_period_s`` the same way; stats that changed go into the
replica's ``ReplicaInfo`` and ``routing_stats_changed`` publishes the
deployment's replicas, so request routers in every caller see them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from tandem._private.backends.base import Backend
from tandem._private.controller.records import DeploymentRecord, ReplicaRecord
from tandem._private.controller.status import ReplicaState
from tandem._private.replica.routing_stats import records_routing_stats, stats_schedule

logger = logging.getLogger("tandem")

# Called with the deployment, its replica and why the replica is unhealthy.
OnUnhealthy = Callable[[DeploymentRecord, ReplicaRecord, str], None]

# A replica that has no routing stats yet (it just started) is read again this soon.
FIRST_STATS_RETRY_S = 0.5


class HealthChecks:
    """See the module docstring. ``checked`` is called after every check, to wake the loop."""

    def __init__(
        self,
        backend: Backend,
        clock: Callable[[], float],
        on_unhealthy: OnUnhealthy,
        checked: Callable[[], None],
        routing_stats_changed: Callable[[DeploymentRecord], None] | None = None,
    ) -> None:
        self._backend = backend
        self._clock = clock
        self._on_unhealthy = on_unhealthy
        self._checked = checked
        self._routing_stats_changed = routing_stats_changed
        self._tasks: set[asyncio.Task[Any]] = set()

    def check_if_due(self, record: DeploymentRecord, replica: ReplicaRecord, now: float) -> float:
        """Start the replica's check (and routing stats read) if due; return when to look
        again (inf: never)."""
        return min(
            self._health_if_due(record, replica, now), self._stats_if_due(record, replica, now)
        )

    def _health_if_due(self, record: DeploymentRecord, replica: ReplicaRecord, now: float) -> float:
        if replica.checking or replica.state != ReplicaState.RUNNING:
            return float("inf")
        if replica.next_health_check > now:
            return replica.next_health_check
        replica.checking = True
        self._start(self._check(record, replica))
        return float("inf")  # the check wakes the loop when it ends

    def _stats_if_due(self, record: DeploymentRecord, replica: ReplicaRecord, now: float) -> float:
        if (
            self._routing_stats_changed is None
            or replica.reading_stats
            or replica.state != ReplicaState.RUNNING
            or not records_routing_stats(record.spec.target)
        ):
            return float("inf")
        if replica.next_routing_stats > now:
            return replica.next_routing_stats
        replica.reading_stats = True
        self._start(self._read_stats(record, replica))
        return float("inf")  # the read wakes the loop when it ends

    def _start(self, check: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(check)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel the checks that still run and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _check(self, record: DeploymentRecord, replica: ReplicaRecord) -> None:
        options = record.spec.options
        try:
            await asyncio.wait_for(
                self._backend.check_health(replica.info), timeout=options.health_check_timeout_s
            )
        except asyncio.TimeoutError:
            self._on_unhealthy(
                record,
                replica,
                f"check_health took longer than {options.health_check_timeout_s} s",
            )
        except Exception as exc:
            self._on_unhealthy(record, replica, f"check_health raised {type(exc).__name__}: {exc}")
        finally:
            replica.checking = False
            replica.next_health_check = self._clock() + options.health_check_period_s
            self._checked()

    async def _read_stats(self, record: DeploymentRecord, replica: ReplicaRecord) -> None:
        period, timeout = stats_schedule(record.spec.options)
        stats = None
        try:
            await asyncio.wait_for(self._backend.refresh(replica.info), timeout)
            stats = self._backend.facts(replica.info).routing_stats
        except Exception as exc:  # the replica may be stopping; the next read tells
            logger.debug("Reading routing stats of %s failed: %r", replica.replica_id, exc)
        finally:
            replica.reading_stats = False
            wait = period if stats is not None else min(period, FIRST_STATS_RETRY_S)
            replica.next_routing_stats = self._clock() + wait
            self._checked()
        if stats is None or stats == replica.info.routing_stats:
            return
        if replica in record.replicas and not record.removed:
            replica.info = dataclasses.replace(replica.info, routing_stats=stats)
            assert self._routing_stats_changed is not None
            self._routing_stats_changed(record)
