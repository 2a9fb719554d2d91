"""What an autoscaling policy is given: :class:`AutoscalingContext` (Ray Serve's
class, attribute for attribute), the ids and samples it holds, and
:func:`aggregate`, which turns samples over the look-back window into one number
as the deployment's ``aggregation_function`` says.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

from tandem._private.app.autoscaling_config import AggregationFunction
from tandem._private.calls.context import DeploymentID, ReplicaID

T = TypeVar("T")

# The last sample of a window counts for at least this long (seconds), so a sample
# taken this instant still weighs in the mean (as in Ray Serve).
MIN_LAST_SAMPLE_S = 1e-3


@dataclass(order=True, frozen=True)
class TimeStampedValue:
    """One sample of a metric: when (seconds since the epoch) and what."""

    timestamp: float
    value: float = field(compare=False)


# A metric over time, oldest first.
TimeSeries = list[TimeStampedValue]


def aggregate(
    samples: Sequence[tuple[float, float]], how: AggregationFunction, now: float
) -> float:
    """One number for ``samples`` ((time, value), oldest first): their peak, their
    trough, or their mean weighted by how long each held (the last until ``now``).

    0.0 without samples.
    """
    if not samples:
        return 0.0
    if how == AggregationFunction.MAX:
        return max(value for _, value in samples)
    if how == AggregationFunction.MIN:
        return min(value for _, value in samples)
    total = weight = 0.0
    for (at, value), (until, _) in itertools.pairwise(samples):
        total += value * (until - at)
        weight += until - at
    last_at, last = samples[-1]
    held = max(now - last_at, MIN_LAST_SAMPLE_S)
    return (total + last * held) / (weight + held)


class AutoscalingContext:
    """Everything a custom policy may decide on (Ray Serve's ``AutoscalingContext``).

    ``total_num_requests``, ``total_queued_requests``, ``aggregated_metrics`` and
    ``raw_metrics`` may be given as callables: they are then computed on first
    read, once.
    """

    def __init__(
        self,
        deployment_id: DeploymentID,
        deployment_name: str,
        app_name: str | None,
        current_num_replicas: int,
        target_num_replicas: int,
        running_replicas: list[ReplicaID],
        total_num_requests: float | Callable[[], float],
        total_queued_requests: float | Callable[[], float] | None,
        aggregated_metrics: (
            dict[str, dict[ReplicaID, float]]
            | Callable[[], dict[str, dict[ReplicaID, float]]]
            | None
        ),
        raw_metrics: (
            dict[str, dict[ReplicaID, TimeSeries]]
            | Callable[[], dict[str, dict[ReplicaID, TimeSeries]]]
            | None
        ),
        capacity_adjusted_min_replicas: int,
        capacity_adjusted_max_replicas: int,
        policy_state: dict[str, Any],
        last_scale_up_time: float | None,
        last_scale_down_time: float | None,
        current_time: float | None,
        config: Any | None,
    ) -> None:
        self.deployment_id = deployment_id
        self.deployment_name = deployment_name
        self.app_name = app_name
        self.current_num_replicas = current_num_replicas  # running now
        self.target_num_replicas = target_num_replicas  # the current target
        self.running_replicas = running_replicas
        self._total_num_requests = total_num_requests
        self._total_queued_requests = total_queued_requests
        self._aggregated_metrics = aggregated_metrics
        self._raw_metrics = raw_metrics
        # tandem has no target_capacity: these are min_replicas and max_replicas.
        self.capacity_adjusted_min_replicas = capacity_adjusted_min_replicas
        self.capacity_adjusted_max_replicas = capacity_adjusted_max_replicas
        self.policy_state = policy_state
        self.last_scale_up_time = last_scale_up_time
        self.last_scale_down_time = last_scale_down_time
        self.current_time = current_time
        self.config = config  # the deployment's AutoscalingConfig

    @cached_property
    def total_num_requests(self) -> float:
        """Requests running at the replicas plus waiting at callers, aggregated."""
        return _value(self._total_num_requests)

    @cached_property
    def total_queued_requests(self) -> float:
        """Requests waiting at callers for a replica, aggregated."""
        value = _value(self._total_queued_requests)
        return 0.0 if value is None else value

    @property
    def total_running_requests(self) -> float:
        return max(0.0, self.total_num_requests - self.total_queued_requests)

    @cached_property
    def aggregated_metrics(self) -> dict[str, dict[ReplicaID, float]] | None:
        """Each custom metric (``record_autoscaling_stats``), aggregated per replica."""
        return _value(self._aggregated_metrics)

    @cached_property
    def raw_metrics(self) -> dict[str, dict[ReplicaID, TimeSeries]] | None:
        """Each custom metric's samples per replica, over the look-back window."""
        return _value(self._raw_metrics)

    def __repr__(self) -> str:
        return (
            f"AutoscalingContext(deployment_id={self.deployment_id!r}, "
            f"current_num_replicas={self.current_num_replicas}, "
            f"target_num_replicas={self.target_num_replicas})"
        )


def _value(value: T | Callable[[], T]) -> T:
    return value() if callable(value) else value
