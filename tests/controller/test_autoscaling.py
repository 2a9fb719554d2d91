"""The autoscaling policy, driven by a fake clock: a pure function of load and time."""

from __future__ import annotations

import threading
import time

import tandem as serve
from helpers import wait_for
from tandem._private.app.autoscaling_config import AutoscalingConfig
from tandem._private.controller.autoscaling import AutoscalingPolicy


def _policy(**overrides: float) -> AutoscalingPolicy:
    settings = {
        "min_replicas": 1,
        "max_replicas": 10,
        "target_ongoing_requests": 2.0,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 20.0,
        "look_back_period_s": 10.0,
        **overrides,
    }
    return AutoscalingPolicy(AutoscalingConfig(**settings))  # type: ignore[arg-type]


def _feed(policy: AutoscalingPolicy, start: float, end: float, load: float, current: int) -> int:
    """Sample once a second from start to end; return the target at the end."""
    t = start
    while t <= end:
        policy.record(t, load)
        current = policy.decide(t, current)
        t += 1.0
    return current


def test_load_above_target_scales_up_only_after_the_upscale_delay() -> None:
    policy = _policy()
    assert _feed(policy, 0, 3, load=8, current=1) == 1  # 3 s < 5 s delay
    assert _feed(policy, 4, 6, load=8, current=1) == 4  # 8 ongoing / 2 per replica
    assert policy.last_decision is not None
    assert (policy.last_decision.from_replicas, policy.last_decision.to_replicas) == (1, 4)


def test_a_short_spike_does_not_scale() -> None:
    policy = _policy(look_back_period_s=2.0)
    current = _feed(policy, 0, 2, load=20, current=1)
    current = _feed(policy, 3, 30, load=0, current=current)
    assert current == 1
    assert policy.last_decision is None


def test_idle_scales_down_after_the_downscale_delay_and_not_below_min() -> None:
    policy = _policy(min_replicas=2)
    assert _feed(policy, 0, 15, load=0, current=6) == 6  # still within the 20 s delay
    assert _feed(policy, 16, 30, load=0, current=6) == 2


def test_bounded_by_max_replicas() -> None:
    assert _feed(_policy(max_replicas=3), 0, 10, load=100, current=1) == 3


def test_min_replicas_zero_scales_to_zero_and_back_without_delay() -> None:
    policy = _policy(min_replicas=0, downscale_delay_s=5.0, upscale_delay_s=30.0)
    assert _feed(policy, 0, 10, load=0, current=1) == 0
    policy.record(11, 1)  # a request waits for a replica
    assert policy.decide(11, 0) == 1, "scaling from zero must not wait for upscale_delay_s"


def test_factors_damp_each_step() -> None:
    policy = _policy(upscale_delay_s=0.0, upscaling_factor=0.5)
    policy.record(0, 20)  # ideal: 10 replicas
    assert policy.decide(0, 2) == 6  # half-way from 2 to 10


def test_look_back_window_averages_recent_samples() -> None:
    policy = _policy(look_back_period_s=5.0)
    for t in range(10):
        policy.record(t, 10 if t < 5 else 2)
    assert policy.average_load() == 2.0  # only the last 5 s count


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
