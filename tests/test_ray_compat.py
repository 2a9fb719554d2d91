"""Small parts of Ray Serve's API that code written for it relies on."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import pytest

import tandem as serve
from conftest import RAY_INSTALLED
from tandem.schema import ReplicaRank


def test_importing_tandem_makes_starlette_requests_reachable() -> None:
    # Ray Serve code writes ``import starlette`` and then uses starlette.requests.Request.
    code = "import starlette, tandem; print(starlette.requests.Request.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Request"


def test_replica_rank_is_an_object_with_ray_fields(backend: str) -> None:
    @serve.deployment(num_replicas=2)
    class Shard:
        def __call__(self) -> tuple[Any, int]:
            ctx = serve.get_replica_context()
            return ctx.rank, ctx.world_size

    handle = serve.run(Shard.bind(), name="ranks", backend=backend)
    seen = {}
    for _ in range(100):
        rank, world_size = handle.remote().result()
        assert isinstance(rank, ReplicaRank)
        assert world_size == 2
        seen[rank.rank] = rank
        if len(seen) == 2:
            break
    assert sorted(seen) == [0, 1]
    assert all(r.node_rank == 0 and r.local_rank == r.rank for r in seen.values())


def test_reconfigure_that_takes_rank_gets_it_without_user_config(backend: str) -> None:
    @serve.deployment
    class Ranked:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, int]] = []

        def reconfigure(self, user_config: Any, rank: ReplicaRank) -> None:
            self.calls.append((user_config, rank.rank))

        def __call__(self) -> list[tuple[Any, int]]:
            return self.calls

    handle = serve.run(Ranked.bind(), name="rk", backend=backend)
    assert handle.remote().result() == [(None, 0)]


def test_reconfigure_gets_rank_with_user_config_and_old_style_stays_working(
    backend: str,
) -> None:
    @serve.deployment(user_config={"x": 1})
    class WithRank:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def reconfigure(self, config: Any, rank: ReplicaRank) -> None:
            self.calls.append((config, rank.rank))

        def __call__(self) -> list[Any]:
            return self.calls

    @serve.deployment(user_config={"y": 2})
    class OldStyle:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def reconfigure(self, config: Any) -> None:
            self.calls.append(config)

        def __call__(self) -> list[Any]:
            return self.calls

    assert serve.run(
        WithRank.bind(), name="wr", route_prefix=None, backend=backend
    ).remote().result() == [({"x": 1}, 0)]
    assert serve.run(
        OldStyle.bind(), name="os", route_prefix=None, backend=backend
    ).remote().result() == [{"y": 2}]


def test_handle_options_take_rays_transport_options() -> None:
    @serve.deployment
    def echo(x: int) -> int:
        return x

    handle = serve.run(echo.bind(), name="opts", backend="local")
    for options in (
        {"_by_reference": False},
        {"_by_reference": True},
        {"_prefer_local_routing": True},
        {"request_serialization": "cloudpickle", "response_serialization": "pickle"},
    ):
        assert handle.options(**options).remote(3).result() == 3
    with pytest.raises(ValueError, match="request_serialization='msgpack' is not supported"):
        handle.options(request_serialization="msgpack")


def test_sync_constructor_finds_the_replicas_running_loop(backend: str) -> None:
    # Ray Serve runs a sync __init__ on the replica's loop: code written for it
    # starts background tasks there.
    @serve.deployment
    class Background:
        def __init__(self) -> None:
            self.loop = asyncio.get_running_loop()
            self.ticks = 0
            self.task = asyncio.get_event_loop().create_task(self._tick())

        async def _tick(self) -> None:
            while True:
                self.ticks += 1
                await asyncio.sleep(0.01)

        async def __call__(self) -> tuple[bool, int]:
            return self.loop is asyncio.get_running_loop(), self.ticks

    handle = serve.run(Background.bind(), name="bg", route_prefix=None, backend=backend)
    same_loop, _ = handle.remote().result()
    assert same_loop
    deadline = time.monotonic() + 30
    while handle.remote().result()[1] < 3:
        assert time.monotonic() < deadline, "the task made in __init__ never ran"
        time.sleep(0.01)


def test_async_constructor_is_awaited(backend: str) -> None:
    @serve.deployment
    class AsyncInit:
        async def __init__(self, value: int) -> None:
            await asyncio.sleep(0)
            self.value = value

        def __call__(self) -> int:
            return self.value

    handle = serve.run(AsyncInit.bind(7), name="ai", route_prefix=None, backend=backend)
    assert handle.remote().result() == 7


def test_local_testing_mode_next_to_another_backend_runs_apart() -> None:
    # Ray Serve runs a local-testing-mode application in-process, apart from the
    # applications Serve runs: both answer, neither replaces the other.
    @serve.deployment
    class Doubler:
        def double(self, s: str) -> str:
            return s + " " + s

    @serve.deployment
    class Hello:
        def __init__(self, doubler: Any) -> None:
            self.doubler = doubler

        async def __call__(self, name: str) -> tuple[str, int]:
            return await self.doubler.double.remote(name), os.getpid()

    app = Hello.bind(Doubler.bind())
    on_process = serve.run(app, route_prefix=None, backend="process")
    in_process = serve.run(app, route_prefix=None, _local_testing_mode=True)
    text, pid = in_process.remote("hi").result()
    assert (text, pid) == ("hi hi", os.getpid())
    text, pid = on_process.remote("ho").result()
    assert text == "ho ho" and pid != os.getpid()
    # Handles derived from the testing app's handle stay with it.
    assert in_process.options(method_name="__call__").remote("x").result()[1] == os.getpid()
    assert serve.status().backend == "process"


@pytest.fixture
def tandem_logger_restored() -> Any:
    logger = logging.getLogger("tandem")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    access = logging.getLogger("tandem.access")
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:], logger.level, logger.propagate = saved
    access.disabled = False


def test_start_logging_config_sets_the_systems_own_logs(
    tandem_logger_restored: Any, tmp_path: Any
) -> None:
    # Ray Serve's serve.start(logging_config=...) configures its controller's and
    # proxies' logs: level, encoding, folder, access log.
    serve.start(
        logging_config={
            "encoding": "JSON",
            "log_level": "DEBUG",
            "enable_access_log": False,
            "logs_dir": str(tmp_path),
        }
    )
    logger = logging.getLogger("tandem")
    assert logger.level == logging.DEBUG
    assert logging.getLogger("tandem.access").disabled
    logger.debug("hello from the system")
    for handler in logger.handlers:
        handler.flush()
    line = json.loads((tmp_path / "tandem.log").read_text().splitlines()[-1])
    assert line["message"] == "hello from the system" and line["level"] == "DEBUG"


@serve.deployment
def _healthy_apps() -> list[str]:
    # Ray Serve's monitoring example: a deployment that reads serve.status().
    return [
        name
        for name, app in serve.status().applications.items()
        if app.status == serve.schema.ApplicationStatus.RUNNING
    ]


def test_status_inside_a_replica_tells_what_the_driver_sees(backend: str) -> None:
    if backend == "ray":
        handle = serve.run(_healthy_apps.bind(), name="monitor", route_prefix=None, backend=backend)
        with pytest.raises(RuntimeError, match="ray backend"):
            handle.remote().result()
        return
    handle = serve.run(_healthy_apps.bind(), name="monitor", route_prefix=None, backend=backend)
    assert handle.remote().result() == ["monitor"]


def test_run_many_deploys_each_target_and_returns_their_handles() -> None:
    @serve.deployment
    class named:  # noqa: N801 - reads like the function it stands for
        def __init__(self, tag: str) -> None:
            self.tag = tag

        def __call__(self) -> str:
            return self.tag

    handles = serve.run_many(
        [
            serve.RunTarget(named.bind("a"), name="a", route_prefix="/a"),
            serve.RunTarget(named.bind("b"), name="b", route_prefix="/b"),
        ],
        backend="local",
    )
    assert [h.remote().result() for h in handles] == ["a", "b"]
    assert set(serve.status().applications) >= {"a", "b"}
    with pytest.raises(ValueError, match="unique"):
        serve.run_many([serve.RunTarget(named.bind("c"), name="c", route_prefix="/a")] * 2)
    with pytest.raises(TypeError, match="RunTarget"):
        serve.run_many([named.bind("d")])  # type: ignore[list-item]


def test_shutdown_async_and_trace_context() -> None:
    @serve.deployment
    def traced() -> Any:
        return serve.get_trace_context()

    handle = serve.run(traced.bind(), name="t", route_prefix=None, backend="local")
    assert handle.remote().result() is None  # no tracing configured
    asyncio.run(serve.shutdown_async())
    assert serve.status().applications == {}


def test_controller_options_are_refused_unless_empty() -> None:
    @serve.deployment
    def f() -> int:
        return 1

    assert serve.run(f.bind(), route_prefix=None, controller_options={}).remote().result() == 1
    with pytest.raises(ValueError, match="controller_options is not supported"):
        serve.run(f.bind(), route_prefix=None, controller_options={"runtime_env": {"a": 1}})


def test_handle_and_response_types_take_type_parameters() -> None:
    # Ray Serve's are generic: `def __init__(self, model: DeploymentHandle[Model])`
    # is evaluated when the class is defined (no `from __future__ import annotations`).
    from tandem.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

    assert DeploymentHandle[int] is not None
    assert DeploymentResponse[str] is not None
    assert DeploymentResponseGenerator[bytes] is not None


def test_one_replica_id_type_serves_routers_and_autoscaling_policies() -> None:
    import tandem.config
    import tandem.request_router

    assert tandem.config.ReplicaID is tandem.request_router.ReplicaID


@pytest.mark.skipif(not RAY_INSTALLED, reason="needs Ray")
def test_process_replicas_join_the_drivers_ray_for_ray_core_calls(local_ray: None) -> None:
    # Ray Serve's own examples keep Ray actor handles in deployments and call ray.get
    # there; on the process backend the replica joins the driver's Ray to do the same.
    import ray

    @ray.remote
    class Store:
        def __init__(self) -> None:
            self.items: list[str] = []

        def add(self, item: str) -> None:
            self.items.append(item)

        def get(self) -> list[str]:
            return self.items

    store = Store.remote()  # type: ignore[attr-defined]

    @serve.deployment
    def record(item: str) -> int:
        ray.get(store.add.remote(item))
        return os.getpid()

    handle = serve.run(record.bind(), name="rayuser", route_prefix=None, backend="process")
    assert handle.remote("a").result() != os.getpid()
    assert ray.get(store.get.remote()) == ["a"]


def test_deployment_id_takes_rays_arguments() -> None:
    from tandem.config import DeploymentID

    assert DeploymentID("Model") == DeploymentID(name="Model", app_name="default")
    assert DeploymentID("Model", "app").app_name == "app"
