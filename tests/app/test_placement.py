"""Placement options: ``placement_group_bundles``, ``placement_group_strategy``,
``max_replicas_per_node``.

Covers: they are checked as Ray Serve checks them, where they are written; the
local and process backends warn once per deployment that they do not apply
them; the ray backend gives each replica a placement group of its own (the
replica in bundle 0, what it starts in the group; removed with the replica),
enforces max_replicas_per_node through Ray's scheduler, and fails at once when
no node could ever hold a group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

import tandem as serve
from conftest import BACKENDS
from tandem.exceptions import DeploymentFailedError

F = TypeVar("F", bound=Callable[..., Any])


@serve.deployment
class Plain:
    def __call__(self) -> str:
        return "ok"


# -- checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"placement_group_bundles": []}, "non-empty list"),
        ({"placement_group_bundles": {"CPU": 1}}, "non-empty list"),
        ({"placement_group_bundles": [{}]}, "bundle 0 must be a non-empty dict"),
        ({"placement_group_bundles": [{"CPU": 1}, {"GPU": -1}]}, "'GPU' of bundle 1"),
        ({"placement_group_bundles": [{"CPU": 1}, {"GPU": "1"}]}, "'GPU' of bundle 1"),
        ({"placement_group_bundles": [{"CPU": 1}, {"GPU": 0}]}, "bundle 1 reserves nothing"),
        ({"placement_group_strategy": "PACK"}, "needs placement_group_bundles"),
        (
            {"placement_group_bundles": [{"CPU": 1}], "placement_group_strategy": "WIDE"},
            "placement_group_strategy",
        ),
        (
            {"placement_group_bundles": [{"CPU": 1}], "max_replicas_per_node": 2},
            "cannot be set together",
        ),
        ({"placement_group_bundles": [{"GPU": 1}]}, r"CPU=1\)"),  # num_cpus defaults to 1
        (
            {
                "placement_group_bundles": [{"CPU": 1}, {"GPU": 1}],
                "ray_actor_options": {"num_cpus": 1, "num_gpus": 1},
            },
            "first placement group bundle",
        ),
        ({"max_replicas_per_node": 0}, "max_replicas_per_node"),
        ({"max_replicas_per_node": 101}, "max_replicas_per_node"),
        ({"max_replicas_per_node": 1.5}, "max_replicas_per_node"),
    ],
)
def test_bad_placement_options_fail_where_they_are_written(
    options: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        serve.deployment(**options)(Plain.func_or_class)
    with pytest.raises(ValueError, match=problem):
        Plain.options(**options)


def test_good_placement_options_are_taken() -> None:
    placed = Plain.options(
        placement_group_bundles=[{"CPU": 1, "GPU": 1}, {"CPU": 2}],
        placement_group_strategy="STRICT_SPREAD",
        ray_actor_options={"num_cpus": 0.5, "num_gpus": 1},
    )
    options = placed.deployment_options
    assert options.placement_group_bundles == [{"CPU": 1, "GPU": 1}, {"CPU": 2}]
    assert options.placement_group_strategy == "STRICT_SPREAD"
    assert Plain.options(max_replicas_per_node=3).deployment_options.max_replicas_per_node == 3


# -- backends that do not place replicas -------------------------------------


@pytest.mark.parametrize("backend", [b for b in ("local", "process") if b in BACKENDS])
def test_backends_without_placement_warn_once_per_deployment(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tandem")
    app = Plain.options(num_replicas=2, max_replicas_per_node=1).bind()
    handle = serve.run(app, name="spread", route_prefix=None, backend=backend)
    assert handle.remote().result(timeout_s=30) == "ok"
    warnings = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
    assert warnings == [
        f"Deployment 'Plain' sets max_replicas_per_node, which the {backend} backend does not "
        "apply (only the ray backend places replicas on a cluster's nodes); its replicas run "
        "on this machine."
    ]


# -- the ray backend ---------------------------------------------------------


def on_ray(test: F) -> F:
    """A test of the ray backend: on the test process's local Ray."""
    marks = (
        pytest.mark.skipif("ray" not in BACKENDS, reason="the ray backend is not tested here"),
        pytest.mark.usefixtures("local_ray"),
    )
    for mark in marks:
        test = mark(test)
    return test


@serve.deployment(
    placement_group_bundles=[{"CPU": 1}, {"CPU": 1, "tandem_test_slot": 1}],
    placement_group_strategy="STRICT_PACK",
)
class Grouped:
    def facts(self) -> dict[str, Any]:
        import ray

        @ray.remote(num_cpus=1, resources={"tandem_test_slot": 1})
        def child() -> str | None:
            return ray.get_runtime_context().get_placement_group_id()

        return {
            "group": ray.get_runtime_context().get_placement_group_id(),
            "child_group": ray.get(child.remote()),
        }


def _groups() -> dict[str, dict[str, Any]]:
    import ray

    table: dict[str, dict[str, Any]] = ray.util.placement_group_table()
    return table


@on_ray
def test_each_replica_gets_a_placement_group_of_its_own() -> None:
    handle = serve.run(
        Grouped.options(num_replicas=2).bind(), name="grouped", route_prefix=None, backend="ray"
    )
    groups: set[str] = set()
    while len(groups) < 2:  # the router spreads calls over both replicas
        facts = handle.facts.remote().result(timeout_s=60)
        assert facts["group"] is not None
        assert facts["child_group"] == facts["group"]  # what the replica starts goes in too
        groups.add(facts["group"])
    for group in groups:
        entry = _groups()[group]
        assert entry["state"] == "CREATED"
        assert entry["strategy"] == "STRICT_PACK"
        assert list(entry["bundles"].values()) == [
            {"CPU": 1.0},
            {"CPU": 1.0, "tandem_test_slot": 1.0},
        ]
    serve.delete("grouped")
    assert {_groups()[group]["state"] for group in groups} == {"REMOVED"}


@serve.deployment(num_replicas=2, max_replicas_per_node=2, ray_actor_options={"num_cpus": 0})
class Capped:
    def resources(self) -> tuple[str, dict[str, float]]:
        import ray

        context = ray.get_runtime_context()
        return context.get_actor_id(), context.get_assigned_resources()


@on_ray
def test_max_replicas_per_node_is_a_share_of_the_node_for_the_scheduler() -> None:
    # Each node has one unit of the deployment's implicit resource; a replica takes
    # half of it here, so Ray puts at most two on a node (both fit on this one).
    handle = serve.run(Capped.bind(), name="capped", route_prefix=None, backend="ray")
    seen: dict[str, dict[str, float]] = {}
    while len(seen) < 2:
        actor, resources = handle.resources.remote().result(timeout_s=60)
        seen[actor] = resources
    for resources in seen.values():
        shares = {k: v for k, v in resources.items() if "implicit" in k}
        assert list(shares.values()) == [0.5], resources
        assert next(iter(shares)).endswith("capped:Capped")


@on_ray
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"placement_group_bundles": [{"CPU": 1}, {"CPU": 1000}]},
            "asks for CPU=1000 in one placement group bundle",
        ),
        (
            {
                "placement_group_bundles": [{"CPU": 10}, {"CPU": 10}],
                "placement_group_strategy": "STRICT_PACK",
            },
            r"asks for CPU=20 on one node for its placement group \(STRICT_PACK\)",
        ),
        (
            {
                "placement_group_bundles": [{"CPU": 1}, {"CPU": 1}],
                "placement_group_strategy": "STRICT_SPREAD",
            },
            "2 placement group bundles on distinct nodes",
        ),
    ],
    ids=["bundle", "strict-pack", "strict-spread"],
)
def test_a_placement_group_no_cluster_could_hold_fails_at_once(
    options: dict[str, Any], message: str
) -> None:
    import ray

    if len([n for n in ray.nodes() if n.get("Alive")]) != 1:
        pytest.skip("needs the tests' one-node Ray")
    with pytest.raises(DeploymentFailedError, match=message):
        serve.run(Plain.options(**options).bind(), name="nowhere", route_prefix=None, backend="ray")
    assert not [g for g in _groups().values() if "nowhere" in g["name"]]  # none was made
