"""The controller against a fake backend: the backend seam is all it needs.

The fake keeps replicas as records, can be told to fail starts, and reports
a replica's death through the events the controller gave it, as a real
backend does when a process or actor dies.
"""

from __future__ import annotations

import asyncio
from typing import Any

import tandem as serve
from tandem._private.app.graph import build_application
from tandem._private.backends.base import Backend, ReplicaStartError
from tandem._private.calls.router import ReplicaConnection, ReplicaInfo, ReplicaSet
from tandem._private.controller.controller import Controller
from tandem._private.controller.status import ApplicationState, DeploymentState
from tandem._private.replica.replica import ReplicaFacts, ReplicaSpec
from tandem._private.stats import RequestStats


class FakeBackend(Backend):
    name = "fake"

    def __init__(self) -> None:
        self.running: dict[str, ReplicaSpec] = {}
        self.fail_starts = 0

    async def start_replica(self, spec: ReplicaSpec) -> ReplicaInfo:
        if self.fail_starts:
            self.fail_starts -= 1
            raise ReplicaStartError(spec.replica_id, RuntimeError("no room"), "")
        self.running[spec.replica_id] = spec
        return ReplicaInfo(spec.replica_id, spec.replica_id, spec.options.max_ongoing_requests)

    async def stop_replica(self, info: ReplicaInfo, timeout_s: float) -> None:
        self.running.pop(info.replica_id, None)

    async def check_health(self, info: ReplicaInfo) -> None:
        if info.replica_id not in self.running:
            raise RuntimeError("gone")

    async def reconfigure(self, info: ReplicaInfo, user_config: Any) -> None:
        pass

    async def set_rank(self, info: ReplicaInfo, rank: int, world_size: int) -> None:
        pass

    def connect(self, info: ReplicaInfo) -> ReplicaConnection:
        raise AssertionError("the controller never calls replicas itself")

    def facts(self, info: ReplicaInfo) -> ReplicaFacts:
        return ReplicaFacts(pid=4242, node="fake-node", in_flight=1)

    def crash(self, replica_id: str) -> None:
        self.running.pop(replica_id)
        self.events.replica_exited(replica_id)


@serve.deployment(num_replicas=2)
class Model:
    pass


async def _until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def test_controller_runs_replicas_through_the_seam_and_reports_their_facts() -> None:
    async def scenario() -> None:
        backend = FakeBackend()
        published: list[ReplicaSet] = []
        controller = Controller(backend, published.append)
        await controller.open()
        try:
            await controller.deploy(build_application(Model.bind(), "app", None))
            assert len(backend.running) == 2
            assert published[-1].deployment_id.name == "Model"
            assert len(published[-1].replicas) == 2
            status = controller.status()
            assert status.backend == "fake"
            deployment = status.applications["app"].deployments["Model"]
            assert deployment.status == DeploymentState.HEALTHY
            assert {(r.pid, r.node, r.in_flight) for r in deployment.replicas} == {
                (4242, "fake-node", 1)
            }
        finally:
            await controller.close()
        assert backend.running == {}

    asyncio.run(scenario())


def test_a_replica_the_backend_reports_dead_is_replaced_even_after_failed_starts() -> None:
    async def scenario() -> None:
        backend = FakeBackend()
        controller = Controller(backend, lambda _: None)
        await controller.open()
        try:
            await controller.deploy(build_application(Model.bind(), "app", None))
            dead = next(iter(backend.running))
            backend.fail_starts = 1  # the first replacement fails, the next one works
            backend.crash(dead)

            def healed() -> bool:
                state = controller.status().applications["app"]
                return len(backend.running) == 2 and state.status == ApplicationState.RUNNING

            await _until(healed)
            assert dead not in backend.running
            assert sum(controller.replica_restarts.values()) == 1
            assert sum(controller.start_failures.values()) == 1
        finally:
            await controller.close()

    asyncio.run(scenario())


class ForgetfulBackend(FakeBackend):
    """Forgets a replica's facts as it stops, before stop_replica returns (as the process
    backend does when the process exits while it waits), and holds the stop there."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, RequestStats] = {}
        self.stopping = asyncio.Event()
        self.finish_stop = asyncio.Event()

    async def start_replica(self, spec: ReplicaSpec) -> ReplicaInfo:
        info = await super().start_replica(spec)
        self.stats[spec.replica_id] = RequestStats()
        for _ in range(10):
            self.stats[spec.replica_id].record("__call__", 0.001, False)
        return info

    async def stop_replica(self, info: ReplicaInfo, timeout_s: float) -> None:
        self.stats.pop(info.replica_id, None)
        self.stopping.set()
        await self.finish_stop.wait()
        await super().stop_replica(info, timeout_s)

    def facts(self, info: ReplicaInfo) -> ReplicaFacts:
        return ReplicaFacts(pid=4242, stats=self.stats.get(info.replica_id))


def test_a_stopping_replica_counts_while_its_backend_already_forgot_it() -> None:
    def served(controller: Controller) -> int:
        return sum(series.requests for *_, series in controller.deployment_series())

    async def scenario() -> None:
        backend = ForgetfulBackend()
        controller = Controller(backend, lambda _: None)
        await controller.open()
        try:
            await controller.deploy(build_application(Model.bind(), "app", None))
            assert served(controller) == 20
            one = Model.options(num_replicas=1)
            await controller.deploy(build_application(one.bind(), "app", None))
            await asyncio.wait_for(backend.stopping.wait(), 5)
            assert served(controller) == 20  # the backend no longer knows it: still 20
            backend.finish_stop.set()
            await _until(lambda: len(backend.running) == 1)
            assert served(controller) == 20
        finally:
            backend.finish_stop.set()
            await controller.close()

    asyncio.run(scenario())
