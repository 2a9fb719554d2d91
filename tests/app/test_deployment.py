"""``@serve.deployment``, ``Deployment.options()`` and ``Deployment.bind()``.

Option validation happens at decoration / ``.options()`` time with a ValueError
naming the option; ``bind`` builds a graph whose nested nodes become handles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import tandem
import tandem as serve
import tandem.handle
from tandem._private.app.config_file import validate_config

# -- decorating ---------------------------------------------------------------


def test_bare_decorator_on_class(backend: str) -> None:
    @serve.deployment
    class Echo:
        def __call__(self, x: Any) -> Any:
            return ("echo", x)

    assert isinstance(Echo, serve.Deployment)
    assert Echo.name == "Echo"
    handle = serve.run(Echo.bind(), backend=backend)
    assert handle.remote(3).result() == ("echo", 3)


def test_bare_decorator_on_function(backend: str) -> None:
    @serve.deployment
    def double(x: int) -> int:
        return 2 * x

    assert isinstance(double, serve.Deployment)
    assert double.name == "double"
    handle = serve.run(double.bind(), backend=backend)
    assert handle.remote(21).result() == 42


def test_decorator_with_options_on_class(backend: str) -> None:
    @serve.deployment(name="greeter", num_replicas=2, max_ongoing_requests=7)
    class Greeter:
        def __call__(self, name: str) -> str:
            return f"hello {name}"

    assert Greeter.name == "greeter"
    assert Greeter.num_replicas == 2
    assert Greeter.max_ongoing_requests == 7
    handle = serve.run(Greeter.bind(), name="g", backend=backend)
    assert handle.remote("bob").result() == "hello bob"
    dep = serve.status().applications["g"].deployments["greeter"]
    assert dep.running_replicas == 2


def test_decorator_with_options_on_function(backend: str) -> None:
    @serve.deployment(name="adder", num_replicas=2)
    def add_one(x: int) -> int:
        return x + 1

    assert add_one.name == "adder"
    handle = serve.run(add_one.bind(), name="fn", backend=backend)
    assert handle.remote(1).result() == 2
    assert serve.status().applications["fn"].deployments["adder"].running_replicas == 2


def test_decorator_with_empty_parentheses(backend: str) -> None:
    @serve.deployment()
    class Plain:
        def __call__(self) -> str:
            return "plain"

    assert isinstance(Plain, serve.Deployment)
    assert serve.run(Plain.bind(), backend=backend).remote().result() == "plain"


def test_deployment_called_with_target_and_options(backend: str) -> None:
    class Model:
        def __call__(self) -> str:
            return "ok"

    dep = serve.deployment(Model, name="wrapped", num_replicas=2)
    assert dep.name == "wrapped"
    assert dep.num_replicas == 2
    assert serve.run(dep.bind(), name="w", backend=backend).remote().result() == "ok"


def test_default_option_values() -> None:
    @serve.deployment
    class D:
        pass

    assert D.max_ongoing_requests == 5
    assert D.max_queued_requests == -1
    assert D.user_config is None
    opts = D.deployment_options
    assert opts.health_check_period_s == 10
    assert opts.health_check_timeout_s == 30
    assert opts.graceful_shutdown_wait_loop_s == 2
    assert opts.graceful_shutdown_timeout_s == 20


# -- .options() ----------------------------------------------------------------


def test_options_returns_changed_copy_and_leaves_original(backend: str) -> None:
    @serve.deployment(max_ongoing_requests=7)
    class Model:
        def __call__(self) -> str:
            return "ok"

    copy = Model.options(name="Other", num_replicas=3, user_config={"a": 1})
    assert copy is not Model
    assert copy.name == "Other"
    assert copy.num_replicas == 3
    assert copy.user_config == {"a": 1}
    # options not given to .options() are carried over
    assert copy.max_ongoing_requests == 7
    # the original is unchanged
    assert Model.name == "Model"
    assert Model.num_replicas != 3
    assert Model.user_config is None

    serve.run(Model.bind(), name="orig", route_prefix="/orig", backend=backend)
    serve.run(
        Model.options(num_replicas=3).bind(), name="copy", route_prefix="/copy", backend=backend
    )
    apps = serve.status().applications
    assert apps["orig"].deployments["Model"].running_replicas == 1
    assert apps["copy"].deployments["Model"].running_replicas == 3


INVALID_OPTIONS = [
    pytest.param({"num_replicas": 0}, ["num_replicas"], id="num_replicas-0"),
    pytest.param({"num_replicas": -1}, ["num_replicas"], id="num_replicas-negative"),
    pytest.param({"num_replicas": "many"}, ["num_replicas"], id="num_replicas-string"),
    pytest.param({"no_such_option": 1}, ["no_such_option"], id="unknown-option"),
    pytest.param({"max_ongoing_requests": 0}, ["max_ongoing_requests"], id="max_ongoing-0"),
    pytest.param({"user_config": object()}, ["user_config"], id="user_config-not-json"),
    pytest.param(
        {"num_replicas": 2, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}},
        ["num_replicas", "autoscaling_config"],
        id="num_replicas-and-autoscaling",
    ),
    pytest.param(
        {"autoscaling_config": {"min_replicas": 5, "max_replicas": 2}},
        ["autoscaling_config", "min_replicas"],
        id="autoscaling-min-gt-max",
    ),
    pytest.param(
        {"ray_actor_options": {"num_cpus": -1}},
        ["ray_actor_options", "num_cpus"],
        id="negative-num_cpus",
    ),
    pytest.param(
        {"ray_actor_options": {"num_cpu": 1}},
        ["ray_actor_options", "num_cpu"],
        id="unknown-actor-option",
    ),
]


@pytest.mark.parametrize(("options", "named"), INVALID_OPTIONS)
def test_invalid_option_fails_at_decoration_time(options: dict[str, Any], named: list[str]) -> None:
    with pytest.raises(ValueError) as info:

        @serve.deployment(**options)
        class Model:
            pass

    for word in named:
        assert word in str(info.value)


@pytest.mark.parametrize(("options", "named"), INVALID_OPTIONS)
def test_invalid_option_fails_at_decoration_time_on_function(
    options: dict[str, Any], named: list[str]
) -> None:
    with pytest.raises(ValueError) as info:

        @serve.deployment(**options)
        def model() -> None:
            pass

    for word in named:
        assert word in str(info.value)


@pytest.mark.parametrize(("options", "named"), INVALID_OPTIONS)
def test_invalid_option_fails_at_options_time(options: dict[str, Any], named: list[str]) -> None:
    @serve.deployment
    class Model:
        pass

    with pytest.raises(ValueError) as info:
        Model.options(**options)
    for word in named:
        assert word in str(info.value)
    # the failed call left the original as it was
    assert Model.num_replicas is None
    assert Model.max_ongoing_requests == 5


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"ray_actor_options": {"num_cpus": 0.5}}, id="num_cpus"),
        pytest.param(
            {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0, "resources": {"custom": 1.0}}},
            id="cpus-gpus-resources",
        ),
        pytest.param(
            {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}, id="autoscaling"
        ),
        pytest.param(
            {"autoscaling_config": serve.AutoscalingConfig(min_replicas=0, max_replicas=2)},
            id="autoscaling-object",
        ),
        pytest.param({"num_replicas": "auto"}, id="num_replicas-auto"),
        pytest.param({"num_replicas": 1, "max_queued_requests": 10}, id="queue-limit"),
        pytest.param({"user_config": {"threshold": 0.5, "tags": ["a", "b"]}}, id="user_config"),
        pytest.param({"health_check_period_s": 1, "health_check_timeout_s": 2}, id="health-check"),
        pytest.param(
            {"graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": 1},
            id="graceful-shutdown",
        ),
    ],
)
def test_valid_options_are_accepted(options: dict[str, Any]) -> None:
    @serve.deployment(**options)
    class Model:
        pass

    assert isinstance(Model, serve.Deployment)
    assert isinstance(Model.options(**options), serve.Deployment)


def test_ray_actor_options_are_kept() -> None:
    @serve.deployment(ray_actor_options={"num_cpus": 0.5, "resources": {"custom": 2.0}})
    class Model:
        pass

    assert Model.ray_actor_options == {"num_cpus": 0.5, "resources": {"custom": 2.0}}
    assert Model.options(name="x").ray_actor_options == Model.ray_actor_options


def test_autoscaling_config_starts_min_replicas(backend: str) -> None:
    @serve.deployment(autoscaling_config={"min_replicas": 2, "max_replicas": 4})
    class Scaled:
        def __call__(self) -> str:
            return "ok"

    handle = serve.run(Scaled.bind(), name="scaled", backend=backend)
    assert handle.remote().result() == "ok"
    dep = serve.status().applications["scaled"].deployments["Scaled"]
    assert dep.running_replicas == 2


def test_num_replicas_auto_runs(backend: str) -> None:
    @serve.deployment(num_replicas="auto")
    class Auto:
        def __call__(self) -> str:
            return "ok"

    assert Auto.num_replicas == "auto"
    handle = serve.run(Auto.bind(), name="auto", backend=backend)
    assert handle.remote().result() == "ok"
    assert serve.status().applications["auto"].deployments["Auto"].running_replicas >= 1


def test_num_replicas_auto_fills_a_partial_autoscaling_config_from_its_defaults() -> None:
    # As in Ray Serve: the fields given lie over what "auto" stands for (1 to 100
    # replicas, 2 ongoing requests each); before, max_replicas stayed 1 and min 2 failed.
    @serve.deployment(num_replicas="auto", autoscaling_config={"min_replicas": 2})
    class Auto:
        def __call__(self) -> str:
            return "ok"

    auto = Auto.deployment_options.autoscaling
    assert auto is not None
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 100, 2.0)
    assert auto.upscale_delay_s == serve.AutoscalingConfig().upscale_delay_s
    assert Auto.deployment_options.initial_replicas() == 2

    other = Auto.options(autoscaling_config={"max_replicas": 5, "target_ongoing_requests": 7})
    auto = other.deployment_options.autoscaling
    assert auto is not None
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 5, 7.0)
    # The fields given are still checked against each other.
    with pytest.raises(ValueError, match=r"min_replicas \(200\) must not exceed max_replicas"):
        Auto.options(autoscaling_config={"min_replicas": 200})

    serve.run(Auto.bind(), name="auto", route_prefix=None, backend="local")
    deployment = serve.status().applications["auto"].deployments["Auto"]
    assert (deployment.target_replicas, deployment.running_replicas) == (2, 2)


def test_num_replicas_auto_fills_a_partial_autoscaling_config_in_a_config_file() -> None:
    override = {"name": "Auto", "num_replicas": "auto", "autoscaling_config": {"min_replicas": 2}}
    config = validate_config(
        {"applications": [{"import_path": "m:app", "deployments": [override]}]}
    )
    auto = config.applications[0].deployments[0].autoscaling_config
    assert auto is not None and (auto.min_replicas, auto.max_replicas) == (2, 100)


# -- .bind() and the application graph -------------------------------------------


def test_bound_applications_become_handles_at_any_nesting(backend: str) -> None:
    @serve.deployment
    class Leaf:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        def __call__(self) -> str:
            return self.tag

    @serve.deployment
    class Collector:
        def __init__(self, top: Any, in_list: Any, in_tuple: Any, in_dict: Any, *, kw: Any) -> None:
            self.plain = (in_list[1], in_tuple[0], in_dict["n"])
            self.handles = {
                "top": top,
                "list": in_list[0],
                "tuple": in_tuple[1],
                "dict": in_dict["h"],
                "kw": kw,
            }

        async def __call__(self) -> dict[str, Any]:
            out: dict[str, Any] = {"plain": self.plain}
            for key, h in self.handles.items():
                out[key] = (
                    isinstance(h, serve.DeploymentHandle),
                    isinstance(h, tandem.handle.DeploymentHandle),
                    await h.remote(),
                )
            return out

    app = Collector.bind(
        Leaf.options(name="LeafTop").bind("top"),
        [Leaf.options(name="LeafList").bind("list"), 42],
        ("plain", Leaf.options(name="LeafTuple").bind("tuple")),
        {"h": Leaf.options(name="LeafDict").bind("dict"), "n": 7},
        kw=Leaf.options(name="LeafKw").bind("kw"),
    )
    handle = serve.run(app, backend=backend)
    result = handle.remote().result()
    assert result["plain"] == (42, "plain", 7)
    for key in ("top", "list", "tuple", "dict", "kw"):
        assert result[key] == (True, True, key), key


def test_one_node_shared_by_two_parents_is_one_deployment(tmp_path: Path, backend: str) -> None:
    log = tmp_path / "constructed.log"

    @serve.deployment
    class Shared:
        def __init__(self, log_path: str) -> None:
            with open(log_path, "a") as f:
                f.write("shared\n")

        def __call__(self, who: str) -> str:
            return f"shared for {who}"

    @serve.deployment
    class Left:
        def __init__(self, shared: Any) -> None:
            self.shared = shared

        async def __call__(self) -> str:
            return await self.shared.remote("left")

    @serve.deployment
    class Right:
        def __init__(self, shared: Any) -> None:
            self.shared = shared

        async def __call__(self) -> str:
            return await self.shared.remote("right")

    @serve.deployment
    class Top:
        def __init__(self, left: Any, right: Any) -> None:
            self.left, self.right = left, right

        async def __call__(self) -> list[str]:
            return [await self.left.remote(), await self.right.remote()]

    shared = Shared.bind(str(log))
    handle = serve.run(Top.bind(Left.bind(shared), Right.bind(shared)), name="g", backend=backend)
    assert handle.remote().result() == ["shared for left", "shared for right"]
    assert log.read_text().splitlines() == ["shared"]
    deployments = serve.status().applications["g"].deployments
    assert sorted(deployments) == ["Left", "Right", "Shared", "Top"]
    assert deployments["Shared"].running_replicas == 1


def test_two_deployments_with_the_same_name_raise_at_run(backend: str) -> None:
    @serve.deployment(name="Model")
    class A:
        pass

    @serve.deployment(name="Model")
    class B:
        pass

    @serve.deployment
    class Ingress:
        def __init__(self, a: Any, b: Any) -> None:
            pass

    with pytest.raises(ValueError, match="'Model'"):
        serve.run(Ingress.bind(A.bind(), B.bind()), backend=backend)
    assert serve.status().applications == {}


def test_same_deployment_bound_twice_runs_as_two_deployments(backend: str) -> None:
    @serve.deployment
    class Model:
        def __init__(self, weight: int) -> None:
            self.weight = weight

        def __call__(self, x: int) -> int:
            return x * self.weight

    @serve.deployment
    class Ensemble:
        def __init__(self, a: Any, b: Any) -> None:
            self.a, self.b = a, b

        async def __call__(self, x: int) -> list[int]:
            return [await self.a.remote(x), await self.b.remote(x)]

    handle = serve.run(Ensemble.bind(Model.bind(2), Model.bind(3)), name="ens", backend=backend)
    assert handle.remote(10).result() == [20, 30]
    assert sorted(serve.status().applications["ens"].deployments) == [
        "Ensemble",
        "Model",
        "Model_1",
    ]


def test_calling_a_deployment_directly_raises() -> None:
    @serve.deployment
    class Model:
        def __init__(self) -> None:
            raise AssertionError("must not be constructed")

    @serve.deployment
    def fn() -> str:
        return "called"

    with pytest.raises(RuntimeError, match="bind"):
        Model()
    with pytest.raises(RuntimeError, match="bind"):
        fn()


def test_run_with_unbound_deployment_raises_type_error(backend: str) -> None:
    @serve.deployment
    class Model:
        pass

    with pytest.raises(TypeError, match="bind"):
        serve.run(Model, backend=backend)  # type: ignore[arg-type]
    assert serve.status().applications == {}


def test_unbound_deployment_in_init_args_raises_type_error(backend: str) -> None:
    @serve.deployment
    class Child:
        pass

    @serve.deployment
    class Parent:
        def __init__(self, child: Any) -> None:
            pass

    with pytest.raises(TypeError, match="Child"):
        serve.run(Parent.bind(Child), backend=backend)
