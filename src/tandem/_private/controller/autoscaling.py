"""How many replicas a deployment should have: a pure function of its load.

:class:`AutoscalingPolicy` takes samples of a deployment's ongoing requests
(in flight at its replicas plus queued at callers) and answers with a target
number of replicas. It holds only the little state the delays need, takes the
time as an argument, and does no I/O, so tests drive it with a fake clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from tandem._private.app.autoscaling_config import AutoscalingConfig


@dataclass(frozen=True)
class ScalingDecision:
    """The last change the policy asked for, for status()."""

    at: float
    from_replicas: int
    to_replicas: int
    reason: str


class AutoscalingPolicy:
    """Decides a deployment's replica count from its recent load (see the module docstring)."""

    def __init__(self, config: AutoscalingConfig) -> None:
        self.config = config
        self._samples: deque[tuple[float, float]] = deque()
        self._wanting_more_since: float | None = None
        self._wanting_fewer_since: float | None = None
        self.last_decision: ScalingDecision | None = None

    def record(self, now: float, ongoing: float) -> None:
        """One sample: requests in flight at the replicas plus queued at callers."""
        self._samples.append((now, ongoing))
        horizon = now - self.config.look_back_period_s
        while self._samples and self._samples[0][0] <= horizon:
            self._samples.popleft()

    def average_load(self) -> float:
        if not self._samples:
            return 0.0
        return sum(value for _, value in self._samples) / len(self._samples)

    def desired(self, current: int) -> int:
        """Replicas for the average load, smoothed and bounded (no delays applied)."""
        config = self.config
        load = self.average_load()
        ideal = load / config.target_ongoing_requests
        if ideal > current:
            factor = (
                config.upscaling_factor
                or config.upscale_smoothing_factor
                or config.smoothing_factor
            )
            wanted = math.ceil(current + (ideal - current) * factor)
        elif ideal < current:
            factor = (
                config.downscaling_factor
                or config.downscale_smoothing_factor
                or config.smoothing_factor
            )
            wanted = math.ceil(current - (current - ideal) * factor)
        else:
            wanted = current
        if load > 0 and wanted < 1:
            wanted = 1  # someone is waiting: never scale a loaded deployment to zero
        return max(config.min_replicas, min(config.max_replicas, wanted))

    def decide(self, now: float, current: int) -> int:
        """The target replica count now: changes only after the configured delays."""
        wanted = self.desired(current)
        if wanted > current:
            self._wanting_fewer_since = None
            if self._wanting_more_since is None:
                self._wanting_more_since = now
            # Scaling up from zero does not wait: a request is waiting for a replica.
            if current == 0 or now - self._wanting_more_since >= self.config.upscale_delay_s:
                return self._change(now, current, wanted, "load above target")
        elif wanted < current:
            self._wanting_more_since = None
            if self._wanting_fewer_since is None:
                self._wanting_fewer_since = now
            if now - self._wanting_fewer_since >= self.config.downscale_delay_s:
                return self._change(now, current, wanted, "load below target")
        else:
            self._wanting_more_since = self._wanting_fewer_since = None
        return current

    def _change(self, now: float, current: int, wanted: int, why: str) -> int:
        self._wanting_more_since = self._wanting_fewer_since = None
        self.last_decision = ScalingDecision(
            now,
            current,
            wanted,
            f"{why}: {self.average_load():.1f} ongoing requests, "
            f"target {self.config.target_ongoing_requests:g} per replica",
        )
        return wanted
