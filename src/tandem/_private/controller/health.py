"""Health checks: each running replica's ``check_health``, every ``health_check_period_s``.

The reconciliation loop asks :meth:`HealthChecks.check_if_due` about each
replica it looks at; a check that is due runs as a task of its own (a slow one
delays nothing else). A check that raises, or takes longer than
``health_check_timeout_s``, hands the replica to ``on_unhealthy``, which
replaces it. The tasks belong to :class:`HealthChecks`; :meth:`close` cancels
them, so a hanging check cannot delay shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tandem._private.backends.base import Backend
from tandem._private.controller.records import DeploymentRecord, ReplicaRecord
from tandem._private.controller.status import ReplicaState

# Called with the deployment, its replica and why the replica is unhealthy.
OnUnhealthy = Callable[[DeploymentRecord, ReplicaRecord, str], None]


class HealthChecks:
    """See the module docstring. ``checked`` is called after every check, to wake the loop."""

    def __init__(
        self,
        backend: Backend,
        clock: Callable[[], float],
        on_unhealthy: OnUnhealthy,
        checked: Callable[[], None],
    ) -> None:
        self._backend = backend
        self._clock = clock
        self._on_unhealthy = on_unhealthy
        self._checked = checked
        self._tasks: set[asyncio.Task[Any]] = set()

    def check_if_due(self, record: DeploymentRecord, replica: ReplicaRecord, now: float) -> float:
        """Start the replica's check if it is due; return when to look again (inf: never)."""
        if replica.checking or replica.state != ReplicaState.RUNNING:
            return float("inf")
        if replica.next_health_check > now:
            return replica.next_health_check
        replica.checking = True
        task = asyncio.ensure_future(self._check(record, replica))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return float("inf")  # the check wakes the loop when it ends

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
