"""/metrics about replicas: in flight, healthy, multiplexed models, batch sizes, and
requests waiting in callers' queues (http/replica_metrics.py), on every backend."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest

import tandem as serve
from helpers import eventually, parse_prometheus, total
from tandem._private.api import http_url
from tandem._private.http.replica_metrics import ReplicaMetrics
from tandem._private.stats import ReplicaRow, RequestStats

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _metrics() -> Samples:
    base = http_url()
    assert base is not None
    return parse_prometheus(httpx.get(base + "/metrics", timeout=10).text)


@serve.deployment(max_ongoing_requests=1)
class Busy:
    async def __call__(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"


def test_in_flight_healthy_and_queued_requests(backend: str) -> None:
    busy = serve.run(Busy.bind(), backend=backend, route_prefix="/busy")
    running = busy.remote(1.5)
    waiting = [busy.remote(0) for _ in range(3)]  # queued in the driver's router

    def during(samples: Samples) -> bool:
        return (
            total(samples, "tandem_replica_requests_in_flight", deployment="Busy") == 1
            and total(samples, "tandem_deployment_queued_requests", deployment="Busy") == 3
        )

    samples = eventually(_metrics, during)
    assert total(samples, "tandem_replica_healthy", deployment="Busy") == 1
    assert [r.result(timeout_s=10) for r in (running, *waiting)] == ["done"] * 4
    after = eventually(
        _metrics,
        lambda s: total(s, "tandem_deployment_queued_requests", deployment="Busy") == 0,
    )
    assert total(after, "tandem_replica_requests_in_flight", deployment="Busy") == 0


@serve.deployment
class Models:
    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        await asyncio.sleep(0.02)
        return f"model {model_id}"

    async def __call__(self) -> str:
        return await self.get_model(serve.get_multiplexed_model_id())


def test_multiplexed_models_loads_unloads_and_requests(backend: str) -> None:
    models = serve.run(Models.bind(), backend=backend, route_prefix="/models")
    for model_id in ("a", "a", "b", "c"):  # "c" evicts "a"
        answer = models.options(multiplexed_model_id=model_id).remote().result(timeout_s=10)
        assert answer == f"model {model_id}"

    def counted(samples: Samples) -> bool:
        return total(samples, "tandem_multiplexed_get_model_requests_total") == 4

    samples = eventually(_metrics, counted)
    assert total(samples, "tandem_multiplexed_model_loads_total", deployment="Models") == 3
    assert total(samples, "tandem_multiplexed_model_unloads_total", deployment="Models") == 1
    assert total(samples, "tandem_multiplexed_model_load_latency_seconds_count") == 3
    # Three loads of 20 ms each (the loop's timers may fire a little early).
    assert total(samples, "tandem_multiplexed_model_load_latency_seconds_sum") >= 0.04
    held = eventually(
        _metrics, lambda s: total(s, "tandem_multiplexed_models", deployment="Models") == 2
    )
    assert {
        dict(labels)["model_id"]
        for (name, labels), value in held.items()
        if name == "tandem_multiplexed_model_id" and value == 1
    } == {"b", "c"}


@serve.deployment
class Batched:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.5)
    async def __call__(self, items: list[int]) -> list[int]:
        return [2 * item for item in items]


def test_batch_sizes(backend: str) -> None:
    batched = serve.run(Batched.bind(), backend=backend, route_prefix="/batched")
    full = [batched.remote(i) for i in range(4)]  # one batch of 4
    assert [r.result(timeout_s=10) for r in full] == [0, 2, 4, 6]
    assert batched.remote(5).result(timeout_s=10) == 10  # a batch of 1, after the wait

    def sizes(samples: Samples) -> Any:
        return {
            dict(labels)["le"]: value
            for (name, labels), value in samples.items()
            if name == "tandem_batch_size_bucket" and ("deployment", "Batched") in labels
        }

    samples = eventually(_metrics, lambda s: total(s, "tandem_batch_size_count") == 2)
    assert total(samples, "tandem_batch_size_sum", deployment="Batched", method="__call__") == 5
    buckets = sizes(samples)
    assert (buckets["1"], buckets["2"], buckets["4"], buckets["+Inf"]) == (1, 1, 2, 2)


def test_only_a_running_replica_is_healthy() -> None:
    def row(replica_id: str, state: str) -> ReplicaRow:
        return ReplicaRow("app", "D", replica_id, state, frozenset(), 0, RequestStats())

    rows = [row("r1", "RUNNING"), row("r2", "STOPPING"), row("r3", "UNHEALTHY")]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicaMetrics(lambda: rows, dict))
    samples = parse_prometheus(generate_latest(registry).decode())
    healthy = {
        dict(labels)["replica"]: value
        for (name, labels), value in samples.items()
        if name == "tandem_replica_healthy"
    }
    assert healthy == {"r1": 1, "r2": 0, "r3": 0}
    # No multiplexed loader was called: no model families' samples.
    assert not [name for name, _ in samples if name.startswith("tandem_multiplexed")]


@serve.deployment(num_replicas=2)
class Counted:
    def __call__(self) -> str:
        return "ok"


def test_calls_served_by_replicas_that_stopped_stay_counted(backend: str) -> None:
    counted = serve.run(Counted.bind(), backend=backend, route_prefix="/counted")
    for _ in range(20):
        assert counted.remote().result(timeout_s=10) == "ok"

    def served(samples: Samples) -> float:
        return total(samples, "tandem_deployment_requests_total", deployment="Counted")

    assert eventually(lambda: served(_metrics()), lambda n: n == 20) == 20
    # One replica stops (scaled down): what it served stays in the deployment's count.
    serve.run(Counted.options(num_replicas=1).bind(), backend=backend, route_prefix="/counted")
    eventually(_metrics, lambda s: total(s, "tandem_replica_healthy", deployment="Counted") == 1)
    for _ in range(5):
        served_now = served(_metrics())
        assert served_now == 20, served_now
    assert counted.remote().result(timeout_s=10) == "ok"
    assert eventually(lambda: served(_metrics()), lambda n: n == 21) == 21
    # Deleting the application takes its counts with it.
    serve.delete("default")
    assert served(_metrics()) == 0
