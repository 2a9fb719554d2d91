"""A replica's custom autoscaling metrics: the user's ``record_autoscaling_stats``.

For an autoscaled deployment whose class has that method (sync or async),
:class:`AutoscalingStats` calls it in the replica every
``min(metrics_interval_s, look_back_period_s / 5)`` seconds, as Ray Serve does,
and keeps what it returned over ``look_back_period_s``; the replica's facts
carry that window to the controller, where policies read it as
``ctx.raw_metrics`` and ``ctx.aggregated_metrics``.

A call that raises or takes longer than ``RECORD_TIMEOUT_S`` is logged and
skipped. A result that is not a dict of numbers is logged and ends the calls
for this replica (as in Ray Serve): the policy would misread it every time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from tandem._private.app.autoscaling_config import AutoscalingConfig
from tandem._private.queues import bounded

logger = logging.getLogger("tandem")

# Ray Serve's default of RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S.
RECORD_TIMEOUT_S = 10.0
# Samples are taken at least this often per look-back window (Ray Serve's factor 0.2).
SAMPLES_PER_WINDOW = 5

# (time since the epoch, {metric: value}), oldest first.
StatsWindow = tuple[tuple[float, dict[str, float]], ...]


class AutoscalingStats:
    """See the module docstring. :meth:`open` starts the calls, :meth:`close` ends them."""

    def __init__(
        self,
        call: Callable[[], Awaitable[Any]],
        owner: str,
        config: AutoscalingConfig,
        clock: Callable[[], float] = time.time,
        timeout_s: float = RECORD_TIMEOUT_S,
    ) -> None:
        self._call = call
        self._owner = owner  # e.g. "replica app#Model#1a2b3c", for the log
        self.interval_s = min(
            config.metrics_interval_s, config.look_back_period_s / SAMPLES_PER_WINDOW
        )
        self._window_s = config.look_back_period_s
        self._clock = clock
        self._timeout_s = timeout_s
        self._samples: deque[tuple[float, dict[str, float]]] = deque()
        self.enabled = True
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def started(
        cls,
        config: AutoscalingConfig | None,
        method: Callable[..., Any] | None,
        invoke: Callable[[Callable[..., Any]], Awaitable[Any]],
        replica_id: str,
    ) -> AutoscalingStats | None:
        """Calls of ``method`` through the replica's ``invoke``, started, if the deployment
        autoscales (``config``) and has a ``record_autoscaling_stats`` method."""
        if config is None or method is None:
            return None
        stats = cls(lambda: invoke(method), f"replica {replica_id}", config)
        stats.open()
        return stats

    def open(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def window(self) -> StatsWindow:
        return tuple(self._samples)

    async def record(self) -> None:
        """Call the method once and keep what it returned (see the module docstring)."""
        try:
            result = await bounded(self._call(), self._timeout_s)
        except asyncio.TimeoutError:
            logger.error(
                "record_autoscaling_stats of %s took longer than %.0f s; this sample is skipped.",
                self._owner,
                self._timeout_s,
            )
            return
        except Exception as exc:
            logger.error(
                "record_autoscaling_stats of %s raised %s: %s; this sample is skipped.",
                self._owner,
                type(exc).__name__,
                exc,
            )
            return
        problem = _problem(result)
        if problem is not None:
            logger.error(
                "record_autoscaling_stats of %s must return a dict of metric names to "
                "numbers, but %s; it is not called again for this replica.",
                self._owner,
                problem,
            )
            self.enabled = False
            return
        now = self._clock()
        self._samples.append((now, {name: float(value) for name, value in result.items()}))
        while self._samples and self._samples[0][0] < now - self._window_s:
            self._samples.popleft()

    async def _run(self) -> None:
        while self.enabled:
            await self.record()
            await asyncio.sleep(self.interval_s)


def _problem(result: Any) -> str | None:
    """What is wrong with a result of record_autoscaling_stats (None: nothing)."""
    if not isinstance(result, dict):
        return f"it returned {type(result).__name__}"
    for name, value in result.items():
        if not isinstance(value, int | float):
            return f"metric {name!r} is {type(value).__name__}"
    return None
