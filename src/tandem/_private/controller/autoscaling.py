"""How many replicas a deployment should have, decided as Ray Serve decides it.

An :class:`Autoscaler` per autoscaled deployment keeps what the reconciliation
loop samples (requests running and queued over ``look_back_period_s``, and the
replicas' ``record_autoscaling_stats`` values), hands it to the policy as an
``AutoscalingContext``, and turns the policy's raw answer into a target:

1. requests waiting and no replica running: replicas at once, policy or not;
2. otherwise ``upscaling_factor``/``downscaling_factor`` scale the step the
   policy asked for, ``upscale_delay_s``/``downscale_delay_s`` (and
   ``downscale_to_zero_delay_s`` for the last replica) hold it back until it
   was wanted that long, and ``min_replicas``/``max_replicas`` bound it.

An :class:`ApplicationAutoscaler` asks a config file's application-level policy
for all of an application's autoscaled deployments at once and passes each
answer through step 2 of that deployment. A policy that raises or answers
something else than Ray Serve's contract changes nothing: the deployment keeps
its target, the error is logged (in full the first time) and status shows it.

Nothing here does I/O; the time is passed in, so tests drive it exactly.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tandem._private.app.autoscaling_config import AutoscalingConfig, AutoscalingPolicy
from tandem._private.calls.context import DeploymentID, ReplicaID
from tandem._private.controller.autoscaling_context import (
    AutoscalingContext,
    TimeSeries,
    TimeStampedValue,
    aggregate,
)
from tandem._private.controller.autoscaling_policies import (
    cold_start_replicas,
    is_built_in,
    make_policy,
)

logger = logging.getLogger("tandem")

# Tolerance of the delay comparisons: differences of large timestamps lose a little.
DELAY_EPS_S = 1e-6
KEPT_DECISIONS = 50  # scaling decisions kept for the dashboard

# What a replica reports of record_autoscaling_stats: (time, {metric: value}), oldest first.
StatsWindow = Sequence[tuple[float, Mapping[str, float]]]


class PolicyError(Exception):
    """A policy's answer that is not (target_replicas, policy_state)."""


@dataclass(frozen=True)
class ScalingDecision:
    """The last change the autoscaler made (or why it made none), for status()."""

    at: float
    from_replicas: int
    to_replicas: int
    reason: str


class Autoscaler:
    """One deployment's autoscaling state (see the module docstring)."""

    def __init__(self, config: AutoscalingConfig) -> None:
        self.config = config
        self._load: deque[tuple[float, float, float]] = deque()  # (time, ongoing, queued)
        self._stats: dict[str, StatsWindow] = {}  # by replica id
        self._policy: Callable[..., Any] | None = None  # made on first use
        self.policy_state: dict[str, Any] = {}
        self._wanting = 0  # +1 wanting more replicas, -1 fewer, since _wanting_since
        self._wanting_since = 0.0
        self.last_scale_up_time: float | None = None
        self.last_scale_down_time: float | None = None
        self.last_decision: ScalingDecision | None = None
        # The latest decisions, oldest first (the dashboard's timeline).
        self.decisions: deque[ScalingDecision] = deque(maxlen=KEPT_DECISIONS)
        self.error: str | None = None  # the policy's failure, while it keeps failing

    # -- what the loop samples ---------------------------------------------

    def record(
        self,
        now: float,
        ongoing: float,
        queued: float = 0.0,
        stats: Mapping[str, StatsWindow] | None = None,
    ) -> None:
        """A sample: requests running at the replicas plus waiting at callers, those
        waiting, and each running replica's custom metrics (by replica id)."""
        self._load.append((now, ongoing, queued))
        horizon = now - self.config.look_back_period_s
        while len(self._load) > 1 and self._load[0][0] <= horizon:
            self._load.popleft()
        self._stats = dict(stats or {})

    def total_requests(self, now: float) -> float:
        return aggregate([(t, v) for t, v, _ in self._load], self.config.aggregation_function, now)

    def context(
        self, deployment_id: DeploymentID, replica_ids: Sequence[str], target: int, now: float
    ) -> AutoscalingContext:
        """What the policy sees now; ``replica_ids``: the replicas running."""
        config = self.config
        how = config.aggregation_function
        running = [ReplicaID.of(r, deployment_id) for r in replica_ids]

        def raw() -> dict[str, dict[ReplicaID, TimeSeries]]:
            horizon = now - config.look_back_period_s
            out: dict[str, dict[ReplicaID, TimeSeries]] = {}
            for replica in running:
                for at, values in self._stats.get(replica.to_full_id_str(), ()):
                    if at < horizon:
                        continue
                    for name, value in values.items():
                        series = out.setdefault(name, {}).setdefault(replica, [])
                        series.append(TimeStampedValue(at, float(value)))
            return out

        def aggregated() -> dict[str, dict[ReplicaID, float]]:
            return {
                name: {
                    replica: aggregate([(s.timestamp, s.value) for s in series], how, now)
                    for replica, series in by_replica.items()
                }
                for name, by_replica in raw().items()
            }

        return AutoscalingContext(
            deployment_id=deployment_id,
            deployment_name=deployment_id.name,
            app_name=deployment_id.app_name,
            current_num_replicas=len(running),
            target_num_replicas=target,
            running_replicas=running,
            total_num_requests=lambda: self.total_requests(now),
            total_queued_requests=lambda: aggregate([(t, q) for t, _, q in self._load], how, now),
            aggregated_metrics=aggregated,
            raw_metrics=raw,
            capacity_adjusted_min_replicas=config.min_replicas,
            capacity_adjusted_max_replicas=config.max_replicas,
            policy_state=dict(self.policy_state),
            last_scale_up_time=self.last_scale_up_time,
            last_scale_down_time=self.last_scale_down_time,
            current_time=now,
            config=config,
        )

    # -- deciding ----------------------------------------------------------

    def decide(self, ctx: AutoscalingContext) -> int:
        """The deployment's target now, by its own policy."""
        now = ctx.current_time or 0.0
        cold = cold_start_replicas(ctx)
        if cold is not None:
            return self.settle(ctx, cold, "requests are waiting and no replica runs")
        policy = self.config.policy
        try:
            if self._policy is None:
                self._policy = make_policy(policy, f"deployment {ctx.deployment_id}")
            desired, state = _target_and_state(self._policy(ctx))
        except Exception as exc:
            self.failed(ctx, f"autoscaling policy {policy.label}", exc)
            return ctx.target_num_replicas
        self.recovered(ctx.deployment_id, policy.label)
        self.policy_state = state
        return self.apply(ctx, desired, now)

    def apply(self, ctx: AutoscalingContext, desired: float, now: float, who: str = "") -> int:
        """A policy's raw ``desired`` count, through the factors, delays and bounds."""
        current, target = ctx.current_num_replicas, ctx.target_num_replicas
        if current == 0:
            scaled = math.ceil(desired)  # a factor of nothing means nothing
        else:
            up = desired > current
            factor = (
                self.config.get_upscaling_factor() if up else self.config.get_downscaling_factor()
            )
            scaled = math.ceil(current + factor * (desired - current))
            if math.ceil(desired) < current and scaled == current:
                scaled -= 1  # a small factor must not stall a scale-down forever
        if current == 0 and scaled > 0:
            decision = scaled  # from zero: someone waits
        else:
            decision = self._after_delay(max(0, scaled), target, now)
        return self.settle(ctx, decision, self._why(ctx, desired, decision, who))

    def settle(self, ctx: AutoscalingContext, decision: int, reason: str) -> int:
        """``decision`` within min/max replicas; a change is remembered for status()."""
        bounded = max(self.config.min_replicas, min(self.config.max_replicas, decision))
        target = ctx.target_num_replicas
        now = ctx.current_time or 0.0
        if bounded != target:
            if bounded > target:
                self.last_scale_up_time = now
            else:
                self.last_scale_down_time = now
            self._decided(ScalingDecision(now, target, bounded, reason))
        return bounded

    def _after_delay(self, desired: int, target: int, now: float) -> int:
        """``desired`` once it was wanted for the delay of its direction, else ``target``."""
        if desired == target:
            self._wanting = 0
            return target
        direction = 1 if desired > target else -1
        if self._wanting != direction:
            self._wanting, self._wanting_since = direction, now
        if direction > 0:
            delay = self.config.upscale_delay_s
        elif target == 1:  # the last replica
            zero_delay = self.config.downscale_to_zero_delay_s
            delay = self.config.downscale_delay_s if zero_delay is None else zero_delay
        else:
            delay = self.config.downscale_delay_s
            desired = max(1, desired)  # to zero only from one replica
        if now - self._wanting_since + DELAY_EPS_S >= delay:
            self._wanting = 0
            return desired
        return target

    def _why(self, ctx: AutoscalingContext, desired: float, decision: int, who: str) -> str:
        if who:
            return f"{who} asked for {desired:g} replicas"
        policy = self.config.policy
        if self._policy is not None and not is_built_in(self._policy):
            return f"autoscaling policy {policy.label} asked for {desired:g} replicas"
        where = "above" if decision > ctx.target_num_replicas else "below"
        return (
            f"load {where} target: {ctx.total_num_requests:.1f} ongoing requests, "
            f"target {self.config.target_ongoing_requests:g} per replica"
        )

    # -- a policy that fails -------------------------------------------------

    def failed(self, ctx: AutoscalingContext, what: str, error: Exception) -> None:
        """Keep the target; log the failure (in full the first time) and show it in status."""
        target = ctx.target_num_replicas
        text = f"{type(error).__name__}: {error}"
        if text != self.error:
            logger.error(
                "The %s of deployment %s failed: %s; the deployment keeps %d replica(s).",
                what, ctx.deployment_id, text, target,
                exc_info=not isinstance(error, PolicyError),
            )  # fmt: skip
        self.error = text
        self._decided(
            ScalingDecision(
                ctx.current_time or 0.0, target, target, f"{what} failed ({text}); keeping {target}"
            )
        )

    def _decided(self, decision: ScalingDecision) -> None:
        self.last_decision = decision
        self.decisions.append(decision)

    def recovered(self, deployment_id: DeploymentID, label: str) -> None:
        if self.error is not None:
            logger.info("Autoscaling policy %s of %s works again.", label, deployment_id)
            self.error = None


def _target_and_state(result: Any) -> tuple[float, dict[str, Any]]:
    """A deployment policy's answer, checked: (target_replicas, policy_state)."""
    if inspect.isawaitable(result):
        getattr(result, "close", lambda: None)()  # no "never awaited" warning
        raise PolicyError("it returned an awaitable; a policy must be a plain function")
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise PolicyError(f"it must return (target_replicas, policy_state), got {result!r}")
    return _number(result[0]), _state(result[1])


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(f"target_replicas must be a finite number, got {value!r}")
    return float(value)


def _state(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"policy_state must be a dict, got {type(value).__name__}")
    return value


class ApplicationAutoscaler:
    """An application-level policy: one call for all of an application's autoscaled
    deployments, ``{DeploymentID: context}`` in, ``({DeploymentID: target},
    {DeploymentID: policy_state})`` out (see the module docstring)."""

    def __init__(self, app_name: str, policy: AutoscalingPolicy) -> None:
        self.app_name = app_name
        self.policy = policy
        self._policy: Callable[..., Any] | None = None

    def decide(
        self, members: Mapping[DeploymentID, tuple[Autoscaler, AutoscalingContext]], now: float
    ) -> dict[DeploymentID, int]:
        """Targets of the deployments the policy answered for (the others keep theirs)."""
        contexts = {dep: ctx for dep, (_, ctx) in members.items()}
        what = f"application-level autoscaling policy {self.policy.label}"
        try:
            if self._policy is None:
                self._policy = make_policy(self.policy, f"application {self.app_name!r}")
            decisions, states = self._checked(self._policy(contexts), contexts)
        except Exception as exc:
            for autoscaler, ctx in members.values():
                autoscaler.failed(ctx, what, exc)
            return {}
        targets = {}
        for dep, (autoscaler, ctx) in members.items():
            autoscaler.recovered(dep, self.policy.label)
            autoscaler.policy_state = dict(states.get(dep) or {})
            if dep not in decisions:
                continue
            cold = cold_start_replicas(ctx)
            if cold is not None:
                targets[dep] = autoscaler.settle(
                    ctx, cold, "requests are waiting and no replica runs"
                )
            else:
                targets[dep] = autoscaler.apply(ctx, decisions[dep], now, what)
        return targets

    @staticmethod
    def _checked(
        result: Any, contexts: Mapping[DeploymentID, AutoscalingContext]
    ) -> tuple[dict[DeploymentID, float], dict[DeploymentID, Any]]:
        if inspect.isawaitable(result):
            getattr(result, "close", lambda: None)()
            raise PolicyError("it returned an awaitable; a policy must be a plain function")
        if not isinstance(result, tuple | list) or len(result) != 2:
            raise PolicyError(
                f"it must return (targets by DeploymentID, policy states), got {result!r}"
            )
        decisions, states = result
        if not isinstance(decisions, dict):
            raise PolicyError(f"its targets must be a dict, got {type(decisions).__name__}")
        states = {} if states is None else states
        if not isinstance(states, dict):
            raise PolicyError(f"its policy states must be a dict, got {type(states).__name__}")
        for key in (*decisions, *states):
            if key not in contexts:
                raise PolicyError(
                    f"it answered for {key!r}, which is not an autoscaled deployment of the "
                    f"application (those are {sorted(map(str, contexts))})"
                )
        for state in states.values():
            _state(state)
        return {dep: _number(value) for dep, value in decisions.items()}, states
