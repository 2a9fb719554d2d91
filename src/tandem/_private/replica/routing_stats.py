"""Routing stats: a replica's ``record_routing_stats()``, called every
``request_routing_stats_period_s``.

A deployment whose class defines ``record_routing_stats(self) -> dict`` has it
called in each replica, first as the replica starts and then once per period
(with a jitter of 10%, so replicas do not all call at once), each call bounded
by ``request_routing_stats_timeout_s``. The last dict it returned is part of
the replica's facts; the controller polls them (``controller/health.py``) and
publishes them in the replica set, where request routers read them as
``RunningReplica.routing_stats``. A call that raises, times out or returns no
dict is logged and leaves the last stats in place: the replica serves on.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from tandem._private.app.options import DeploymentOptions
from tandem._private.app.request_router_config import (
    DEFAULT_ROUTING_STATS_PERIOD_S,
    DEFAULT_ROUTING_STATS_TIMEOUT_S,
)
from tandem._private.queues import bounded

logger = logging.getLogger("tandem")

METHOD = "record_routing_stats"


def records_routing_stats(target: Any) -> bool:
    """Whether a deployment's class defines ``record_routing_stats``."""
    return isinstance(target, type) and callable(getattr(target, METHOD, None))


def stats_schedule(options: DeploymentOptions) -> tuple[float, float]:
    """(period, timeout) of a deployment's routing stats, in seconds."""
    config = options.request_router_config
    if config is None:
        return DEFAULT_ROUTING_STATS_PERIOD_S, DEFAULT_ROUTING_STATS_TIMEOUT_S
    return config.request_routing_stats_period_s, config.request_routing_stats_timeout_s


class RoutingStats:
    """Calls ``record`` (the user's method, as the replica) on schedule; keeps the last
    dict. :meth:`open` starts the task, :meth:`close` ends it."""

    @classmethod
    def started(
        cls,
        options: DeploymentOptions,
        method: Callable[..., Any] | None,
        invoke: Callable[[Callable[..., Any]], Awaitable[Any]],
        replica_id: str,
    ) -> RoutingStats | None:
        """Calls to ``method`` (the user's record_routing_stats, or None: no calls)
        through ``invoke``, started."""
        if method is None:
            return None
        period, timeout = stats_schedule(options)
        stats = cls(lambda: invoke(method), period, timeout, replica_id)
        stats.open()
        return stats

    def __init__(
        self,
        record: Callable[[], Awaitable[Any]],
        period_s: float,
        timeout_s: float,
        replica_id: str,
        rng: random.Random | None = None,
    ) -> None:
        self._record = record
        self._period_s = period_s
        self._timeout_s = timeout_s
        self._replica_id = replica_id
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self.latest: dict[str, Any] | None = None  # None until a call returned a dict

    def open(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self.record_once()
            await asyncio.sleep(self._period_s * self._rng.uniform(0.9, 1.1))

    async def record_once(self) -> None:
        try:
            stats = await bounded(self._record(), self._timeout_s)
        except asyncio.TimeoutError:
            logger.warning(
                "record_routing_stats of replica %s took longer than %s s "
                "(request_routing_stats_timeout_s); its routing stats stay as they were.",
                self._replica_id,
                self._timeout_s,
            )
            return
        except Exception:
            logger.exception(
                "record_routing_stats of replica %s raised; its routing stats stay as they were.",
                self._replica_id,
            )
            return
        if not isinstance(stats, dict):
            logger.error(
                "record_routing_stats of replica %s returned %s, not a dict; its routing "
                "stats stay as they were.",
                self._replica_id,
                type(stats).__name__,
            )
            return
        self.latest = dict(stats)
