"""What the dashboard draws (``Controller.overview``): the graph's nodes and edges with
the calls on each, replicas with their last failed request, replicas taken out of
service, and autoscaling decisions."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

import tandem as serve
from helpers import eventually
from tandem._private.api import current_runtime
from tandem._private.app.autoscaling_config import AutoscalingConfig
from tandem._private.calls.context import DeploymentID
from tandem._private.controller.autoscaling import KEPT_DECISIONS, Autoscaler
from tandem.handle import DeploymentHandle


@serve.deployment
class Adder:
    def __call__(self, value: int) -> int:
        if value < 0:
            raise ValueError("negative input")
        return value + 1


@serve.deployment(num_replicas=2)
class Doubler:
    def __call__(self, value: int) -> int:
        return value * 2

    def pid(self) -> int:
        return os.getpid()


@serve.deployment
class Front:
    def __init__(self, adder: DeploymentHandle, doubler: DeploymentHandle) -> None:
        self._adder = adder
        self._doubler = doubler

    async def __call__(self, value: int) -> int:
        return await self._doubler.remote(self._adder.remote(value))


def overview() -> dict[str, Any]:
    runtime = current_runtime()
    assert runtime is not None and runtime.controller is not None
    controller = runtime.controller

    async def read() -> dict[str, Any]:
        await controller.refresh_reports(timeout_s=5)
        return controller.overview()

    return runtime.run_sync(read())


def _app(view: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in view["applications"] if a["name"] == name)


def _deployment(app: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in app["deployments"] if d["name"] == name)


def _edges(app: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(e["from"], e["to"]): e for e in app["edges"]}


def test_graph_edges_count_the_calls_each_caller_made(backend: str) -> None:
    front = serve.run(
        Front.bind(Adder.bind(), Doubler.bind()), backend=backend, name="shop", route_prefix="/shop"
    )
    assert [front.remote(v).result(timeout_s=10) for v in range(5)] == [2, 4, 6, 8, 10]
    with pytest.raises(ValueError, match="negative input"):
        front.remote(-1).result(timeout_s=10)
    serve.get_deployment_handle("Doubler", "shop").remote(7).result(timeout_s=10)

    app = _app(overview(), "shop")
    assert app["ingress"] == "Front" and app["route_prefix"] == "/shop"
    assert [d["name"] for d in app["deployments"]] == ["Adder", "Doubler", "Front"]
    edges = _edges(app)
    # The graph's handles, and the proxy's way in; the driver's direct calls to the
    # ingress and to Doubler count on the edges from outside.
    assert set(edges) == {("", "Front"), ("Front", "Adder"), ("Front", "Doubler"), ("", "Doubler")}
    assert edges[("Front", "Adder")]["declared"] and edges[("", "Front")]["declared"]
    assert not edges[("", "Doubler")]["declared"]
    assert (
        edges[("Front", "Adder")]["series"]["requests"],
        edges[("Front", "Adder")]["series"]["errors"],
    ) == (6, 1)
    assert edges[("Front", "Doubler")]["series"]["requests"] == 5
    assert edges[("", "Doubler")]["series"]["requests"] == 1
    assert edges[("", "Front")]["series"]["requests"] == 6
    assert sum(edges[("", "Front")]["series"]["buckets"]) == 6

    doubler = _deployment(app, "Doubler")
    assert doubler["series"]["requests"] == 6
    assert doubler["target_replicas"] == doubler["running_replicas"] == 2
    assert {r["state"] for r in doubler["replicas"]} == {"RUNNING"}
    assert all(r["pid"] is not None for r in doubler["replicas"])
    assert doubler["autoscaling"] is None

    # The failed request is the last failure of the replicas it failed in, by its id.
    adder, front_record = _deployment(app, "Adder"), _deployment(app, "Front")
    failures = [r["last_failure"] for r in adder["replicas"] + front_record["replicas"]]
    assert all(
        f is not None and f["error"].startswith("ValueError: negative input") for f in failures
    )
    assert len({f["request_id"] for f in failures}) == 1
    assert all(r["last_failure"] is None for r in doubler["replicas"])


def test_a_killed_replica_is_listed_as_taken_out_of_service() -> None:
    # The process backend's replicas are processes of this machine, to kill.
    doubler = serve.run(Doubler.bind(), backend="process", name="math", route_prefix=None)
    before = _deployment(_app(overview(), "math"), "Doubler")
    victim = before["replicas"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced(view: dict[str, Any]) -> bool:
        record = _deployment(_app(view, "math"), "Doubler")
        ids = {r["replica_id"] for r in record["replicas"] if r["state"] == "RUNNING"}
        return victim["replica_id"] not in ids and len(ids) == 2

    record = _deployment(_app(eventually(overview, replaced, timeout_s=30), "math"), "Doubler")
    retired = record["retired"]
    assert [r["replica_id"] for r in retired] == [victim["replica_id"]]
    assert retired[0]["pid"] == victim["pid"] and "exit" in retired[0]["reason"]
    assert record["restarts"] == 1
    assert doubler.remote(2).result(timeout_s=10) == 4


def test_autoscaler_keeps_its_latest_decisions_in_order() -> None:
    autoscaler = Autoscaler(
        AutoscalingConfig(min_replicas=1, max_replicas=1000, upscale_delay_s=0, downscale_delay_s=0)
    )
    deployment = DeploymentID("Model", "app")
    target = 1
    for step in range(KEPT_DECISIONS + 5):
        replicas = [f"app#Model#{n}" for n in range(target)]
        context = autoscaler.context(deployment, replicas, target, float(step))
        target = autoscaler.settle(context, target + 1, f"step {step}")
    kept = list(autoscaler.decisions)
    assert len(kept) == KEPT_DECISIONS
    assert kept[-1] == autoscaler.last_decision
    assert [d.reason for d in kept[:2]] == ["step 5", "step 6"]
    assert all(d.to_replicas == d.from_replicas + 1 for d in kept)
