"""Custom autoscaling as in Ray Serve: policies by callable, import path or class;
what they see (AutoscalingContext, custom metrics from record_autoscaling_stats);
how their answers are bounded; what happens when they fail; application-level
policies from config files; and the config fields that name them."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tandem as serve
from helpers import eventually, wait_for
from tandem._private.app.autoscaling_config import AutoscalingConfig, AutoscalingPolicy
from tandem._private.app.config_file import validate_config
from tandem._private.calls.context import DeploymentID, ReplicaID
from tandem._private.controller.autoscaling import ApplicationAutoscaler, Autoscaler
from tandem._private.controller.autoscaling_context import AutoscalingContext, TimeStampedValue
from tandem._private.replica.autoscaling_stats import AutoscalingStats
from tandem.autoscaling_policy import (
    default_autoscaling_policy,
    replica_queue_length_autoscaling_policy,
)

DEP = DeploymentID(app_name="app", name="Model")
QUICK = {
    "min_replicas": 1,
    "max_replicas": 3,
    "upscale_delay_s": 0.0,
    "downscale_delay_s": 0.0,
    "metrics_interval_s": 0.1,
    "look_back_period_s": 1.0,
}


def _autoscaler(policy: Any, policy_kwargs: Any = None, **overrides: Any) -> Autoscaler:
    settings = {**QUICK, "max_replicas": 10, **overrides}
    chosen = {"policy_function": policy, "policy_kwargs": policy_kwargs or {}}
    return Autoscaler(AutoscalingConfig(**settings, policy=chosen))


def _decide(autoscaler: Autoscaler, now: float, current: int, target: int | None = None) -> int:
    replicas = [f"app#Model#r{i}" for i in range(current)]
    target = current if target is None else target
    return autoscaler.decide(autoscaler.context(DEP, replicas, target, now))


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path for policy modules (forgotten after the test)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if sys.modules[name].__dict__.get("__file__", "").startswith(str(tmp_path)):
            del sys.modules[name]


# -- the policy's answer ------------------------------------------------------------------


def test_a_callable_policy_sees_the_context_and_keeps_its_state() -> None:
    seen: list[AutoscalingContext] = []

    def policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        seen.append(ctx)
        return 4, {"calls": ctx.policy_state.get("calls", 0) + 1}

    autoscaler = _autoscaler(policy)
    autoscaler.record(100.0, 3.0, 1.0)
    assert _decide(autoscaler, 100.0, 2) == 4
    autoscaler.record(101.0, 3.0, 1.0)
    assert _decide(autoscaler, 101.0, 4) == 4
    first, second = seen
    assert first.deployment_id == DEP
    assert (first.deployment_name, first.app_name) == ("Model", "app")
    assert (first.current_num_replicas, first.target_num_replicas) == (2, 2)
    assert first.running_replicas == [ReplicaID("r0", DEP), ReplicaID("r1", DEP)]
    assert first.running_replicas[0].to_full_id_str() == "app#Model#r0"
    assert (first.total_num_requests, first.total_queued_requests) == (3.0, 1.0)
    assert first.total_running_requests == 2.0
    assert (first.capacity_adjusted_min_replicas, first.capacity_adjusted_max_replicas) == (1, 10)
    assert first.current_time == 100.0
    assert isinstance(first.config, AutoscalingConfig)
    assert (first.last_scale_up_time, first.last_scale_down_time) == (None, None)
    assert first.policy_state == {}
    assert second.policy_state == {"calls": 1}
    assert second.last_scale_up_time == 100.0
    assert autoscaler.last_decision is not None
    assert "asked for 4 replicas" in autoscaler.last_decision.reason


@pytest.mark.parametrize(
    ("answer", "expected"),
    [(100, 10), (-5, 1), (0, 1), (2.1, 3), (3, 3)],
    ids=["above-max", "negative", "zero", "float-rounds-up", "int"],
)
def test_an_answer_is_rounded_up_and_bounded_by_min_and_max_replicas(
    answer: float, expected: int
) -> None:
    autoscaler = _autoscaler(lambda ctx: (answer, {}))
    autoscaler.record(0.0, 1.0)
    assert _decide(autoscaler, 0.0, 2) == expected


def test_factors_and_delays_apply_to_a_custom_policy_too() -> None:
    autoscaler = _autoscaler(lambda ctx: (10, {}), upscale_delay_s=5.0, upscaling_factor=0.5)
    autoscaler.record(0.0, 0.0)
    assert _decide(autoscaler, 0.0, 2) == 2  # wanted, not yet for upscale_delay_s
    assert _decide(autoscaler, 5.0, 2) == 6  # half of the way from 2 to 10


def test_waiting_requests_at_zero_replicas_start_one_whatever_the_policy_says() -> None:
    autoscaler = _autoscaler(lambda ctx: (0, {}), min_replicas=0, upscale_delay_s=60.0)
    autoscaler.record(0.0, 1.0)
    assert _decide(autoscaler, 0.0, 0, target=0) == 1


def test_a_policy_may_scale_up_from_zero_at_once() -> None:
    autoscaler = _autoscaler(lambda ctx: (2, {}), min_replicas=0, upscale_delay_s=60.0)
    autoscaler.record(0.0, 0.0)
    assert _decide(autoscaler, 0.0, 0, target=0) == 2


def test_the_built_in_policy_is_public_under_both_names() -> None:
    assert default_autoscaling_policy is replica_queue_length_autoscaling_policy
    autoscaler = _autoscaler(default_autoscaling_policy, target_ongoing_requests=2.0)
    autoscaler.record(0.0, 12.0)
    assert _decide(autoscaler, 0.0, 1) == 6
    ctx = autoscaler.context(DEP, ["app#Model#r0"], 1, 0.0)
    assert replica_queue_length_autoscaling_policy(ctx) == (6.0, {})


# -- a policy that fails ------------------------------------------------------------------


def _broken(ctx: AutoscalingContext) -> Any:
    raise RuntimeError("metrics store unreachable")


async def _async_policy(ctx: AutoscalingContext) -> Any:
    return 2, {}


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        (_broken, "RuntimeError: metrics store unreachable"),
        (lambda ctx: 3, "must return (target_replicas, policy_state), got 3"),
        (lambda ctx: ("3", {}), "target_replicas must be a finite number, got '3'"),
        (lambda ctx: (float("nan"), {}), "target_replicas must be a finite number"),
        (lambda ctx: (3, None), "policy_state must be a dict, got NoneType"),
        (_async_policy, "returned an awaitable"),
    ],
    ids=["raises", "bare-int", "text", "nan", "no-state", "async"],
)
def test_a_failing_policy_keeps_the_target_and_says_so(
    policy: Any, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    autoscaler = _autoscaler(policy)
    autoscaler.record(0.0, 50.0)
    with caplog.at_level(logging.ERROR, logger="tandem"):
        assert _decide(autoscaler, 0.0, 2) == 2
        assert _decide(autoscaler, 1.0, 2) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, "the same failure is logged once, not on every tick"
    assert "app#Model" in errors[0] and words in errors[0]
    assert autoscaler.last_decision is not None
    assert "failed" in autoscaler.last_decision.reason
    assert words in autoscaler.last_decision.reason


def test_a_policy_that_works_again_is_followed_again(caplog: pytest.LogCaptureFixture) -> None:
    answers: list[Any] = [RuntimeError("flaky"), (5, {})]

    def policy(ctx: AutoscalingContext) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    autoscaler = _autoscaler(policy)
    with caplog.at_level(logging.INFO, logger="tandem"):
        assert _decide(autoscaler, 0.0, 2) == 2
        assert _decide(autoscaler, 1.0, 2) == 5
    assert autoscaler.error is None
    assert any("works again" in r.getMessage() for r in caplog.records)


# -- policies by import path, and classes -----------------------------------------------

CLASS_POLICY = """
MADE = []

class FixedPolicy:
    def __init__(self, replicas, note="none"):
        MADE.append((replicas, note))
        self.replicas = replicas
        self.calls = 0

    def __call__(self, ctx):
        self.calls += 1
        return self.replicas, {"calls": self.calls}


def fixed(ctx):
    return 2, {}
"""


def test_a_policy_class_by_import_path_is_made_once_with_its_kwargs(module_dir: Path) -> None:
    (module_dir / "class_policies_a.py").write_text(CLASS_POLICY)
    autoscaler = _autoscaler("class_policies_a:FixedPolicy", policy_kwargs={"replicas": 3})
    autoscaler.record(0.0, 0.0)
    assert _decide(autoscaler, 0.0, 1) == 3
    assert _decide(autoscaler, 1.0, 3) == 3
    made = sys.modules["class_policies_a"].MADE
    assert made == [(3, "none")]
    assert autoscaler.policy_state == {"calls": 2}


def test_policy_kwargs_of_a_function_are_reported_unused(
    module_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (module_dir / "class_policies_b.py").write_text(CLASS_POLICY)
    autoscaler = _autoscaler("class_policies_b.fixed", policy_kwargs={"replicas": 3})
    with caplog.at_level(logging.WARNING, logger="tandem"):
        assert _decide(autoscaler, 0.0, 1) == 2
    assert any("policy_kwargs" in r.getMessage() for r in caplog.records)


@serve.deployment(autoscaling_config={**QUICK, "policy": {"policy_function": "nowhere_x:policy"}})
class Unfindable:
    def __call__(self) -> str:
        return "never"


def test_a_policy_that_cannot_be_imported_fails_the_run_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="nowhere_x") as info:
        serve.run(Unfindable.bind(), name="unfindable")
    assert "deployment 'Unfindable'" in str(info.value)
    assert "unfindable" not in serve.status().applications


def test_a_policy_class_that_would_not_take_its_kwargs_fails_the_run(module_dir: Path) -> None:
    (module_dir / "class_policies_c.py").write_text(CLASS_POLICY)
    config = {
        **QUICK,
        "policy": {"policy_function": "class_policies_c:FixedPolicy", "policy_kwargs": {"x": 1}},
    }
    bad = Unfindable.options(name="BadKwargs", autoscaling_config=config)
    with pytest.raises(ValueError, match="does not take its policy_kwargs"):
        serve.run(bad.bind(), name="badkwargs")
    assert sys.modules["class_policies_c"].MADE == []


def test_ray_serve_names_of_the_built_in_policy_need_no_ray() -> None:
    for path in (
        "ray.serve.autoscaling_policy:default_autoscaling_policy",
        "tandem.autoscaling_policy:replica_queue_length_autoscaling_policy",
    ):
        autoscaler = _autoscaler(path)
        autoscaler.record(0.0, 8.0)
        assert _decide(autoscaler, 0.0, 1) == 4
    with pytest.raises(ValueError, match="built-in policies are"):
        serve.run(
            Unfindable.options(
                autoscaling_config={
                    **QUICK,
                    "policy": {"policy_function": "ray.serve.autoscaling_policy:PrometheusX"},
                }
            ).bind(),
            name="prom",
        )


# -- the config fields ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"policy": {"policy_function": "no_colon_or_dot"}}, "import path like 'module:function'"),
        ({"policy": {"policy_function": 3}}, "must be a callable or an import path"),
        ({"policy": {"policy_kwargs": {"f": object()}}}, "JSON-serializable"),
        (
            {"target_num_ongoing_requests_per_replica": 3, "target_ongoing_requests": 2},
            "give only 'target_ongoing_requests'",
        ),
    ],
    ids=["bad-path", "not-callable", "kwargs-not-json", "old-and-new-name"],
)
def test_config_refuses_bad_policies_clearly(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match="autoscaling_config") as info:
        serve.deployment(autoscaling_config=fields)(Unfindable.func_or_class)
    assert words in str(info.value)


def test_old_field_names_are_read_as_the_fields_they_became() -> None:
    # Code and docs written for older Ray Serve still use these names.
    with pytest.warns(DeprecationWarning, match="write 'target_ongoing_requests'"):
        config = AutoscalingConfig(target_num_ongoing_requests_per_replica=3)
    assert config.target_ongoing_requests == 3
    with pytest.warns(DeprecationWarning, match="write 'policy_function'"):
        policy = AutoscalingPolicy(name="m:f")
    assert policy.policy_function == "m:f"


def test_a_config_file_reads_an_old_field_name_too() -> None:
    with pytest.warns(DeprecationWarning, match="target_ongoing_requests"):
        config = validate_config(
            {
                "applications": [
                    {
                        "import_path": "x:app",
                        "deployments": [
                            {
                                "name": "M",
                                "autoscaling_config": {
                                    "target_num_ongoing_requests_per_replica": 3
                                },
                            }
                        ],
                    }
                ]
            }
        )
    deployment = config.applications[0].deployments[0]
    assert deployment.autoscaling_config is not None
    assert deployment.autoscaling_config.target_ongoing_requests == 3


def test_a_policy_given_as_a_callable_is_written_to_files_as_its_import_path() -> None:
    policy = AutoscalingPolicy(policy_function=default_autoscaling_policy)
    assert policy.model_dump() == {
        "policy_function": "tandem._private.controller.autoscaling_policies:"
        "replica_queue_length_autoscaling_policy",
        "policy_kwargs": {},
    }
    assert hash(policy) == hash(AutoscalingPolicy(policy_function=default_autoscaling_policy))


# -- custom metrics: record_autoscaling_stats ------------------------------------------------

SEEN: dict[str, list[AutoscalingContext]] = {}


def metrics_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    SEEN.setdefault(ctx.deployment_name, []).append(ctx)
    load = (ctx.aggregated_metrics or {}).get("load", {})
    return (2 if load and max(load.values()) >= 5 else 1), {}


WITH_METRICS = {**QUICK, "policy": {"policy_function": metrics_policy}}


@serve.deployment(autoscaling_config=WITH_METRICS)
class Busy:
    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"load": 7.0, "queue": 1}

    def __call__(self) -> str:
        return "busy"


@serve.deployment(autoscaling_config=WITH_METRICS)
class Calm:
    async def record_autoscaling_stats(self) -> dict[str, float]:
        await asyncio.sleep(0)
        return {"load": 1.0}

    async def __call__(self) -> str:
        return "calm"


@serve.deployment
class Both:
    def __init__(self, busy: serve.DeploymentHandle, calm: serve.DeploymentHandle) -> None:
        self.busy, self.calm = busy, calm

    async def __call__(self) -> list[str]:
        return [await self.busy.remote(), await self.calm.remote()]


def _deployment(name: str, app: str = "default") -> Any:
    return serve.status().applications[app].deployments[name]


def test_record_autoscaling_stats_reaches_the_policy_on_every_backend(backend: str) -> None:
    SEEN.clear()
    handle = serve.run(Both.bind(Busy.bind(), Calm.bind()), backend=backend, route_prefix=None)
    assert handle.remote().result(timeout_s=30) == ["busy", "calm"]
    # Busy reports a load of 7 (sync method), so its policy asks for 2; Calm reports 1
    # (async method) and stays at 1.
    assert wait_for(lambda: _deployment("Busy").running_replicas == 2, timeout_s=30)
    assert _deployment("Busy").target_replicas == 2
    assert _deployment("Calm").target_replicas == 1

    def latest_with_both() -> AutoscalingContext | None:
        for ctx in reversed(SEEN.get("Busy", [])):
            if len((ctx.aggregated_metrics or {}).get("load", {})) == 2:
                return ctx
        return None

    ctx = eventually(latest_with_both, lambda c: c is not None, timeout_s=30)
    assert ctx is not None, "the new replica's metrics never reached the policy"
    replica_ids = {r.replica_id for r in _deployment("Busy").replicas}
    assert ctx.aggregated_metrics is not None and ctx.raw_metrics is not None
    assert {r.to_full_id_str() for r in ctx.aggregated_metrics["load"]} <= replica_ids | {
        r.to_full_id_str() for r in ctx.running_replicas
    }
    assert set(ctx.aggregated_metrics["load"].values()) == {7.0}
    assert set(ctx.aggregated_metrics["queue"].values()) == {1.0}
    for series in ctx.raw_metrics["load"].values():
        assert series and all(isinstance(s, TimeStampedValue) and s.value == 7.0 for s in series)
        assert all(ctx.current_time - 5 <= s.timestamp <= ctx.current_time for s in series)
    calm = SEEN["Calm"][-1]
    assert calm.aggregated_metrics is not None
    assert list(calm.aggregated_metrics["load"].values()) == [1.0]


def _stats(call: Any, now: list[float], **config: Any) -> AutoscalingStats:
    settings = {"metrics_interval_s": 1.0, "look_back_period_s": 10.0, **config}
    return AutoscalingStats(
        call, "replica app#Model#r0", AutoscalingConfig(**settings), clock=lambda: now[0]
    )


def test_stats_are_kept_over_the_look_back_window() -> None:
    now = [0.0]
    values = iter(range(100))

    async def call() -> dict[str, float]:
        return {"n": next(values)}

    stats = _stats(call, now, look_back_period_s=5.0)
    assert stats.interval_s == 1.0  # min(metrics_interval_s, look_back_period_s / 5)
    for t in range(8):
        now[0] = float(t)
        asyncio.run(stats.record())
    assert [at for at, _ in stats.window()] == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert stats.window()[-1][1] == {"n": 7.0}


def test_a_failing_record_autoscaling_stats_is_logged_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def raises() -> dict[str, float]:
        raise KeyError("gpu")

    async def hangs() -> dict[str, float]:
        await asyncio.sleep(30)
        return {}

    stats = _stats(raises, [0.0])
    slow = AutoscalingStats(hangs, "replica r1", AutoscalingConfig(), timeout_s=0.05)
    with caplog.at_level(logging.ERROR, logger="tandem"):
        asyncio.run(stats.record())
        asyncio.run(slow.record())
    assert stats.window() == () and stats.enabled
    assert slow.window() == () and slow.enabled
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "app#Model#r0 raised KeyError" in messages
    assert "r1 took longer than" in messages


@pytest.mark.parametrize("result", [["load", 1.0], {"load": "high"}, None])
def test_a_record_autoscaling_stats_that_returns_no_dict_of_numbers_is_stopped(
    result: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def call() -> Any:
        return result

    stats = _stats(call, [0.0])
    with caplog.at_level(logging.ERROR, logger="tandem"):
        asyncio.run(stats.record())
    assert not stats.enabled and stats.window() == ()
    assert "not called again" in caplog.records[-1].getMessage()


@serve.deployment(autoscaling_config=WITH_METRICS)
class FaultyStats:
    def record_autoscaling_stats(self) -> dict[str, float]:
        raise RuntimeError("no stats today")

    def __call__(self) -> str:
        return "still serving"


def test_a_replica_whose_stats_fail_serves_on() -> None:
    handle = serve.run(FaultyStats.bind(), name="faulty", route_prefix=None)
    for _ in range(3):
        assert handle.remote().result(timeout_s=10) == "still serving"
    assert _deployment("FaultyStats", "faulty").status == "HEALTHY"


# -- a failing policy on a running deployment -----------------------------------------------


@serve.deployment(autoscaling_config={**QUICK, "policy": {"policy_function": _broken}})
class Steady:
    def __call__(self) -> str:
        return "ok"


def test_a_deployment_whose_policy_fails_keeps_its_size_serves_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="tandem"):
        handle = serve.run(Steady.bind(), name="steady", route_prefix=None)
        status = eventually(
            lambda: _deployment("Steady", "steady"),
            lambda d: "failed" in d.last_scaling_decision,
            timeout_s=10,
        )
        assert handle.remote().result(timeout_s=10) == "ok"
    assert status.status == "HEALTHY"
    assert (status.target_replicas, status.running_replicas) == (1, 1)
    assert "metrics store unreachable" in status.last_scaling_decision
    assert any("steady#Steady" in r.getMessage() for r in caplog.records)


# -- application-level policies ---------------------------------------------------------------

APP_MODULE = """
import tandem as serve

QUICK = {
    "min_replicas": 1,
    "max_replicas": 5,
    "upscale_delay_s": 0,
    "metrics_interval_s": 0.1,
    "look_back_period_s": 1,
}

SEEN = []


def coordinated(contexts):
    SEEN.append({dep.name: ctx.policy_state for dep, ctx in contexts.items()})
    wanted = {"Preprocessor": 2, "Model": 3}
    decisions = {dep: wanted[dep.name] for dep in contexts if dep.name in wanted}
    return decisions, {dep: {"seen": ctx.current_num_replicas} for dep, ctx in contexts.items()}


def own(ctx):
    return 5, {}


@serve.deployment(autoscaling_config={**QUICK, "policy": {"policy_function": own}})
class Preprocessor:
    def __call__(self, x):
        return f"pre-{x}"


@serve.deployment(autoscaling_config=QUICK)
class Model:
    def __call__(self, x):
        return f"model-{x}"


@serve.deployment
class Driver:
    def __init__(self, pre, model):
        self.pre, self.model = pre, model

    async def __call__(self, x):
        return await self.model.remote(await self.pre.remote(x))


app = Driver.bind(Preprocessor.bind(), Model.bind())
"""


def test_an_application_level_policy_from_a_config_file_decides_for_all(
    module_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tandem._private.cli.serving import ServeSession

    (module_dir / "coordinated_app.py").write_text(APP_MODULE)
    config = validate_config(
        {
            "proxy_location": "Disabled",
            "http_options": {"port": 0},
            "applications": [
                {
                    "name": "coord",
                    "import_path": "coordinated_app:app",
                    "autoscaling_policy": {"policy_function": "coordinated_app:coordinated"},
                }
            ],
        }
    )
    serve.shutdown()
    session = ServeSession("local")
    try:
        with caplog.at_level(logging.WARNING, logger="tandem"):
            session.deploy(config)
            assert serve.get_app_handle("coord").remote(1).result(timeout_s=10) == "model-pre-1"

            def running() -> tuple[int, ...]:
                return tuple(
                    _deployment(d, "coord").running_replicas for d in ("Preprocessor", "Model")
                )

            assert eventually(running, lambda r: r == (2, 3), timeout_s=20) == (2, 3), (
                "the application's policy did not set both deployments' targets"
            )
        assert _deployment("Driver", "coord").target_replicas == 1  # not autoscaled
        seen = sys.modules["coordinated_app"].SEEN
        assert set(seen[0]) == {"Preprocessor", "Model"}
        assert seen[0] == {"Preprocessor": {}, "Model": {}}
        assert wait_for(lambda: any(s["Model"].get("seen") for s in seen[1:]), timeout_s=10), (
            "the policy_state it returned did not come back to it"
        )
        assert any(
            "application's decides" in r.getMessage() and "Preprocessor" in r.getMessage()
            for r in caplog.records
        )
    finally:
        session.close()


def test_a_config_file_with_an_unfindable_application_policy_fails_before_anything_runs(
    module_dir: Path,
) -> None:
    from tandem._private.app.config_file import build_applications

    (module_dir / "coordinated_app_b.py").write_text(APP_MODULE)
    config = validate_config(
        {
            "applications": [
                {
                    "name": "coord",
                    "import_path": "coordinated_app_b:app",
                    "autoscaling_policy": {"policy_function": "coordinated_app_b:missing"},
                }
            ]
        }
    )
    with pytest.raises(ValueError, match="application 'coord'") as info:
        build_applications(config)
    assert "has no attribute 'missing'" in str(info.value)


def _members(*names: str) -> dict[DeploymentID, tuple[Autoscaler, AutoscalingContext]]:
    members = {}
    for name in names:
        dep = DeploymentID(app_name="app", name=name)
        autoscaler = Autoscaler(AutoscalingConfig(**{**QUICK, "max_replicas": 10}))
        autoscaler.record(0.0, 1.0)
        members[dep] = (autoscaler, autoscaler.context(dep, [f"app#{name}#r0"], 1, 0.0))
    return members


def test_an_application_policy_answers_only_for_some_and_the_rest_keep_their_size() -> None:
    def policy(contexts: dict[DeploymentID, AutoscalingContext]) -> Any:
        return {dep: 20.0 for dep in contexts if dep.name == "A"}, None

    whole = ApplicationAutoscaler("app", AutoscalingPolicy(policy_function=policy))
    assert whole.decide(_members("A", "B"), 0.0) == {DeploymentID(app_name="app", name="A"): 10}


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (({DeploymentID(app_name="app", name="Elsewhere"): 2}, {}), "not an autoscaled deployment"),
        ((2, {}), "targets must be a dict"),
        (({}, {DeploymentID(app_name="app", name="A"): 5}), "policy_state must be a dict"),
        (None, "must return (targets by DeploymentID, policy states)"),
    ],
    ids=["unknown-deployment", "not-a-dict", "bad-state", "none"],
)
def test_a_failing_application_policy_changes_nothing(
    answer: Any, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    whole = ApplicationAutoscaler("app", AutoscalingPolicy(policy_function=lambda contexts: answer))
    members = _members("A", "B")
    with caplog.at_level(logging.ERROR, logger="tandem"):
        assert whole.decide(members, 0.0) == {}
    for autoscaler, _ in members.values():
        assert autoscaler.last_decision is not None
        assert words in autoscaler.last_decision.reason
    assert words in caplog.records[0].getMessage()
