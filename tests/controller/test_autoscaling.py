"""The autoscaler, driven by a fake clock: the built-in policy's decisions from load
and time (Ray Serve's rules: factors, delays, bounds, aggregation), then end to end."""

from __future__ import annotations

import threading
import time
import warnings

import pytest

import tandem as serve
from helpers import wait_for
from tandem._private.app.autoscaling_config import AggregationFunction, AutoscalingConfig
from tandem._private.calls.context import DeploymentID
from tandem._private.controller.autoscaling import Autoscaler
from tandem._private.controller.autoscaling_context import aggregate

DEP = DeploymentID(app_name="app", name="Model")


def _autoscaler(**overrides: float | str) -> Autoscaler:
    settings = {
        "min_replicas": 1,
        "max_replicas": 10,
        "target_ongoing_requests": 2.0,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 20.0,
        "look_back_period_s": 10.0,
        "metrics_interval_s": 0.5,
        **overrides,
    }
    return Autoscaler(AutoscalingConfig(**settings))  # type: ignore[arg-type]


def _decide(autoscaler: Autoscaler, now: float, current: int) -> int:
    """The target at ``now`` of a deployment whose ``current`` replicas all run."""
    replicas = [f"app#Model#{i}" for i in range(current)]
    return autoscaler.decide(autoscaler.context(DEP, replicas, current, now))


def _feed(autoscaler: Autoscaler, start: float, end: float, load: float, current: int) -> int:
    """Sample once a second from start to end (new replicas run at once); the target at
    the end."""
    t = start
    while t <= end:
        autoscaler.record(t, load)
        current = _decide(autoscaler, t, current)
        t += 1.0
    return current


def test_load_above_target_scales_up_only_after_the_upscale_delay() -> None:
    autoscaler = _autoscaler()
    assert _feed(autoscaler, 0, 3, load=8, current=1) == 1  # 3 s < 5 s delay
    assert _feed(autoscaler, 4, 6, load=8, current=1) == 4  # 8 ongoing / 2 per replica
    decision = autoscaler.last_decision
    assert decision is not None
    assert (decision.from_replicas, decision.to_replicas) == (1, 4)
    assert "load above target" in decision.reason
    assert autoscaler.last_scale_up_time == 5.0


def test_a_short_spike_does_not_scale() -> None:
    autoscaler = _autoscaler(look_back_period_s=2.0)
    current = _feed(autoscaler, 0, 2, load=20, current=1)
    current = _feed(autoscaler, 3, 30, load=0, current=current)
    assert current == 1
    assert autoscaler.last_decision is None


def test_idle_scales_down_after_the_downscale_delay_and_not_below_min() -> None:
    autoscaler = _autoscaler(min_replicas=2)
    assert _feed(autoscaler, 0, 15, load=0, current=6) == 6  # still within the 20 s delay
    assert _feed(autoscaler, 16, 30, load=0, current=6) == 2
    assert autoscaler.last_scale_down_time == 20.0


def test_bounded_by_max_replicas() -> None:
    assert _feed(_autoscaler(max_replicas=3), 0, 10, load=100, current=1) == 3


def test_min_replicas_zero_scales_to_zero_and_back_without_delay() -> None:
    autoscaler = _autoscaler(min_replicas=0, downscale_delay_s=5.0, upscale_delay_s=30.0)
    assert _feed(autoscaler, 0, 10, load=0, current=1) == 0
    autoscaler.record(11, 1)  # a request waits for a replica
    assert _decide(autoscaler, 11, 0) == 1, "scaling from zero must not wait for upscale_delay_s"


def test_from_many_replicas_the_last_one_goes_only_after_downscale_to_zero_delay_s() -> None:
    autoscaler = _autoscaler(min_replicas=0, downscale_delay_s=2.0, downscale_to_zero_delay_s=10.0)
    # Idle: down to one replica after downscale_delay_s, never straight to zero...
    assert _feed(autoscaler, 0, 2, load=0, current=3) == 1
    # ...and from one to zero only after downscale_to_zero_delay_s more.
    assert _feed(autoscaler, 3, 12, load=0, current=1) == 1
    assert _feed(autoscaler, 13, 13, load=0, current=1) == 0


def test_without_downscale_to_zero_delay_s_the_last_replica_waits_downscale_delay_s() -> None:
    autoscaler = _autoscaler(min_replicas=0, downscale_delay_s=3.0)
    assert _feed(autoscaler, 0, 2, load=0, current=1) == 1
    assert _feed(autoscaler, 3, 3, load=0, current=1) == 0


def test_factors_damp_each_step() -> None:
    autoscaler = _autoscaler(upscale_delay_s=0.0, upscaling_factor=0.5)
    autoscaler.record(0, 20)  # ideal: 10 replicas
    assert _decide(autoscaler, 0, 2) == 6  # half-way from 2 to 10


def test_a_small_downscaling_factor_still_takes_a_step() -> None:
    autoscaler = _autoscaler(downscale_delay_s=0.0, downscaling_factor=0.01)
    autoscaler.record(0, 0)
    assert _decide(autoscaler, 0, 4) == 3  # 4 - 0.04 rounds up to 4: one down anyway


def test_look_back_window_keeps_only_recent_samples() -> None:
    autoscaler = _autoscaler(look_back_period_s=5.0)
    for t in range(10):
        autoscaler.record(t, 10 if t < 5 else 2)
    assert autoscaler.total_requests(9) == 2.0  # only the last 5 s count


@pytest.mark.parametrize(
    ("how", "expected"),
    [("mean", (4 * 1 + 0 * 1 + 1 * 2) / 4), ("max", 4.0), ("min", 0.0)],
)
def test_aggregation_function_reduces_the_window_as_named(how: str, expected: float) -> None:
    # 4 for 1 s, 0 for 1 s, then 1 until now (2 s later).
    autoscaler = _autoscaler(aggregation_function=how)
    for t, load in ((0, 4), (1, 0), (2, 1)):
        autoscaler.record(t, load)
    assert autoscaler.total_requests(4) == pytest.approx(expected)


def test_aggregation_function_max_scales_up_on_a_peak_the_mean_would_smooth() -> None:
    peak = _autoscaler(aggregation_function="max", upscale_delay_s=0.0)
    mean = _autoscaler(upscale_delay_s=0.0)
    for autoscaler in (peak, mean):
        for t in range(8):
            autoscaler.record(t, 20 if t == 7 else 0)  # idle for 7 s, then a burst
    assert _decide(peak, 7, 1) == 10
    assert _decide(mean, 7, 1) == 1


def test_mean_weighs_each_sample_by_how_long_it_held() -> None:
    mean = AggregationFunction.MEAN
    assert aggregate([], mean, 5) == 0.0
    assert aggregate([(0, 3.0)], mean, 0) == 3.0  # the last sample counts even now
    assert aggregate([(0, 0.0), (9, 10.0)], mean, 10) == pytest.approx(1.0)


def test_config_takes_ray_serve_fields_and_refuses_what_it_cannot_apply() -> None:
    config = AutoscalingConfig(aggregation_function="MAX", downscale_to_zero_delay_s=5)
    assert config.aggregation_function is AggregationFunction.MAX
    assert config.model_dump()["aggregation_function"] == "max"  # plain text for files
    assert config.policy.is_default_policy_function()
    with pytest.raises(ValueError, match="must be one of 'mean', 'max', 'min'"):
        AutoscalingConfig(aggregation_function="median")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        AutoscalingConfig(downscale_to_zero_delay_s=-1)


def test_a_look_back_window_not_longer_than_the_interval_warns_as_ray_serve_does() -> None:
    with pytest.warns(FutureWarning, match="look_back_period_s"):
        AutoscalingConfig(look_back_period_s=5.0)  # metrics_interval_s is 10 s
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoscalingConfig(look_back_period_s=5.0, metrics_interval_s=1.0)


# -- end to end ------------------------------------------------------------------------------

FAST_SCALING = {
    "min_replicas": 0,
    "max_replicas": 3,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0.3,
    "downscale_delay_s": 0.8,
    "look_back_period_s": 0.8,
    "metrics_interval_s": 0.2,
}


@serve.deployment(max_ongoing_requests=2, autoscaling_config=FAST_SCALING)
class Slow:
    def __call__(self) -> str:
        time.sleep(0.2)
        return serve.get_replica_context().replica_id


def _deployment(name: str = "Slow"):  # type: ignore[no-untyped-def]
    return serve.status().applications["default"].deployments[name]


def test_scales_from_zero_up_under_load_and_back_to_zero(backend: str) -> None:
    handle = serve.run(Slow.bind(), backend=backend, route_prefix=None)
    assert _deployment().running_replicas == 0, "min_replicas=0 starts with no replica"

    # A request that arrives at zero replicas waits while one starts; it is not rejected.
    assert handle.remote().result(timeout_s=15)

    # Load until a second replica answers (a Ray actor takes longer to start than a
    # process), then for a moment more; the deadline only bounds a failing test.
    seen: set[str] = set()
    deadline = time.monotonic() + 15

    def load() -> None:
        while time.monotonic() < deadline and len(seen) < 2:
            seen.add(handle.remote().result(timeout_s=15))

    callers = [threading.Thread(target=load) for _ in range(6)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(seen) >= 2, "no scale-up under load"
    assert "above target" in _deployment().last_scaling_decision

    assert wait_for(lambda: _deployment().running_replicas == 0, timeout_s=10.0), (
        "no scale-down after idling"
    )
    assert _deployment().target_replicas == 0
    assert "below target" in _deployment().last_scaling_decision


@serve.deployment(autoscaling_config=FAST_SCALING)
class Model:
    def __call__(self, x: int) -> int:
        return x * 10


@serve.deployment
class Front:
    def __init__(self, model: serve.DeploymentHandle) -> None:
        self.model = model

    async def __call__(self, x: int) -> int:
        return await self.model.remote(x)


def test_a_call_from_another_deployment_scales_a_deployment_up_from_zero(backend: str) -> None:
    # The waiting request sits in Front's router (in Front's process on the process
    # backend); the autoscaler must see it there.
    handle = serve.run(Front.bind(Model.bind()), backend=backend, route_prefix=None)
    assert _deployment("Model").running_replicas == 0
    assert handle.remote(4).result(timeout_s=15) == 40
