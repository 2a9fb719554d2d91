"""The module-level API: run, delete, shutdown, status, handle lookups, replica context.

Constructor / ``__del__`` counts are written to files under ``tmp_path`` so the
tests observe them the same way whichever backend hosts the replicas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import tandem
import tandem as serve
from helpers import eventually, wait_for
from tandem._private.api import http_url
from tandem.exceptions import DeploymentFailedError, DeploymentUnavailableError, TandemError


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- run ------------------------------------------------------------------------


def test_run_returns_after_every_replica_is_constructed(tmp_path: Path, backend: str) -> None:
    log = tmp_path / "log"

    @serve.deployment(num_replicas=2)
    class Slow:
        def __init__(self, path: str) -> None:
            time.sleep(0.3)
            _append(path, "constructed")

        def __call__(self) -> str:
            return "ready"

    start = time.monotonic()
    handle = serve.run(Slow.bind(str(log)), backend=backend)
    assert time.monotonic() - start >= 0.3
    assert _lines(log) == ["constructed", "constructed"]
    assert isinstance(handle, serve.DeploymentHandle)
    assert handle.remote().result(timeout_s=1) == "ready"


def test_several_applications_side_by_side(backend: str) -> None:
    @serve.deployment
    class Named:
        def __init__(self, label: str) -> None:
            self.label = label

        def __call__(self) -> str:
            return self.label

    h1 = serve.run(Named.bind("one"), name="app1", route_prefix="/one", backend=backend)
    h2 = serve.run(Named.bind("two"), name="app2", route_prefix="/two", backend=backend)
    assert h1.remote().result() == "one"
    assert h2.remote().result() == "two"
    assert serve.get_app_handle("app1").remote().result() == "one"
    assert serve.get_app_handle("app2").remote().result() == "two"
    apps = serve.status().applications
    assert apps["app1"].route_prefix == "/one"
    assert apps["app2"].route_prefix == "/two"


def test_get_app_handle_unknown_name_raises(backend: str) -> None:
    @serve.deployment
    def f() -> int:
        return 1

    serve.run(f.bind(), name="known", backend=backend)
    with pytest.raises(DeploymentUnavailableError, match="missing"):
        serve.get_app_handle("missing")


# -- redeploy ---------------------------------------------------------------------


def _configurable(log: Path) -> Any:
    @serve.deployment(user_config={"threshold": 1})
    class Configurable:
        def __init__(self, path: str, version: str) -> None:
            self.path = path
            self.version = version
            self.config: Any = None
            _append(path, f"init {version}")

        def reconfigure(self, config: dict[str, Any]) -> None:
            self.config = config
            _append(self.path, f"reconfigure {config['threshold']}")

        def __call__(self) -> dict[str, Any]:
            return {
                "version": self.version,
                "config": self.config,
                "replica_id": serve.get_replica_context().replica_id,
            }

    return Configurable


def test_redeploy_with_new_user_config_reconfigures_in_place(tmp_path: Path, backend: str) -> None:
    log = tmp_path / "log"
    Configurable = _configurable(log)
    handle = serve.run(Configurable.bind(str(log), "v1"), backend=backend)
    first = handle.remote().result()
    assert first["config"] == {"threshold": 1}

    serve.run(
        Configurable.options(user_config={"threshold": 2}).bind(str(log), "v1"), backend=backend
    )
    second = handle.remote().result()
    assert second["config"] == {"threshold": 2}
    assert second["replica_id"] == first["replica_id"]
    assert _lines(log) == ["init v1", "reconfigure 1", "reconfigure 2"]


def test_redeploy_with_new_init_arg_replaces_the_replica(tmp_path: Path, backend: str) -> None:
    log = tmp_path / "log"
    Configurable = _configurable(log)
    handle = serve.run(Configurable.bind(str(log), "v1"), backend=backend)
    first = handle.remote().result()

    serve.run(Configurable.bind(str(log), "v2"), backend=backend)
    second = handle.remote().result()
    assert second["version"] == "v2"
    assert second["replica_id"] != first["replica_id"]
    assert [line for line in _lines(log) if line.startswith("init")] == ["init v1", "init v2"]


def test_deployment_removed_on_redeploy_is_stopped(tmp_path: Path, backend: str) -> None:
    log = tmp_path / "log"

    @serve.deployment
    class Child:
        def __init__(self, path: str) -> None:
            self.path = path

        def __call__(self) -> str:
            return "child"

        def __del__(self) -> None:
            _append(self.path, "child deleted")

    @serve.deployment
    class Parent:
        def __init__(self, child: Any) -> None:
            self.child = child

        async def __call__(self) -> str:
            return await self.child.remote()

    @serve.deployment
    class Solo:
        def __call__(self) -> str:
            return "solo"

    handle = serve.run(Parent.bind(Child.bind(str(log))), name="app", backend=backend)
    assert handle.remote().result() == "child"
    child_handle = serve.get_deployment_handle("Child", "app")

    handle = serve.run(Solo.bind(), name="app", backend=backend)
    assert handle.remote().result() == "solo"
    assert sorted(serve.status().applications["app"].deployments) == ["Solo"]
    assert wait_for(lambda: _lines(log) == ["child deleted"])
    with pytest.raises(DeploymentUnavailableError):
        child_handle.remote().result(timeout_s=2)
    with pytest.raises(DeploymentUnavailableError):
        serve.get_deployment_handle("Child", "app")


# -- delete and shutdown --------------------------------------------------------------


def test_delete_stops_one_app_and_leaves_the_others(tmp_path: Path, backend: str) -> None:
    log = tmp_path / "log"

    @serve.deployment
    class Model:
        def __init__(self, path: str, label: str) -> None:
            self.path, self.label = path, label

        def __call__(self) -> str:
            return self.label

        def __del__(self) -> None:
            _append(self.path, f"deleted {self.label}")

    doomed = serve.run(Model.bind(str(log), "a"), name="a", route_prefix="/a", backend=backend)
    kept = serve.run(Model.bind(str(log), "b"), name="b", route_prefix="/b", backend=backend)
    assert doomed.remote().result() == "a"

    serve.delete("a")
    assert wait_for(lambda: _lines(log) == ["deleted a"])
    with pytest.raises(DeploymentUnavailableError):
        doomed.remote().result(timeout_s=2)
    with pytest.raises(DeploymentUnavailableError):
        serve.get_app_handle("a")
    assert list(serve.status().applications) == ["b"]
    assert kept.remote().result() == "b"
    # deleting an unknown application is not an error
    serve.delete("never-existed")


def test_shutdown_runs_del_of_every_replica(tmp_path: Path, backend: str) -> None:
    log = tmp_path / "log"

    @serve.deployment(num_replicas=2)
    class Model:
        def __init__(self, path: str) -> None:
            self.path = path

        def __call__(self) -> str:
            return "ok"

        def __del__(self) -> None:
            _append(self.path, "deleted")

    handle = serve.run(Model.bind(str(log)), backend=backend)
    assert handle.remote().result() == "ok"
    serve.shutdown()
    assert _lines(log) == ["deleted", "deleted"]
    assert serve.status().applications == {}
    with pytest.raises(DeploymentUnavailableError):
        handle.remote()


# -- status -------------------------------------------------------------------------


def test_status_shows_applications_deployments_and_replicas(backend: str) -> None:
    @serve.deployment(num_replicas=2)
    class Worker:
        def __call__(self) -> str:
            return "work"

    @serve.deployment
    class Front:
        def __init__(self, worker: Any) -> None:
            self.worker = worker

        async def __call__(self) -> str:
            return await self.worker.remote()

    serve.run(Front.bind(Worker.bind()), name="shop", route_prefix="/shop", backend=backend)
    status = serve.status()
    assert isinstance(status, serve.Status)
    app = status.applications["shop"]
    assert app.status == "RUNNING"
    assert app.route_prefix == "/shop"
    assert app.ingress == "Front"
    assert sorted(app.deployments) == ["Front", "Worker"]
    worker = app.deployments["Worker"]
    assert worker.status == "HEALTHY"
    assert worker.target_replicas == 2
    assert worker.running_replicas == 2
    assert worker.replica_states == {"RUNNING": 2}
    assert len({r.replica_id for r in worker.replicas}) == 2
    front = app.deployments["Front"]
    assert (front.status, front.running_replicas, front.target_replicas) == ("HEALTHY", 1, 1)

    as_dict = status.to_dict()
    round_trip = json.loads(json.dumps(as_dict))
    assert round_trip["applications"]["shop"]["deployments"]["Worker"]["running_replicas"] == 2
    assert round_trip["applications"]["shop"]["status"] == "RUNNING"


def test_status_without_applications_is_empty() -> None:
    status = serve.status()
    assert status.applications == {}
    json.dumps(status.to_dict())


# -- get_deployment_handle ----------------------------------------------------------


def test_get_deployment_handle(backend: str) -> None:
    @serve.deployment
    class Inner:
        def __call__(self, x: int) -> int:
            return x + 100

        def name(self) -> str:
            return "inner"

    @serve.deployment
    class Outer:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self) -> int:
            # inside a replica, app_name defaults to the replica's own application
            return await serve.get_deployment_handle("Inner").remote(1)

    serve.run(Outer.bind(Inner.bind()), name="nest", route_prefix="/nest", backend=backend)
    inner = serve.get_deployment_handle("Inner", "nest")
    assert isinstance(inner, serve.DeploymentHandle)
    assert inner.remote(1).result() == 101
    assert inner.name.remote().result() == "inner"
    assert serve.get_deployment_handle("Outer", app_name="nest").remote().result() == 101

    with pytest.raises(DeploymentUnavailableError, match="Nope"):
        serve.get_deployment_handle("Nope", "nest")
    with pytest.raises(DeploymentUnavailableError):
        serve.get_deployment_handle("Inner", "no-such-app")


# -- replica context ---------------------------------------------------------------


def test_replica_context_inside_replicas(tmp_path: Path, backend: str) -> None:
    log = tmp_path / "log"

    @serve.deployment(num_replicas=3)
    class Ranked:
        def __init__(self, path: str) -> None:
            ctx = serve.get_replica_context()
            _append(
                path,
                json.dumps(
                    [
                        ctx.app_name,
                        ctx.deployment,
                        ctx.replica_id,
                        ctx.replica_tag,
                        ctx.rank.rank,
                        ctx.world_size,
                    ]
                ),
            )

        def sync_info(self) -> dict[str, Any]:
            ctx = serve.get_replica_context()
            return {
                "id": ctx.replica_id,
                "rank": ctx.rank.rank,
                "is_self": ctx.servable_object is self,
            }

        async def async_info(self) -> dict[str, Any]:
            ctx = serve.get_replica_context()
            return {
                "id": ctx.replica_id,
                "rank": ctx.rank.rank,
                "is_self": ctx.servable_object is self,
            }

    handle = serve.run(Ranked.bind(str(log)), name="ctxapp", route_prefix="/ctx", backend=backend)
    in_init = [json.loads(line) for line in _lines(log)]
    assert len(in_init) == 3
    assert {(app, dep) for app, dep, *_ in in_init} == {("ctxapp", "Ranked")}
    assert sorted(rank for *_, rank, _ in in_init) == [0, 1, 2]
    assert {world for *_, world in in_init} == {3}
    ids = {rid for _, _, rid, _, _, _ in in_init}
    assert len(ids) == 3
    assert all(rid == tag for _, _, rid, tag, _, _ in in_init)
    rank_of = {rid: rank for _, _, rid, _, rank, _ in in_init}

    status_ids = {
        r.replica_id for r in serve.status().applications["ctxapp"].deployments["Ranked"].replicas
    }
    assert status_ids == ids

    for method in (handle.sync_info, handle.async_info):
        for _ in range(6):
            info = method.remote().result()
            assert info["is_self"] is True
            assert info["id"] in ids
            assert info["rank"] == rank_of[info["id"]]


def test_world_size_follows_num_replicas_on_redeploy(backend: str) -> None:
    @serve.deployment(num_replicas=1)
    class Sharded:
        def __call__(self) -> tuple[int, int]:
            ctx = serve.get_replica_context()
            return ctx.rank.rank, ctx.world_size

    handle = serve.run(Sharded.bind(), name="sharded", backend=backend)
    assert handle.remote().result() == (0, 1)
    serve.run(Sharded.options(num_replicas=3).bind(), name="sharded", backend=backend)
    seen: dict[int, int] = {}
    for _ in range(200):
        rank, world_size = handle.remote().result()
        seen[rank] = world_size
        if len(seen) == 3:
            break
    assert sorted(seen) == [0, 1, 2]
    assert seen == {0: 3, 1: 3, 2: 3}


def test_replica_context_outside_a_replica_raises() -> None:
    with pytest.raises(RuntimeError):
        serve.get_replica_context()


def test_replica_context_in_function_deployment(backend: str) -> None:
    @serve.deployment
    def who() -> list[Any]:
        ctx = serve.get_replica_context()
        return [ctx.app_name, ctx.deployment, ctx.rank.rank, ctx.world_size]

    handle = serve.run(who.bind(), name="fnapp", backend=backend)
    assert handle.remote().result() == ["fnapp", "who", 0, 1]


# -- backend selection ---------------------------------------------------------------


@serve.deployment
def _ping() -> str:
    return "pong"


def test_backend_none_reads_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_BACKEND", "local")
    handle = serve.run(_ping.bind(), backend=None)
    assert handle.remote().result() == "pong"
    assert serve.status().backend == "local"


def test_backend_env_variable_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense") as info:
        serve.run(_ping.bind())
    assert "TANDEM_BACKEND" in str(info.value)
    monkeypatch.setenv("TANDEM_BACKEND", "local")
    assert serve.status().applications == {}
    assert serve.run(_ping.bind()).remote().result() == "pong"


def test_unknown_backend_argument_raises() -> None:
    with pytest.raises(ValueError, match="nonsense"):
        serve.run(_ping.bind(), backend="nonsense")


def test_local_testing_mode_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_BACKEND", raising=False)
    handle = serve.run(_ping.bind(), _local_testing_mode=True)
    assert handle.remote().result() == "pong"
    assert serve.status().backend == "local"


def test_run_without_backend_joins_the_running_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_BACKEND", raising=False)
    serve.run(_ping.bind(), name="first", route_prefix=None, backend="local")
    second = serve.run(_ping.bind(), name="second", route_prefix=None)
    assert second.remote().result() == "pong"
    assert serve.status().backend == "local"
    with pytest.raises(ValueError, match="shutdown"):
        serve.run(_ping.bind(), name="third", route_prefix=None, backend="process")


def test_start_refuses_options_it_would_not_apply() -> None:
    with pytest.raises(TypeError, match="detached"):
        serve.start(detached=True)
    with pytest.raises(ValueError, match="grpc_servicer_functions: Cannot import module 'm'"):
        serve.start(grpc_options={"port": 9000, "grpc_servicer_functions": ["m:add"]})
    serve.start(grpc_options={"port": 9000, "grpc_servicer_functions": []})  # no gRPC server
    with pytest.raises(ValueError, match="log_level"):
        serve.start(logging_config={"log_level": "LOUD"})


@serve.deployment
def _http_ping(request: Any) -> str:
    return "pong"


def test_shutdown_forgets_what_start_configured() -> None:
    serve.start(proxy_location="Disabled")
    serve.run(_http_ping.bind(), backend="local")
    assert http_url() is None
    serve.shutdown()
    serve.start(http_options={"port": 0})  # a port, but no proxy_location: the default again
    serve.run(_http_ping.bind(), backend="local")
    url = http_url()
    assert url is not None
    assert httpx.get(url).text == "pong"


# -- failures at run() ------------------------------------------------------------------


class _ModelLoadError(Exception):
    pass


def test_runtime_env_vars_reach_replicas_where_the_backend_can_set_them(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    @serve.deployment(
        ray_actor_options={"runtime_env": {"env_vars": {"TANDEM_TEST_COLOUR": "teal"}}}
    )
    def colour() -> str | None:
        import os

        return os.environ.get("TANDEM_TEST_COLOUR")

    with caplog.at_level("WARNING", logger="tandem"):
        handle = serve.run(colour.bind(), backend=backend, route_prefix=None)
        seen = handle.remote().result(timeout_s=30)
    if backend == "local":  # one process for every replica: it says it cannot
        assert seen is None
        assert "runtime_env env_vars, which the local backend does not apply" in caplog.text
    else:
        assert seen == "teal"
        assert "runtime_env" not in caplog.text


def test_failing_constructor_makes_run_raise_promptly(tmp_path: Path, backend: str) -> None:
    log = tmp_path / "log"

    @serve.deployment
    class Sibling:
        def __init__(self, path: str) -> None:
            self.path = path
            _append(path, "sibling started")

        def __del__(self) -> None:
            _append(self.path, "sibling deleted")

    @serve.deployment
    class Broken:
        def __init__(self, path: str) -> None:
            # Fail once the sibling has started (replicas start at once, in any order).
            deadline = time.monotonic() + 10
            while "sibling started" not in _lines(Path(path)) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.1)  # and has finished starting
            raise _ModelLoadError("weights file is corrupt")

    @serve.deployment
    class Ingress:
        def __init__(self, sibling: Any, broken: Any) -> None:
            pass

    start = time.monotonic()
    with pytest.raises(DeploymentFailedError) as info:
        serve.run(
            Ingress.bind(Sibling.bind(str(log)), Broken.bind(str(log))), name="bad", backend=backend
        )
    # Promptly: a first deploy fails for good at once, without retrying the broken
    # replica (which would go on for ever). Generous, as Ray actors start slowly on a
    # loaded machine.
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert "Broken" in message
    assert "weights file is corrupt" in message
    assert "Traceback" in message
    assert "_ModelLoadError" in message
    assert isinstance(info.value, TandemError)

    assert "bad" not in serve.status().applications
    with pytest.raises(DeploymentUnavailableError):
        serve.get_app_handle("bad")
    assert wait_for(lambda: _lines(log) == ["sibling started", "sibling deleted"])


_SYSTEM_EXIT_SCRIPT = textwrap.dedent(
    """
    import sys
    import tandem as serve
    from tandem.exceptions import DeploymentFailedError

    @serve.deployment
    class ParsesArgs:
        def __init__(self):
            sys.exit(2)  # what argparse does on a bad command line

    try:
        serve.run(ParsesArgs.bind(), route_prefix=None, backend="local")
    except DeploymentFailedError as exc:
        print("raised:", "ParsesArgs" in str(exc))
    serve.shutdown()
    print("finished")
    """
)


def test_constructor_raising_system_exit_fails_run_without_hanging() -> None:
    # In a subprocess: when the bug hits, this process's tandem would be unusable.
    try:
        result = subprocess.run(
            [sys.executable, "-c", _SYSTEM_EXIT_SCRIPT],
            capture_output=True,
            text=True,
            timeout=4,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("run() hung on a constructor that raised SystemExit")
    assert result.stdout.splitlines() == ["raised: True", "finished"], result.stderr


def test_failing_constructor_on_redeploy_keeps_old_version(backend: str) -> None:
    @serve.deployment
    class Model:
        def __init__(self, version: str, fail: bool = False) -> None:
            if fail:
                raise RuntimeError(f"cannot build {version}")
            self.version = version

        def __call__(self) -> str:
            return self.version

    handle = serve.run(Model.bind("v1"), name="app", backend=backend)
    assert handle.remote().result() == "v1"
    with pytest.raises(DeploymentFailedError, match="cannot build v2"):
        serve.run(Model.bind("v2", fail=True), name="app", backend=backend)
    assert handle.remote().result() == "v1"
    assert serve.get_app_handle("app").remote().result() == "v1"
    app = serve.status().applications["app"]
    assert app.status == "RUNNING"
    assert app.deployments["Model"].running_replicas == 1


def test_user_config_without_reconfigure_fails_run(backend: str) -> None:
    @serve.deployment(user_config={"a": 1})
    class NoReconfigure:
        def __call__(self) -> str:
            return "ok"

    with pytest.raises(DeploymentFailedError, match="reconfigure") as info:
        serve.run(NoReconfigure.bind(), name="nr", backend=backend)
    assert "NoReconfigure" in str(info.value)
    assert "nr" not in serve.status().applications


# -- health checks -----------------------------------------------------------------------


def test_unhealthy_replica_is_replaced(backend: str) -> None:
    @serve.deployment(health_check_period_s=0.1, health_check_timeout_s=0.5)
    class Fragile:
        def __init__(self) -> None:
            self.broken = False

        def check_health(self) -> None:
            if self.broken:
                raise RuntimeError("lost the GPU")

        def break_(self) -> None:
            self.broken = True

        def __call__(self) -> str:
            return serve.get_replica_context().replica_id

    handle = serve.run(Fragile.bind(), name="fragile", backend=backend)
    first = handle.remote().result()
    assert serve.status().applications["fragile"].deployments["Fragile"].restarts == 0
    handle.break_.remote().result()

    # Requests keep succeeding; one may wait while the replacement starts (a Ray actor
    # on a loaded machine takes seconds), so the bounds only catch a hang.
    seen = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen.add(handle.remote().result(timeout_s=15))
        if seen - {first}:
            break
        time.sleep(0.02)
    assert seen - {first}, "the unhealthy replica was not replaced"
    new_id = (seen - {first}).pop()
    assert handle.remote().result() == new_id

    dep = serve.status().applications["fragile"].deployments["Fragile"]
    assert dep.restarts >= 1
    assert wait_for(
        lambda: serve.status().applications["fragile"].deployments["Fragile"].running_replicas == 1
    )


@serve.deployment(health_check_period_s=0.1, health_check_timeout_s=2)
class StoreBacked:
    """Healthy while its store is up; cannot be built while it is down."""

    def __init__(self, down: str) -> None:
        self.down = down
        if os.path.exists(down):
            raise RuntimeError("store down 51ab")

    def check_health(self) -> None:
        if os.path.exists(self.down):
            raise RuntimeError("store gone 51ab")

    def __call__(self, *args: Any) -> str:
        return "ok"


def test_replacement_that_fails_is_retried_logged_and_counted(
    tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    import httpx

    from tandem._private.api import http_url

    down = tmp_path / "down"
    handle = serve.run(
        StoreBacked.bind(str(down)), name="store", route_prefix="/store", backend=backend
    )
    assert handle.remote().result(timeout_s=10) == "ok"
    with caplog.at_level("INFO", logger="tandem"):
        down.write_text("")
        status = eventually(
            lambda: serve.status().applications["store"].deployments["StoreBacked"],
            lambda d: d.status == "UNHEALTHY" and d.replica_states.get("FAILED", 0) >= 2,
            timeout_s=30,
        )
        assert status.status == "UNHEALTHY", status
        assert "RuntimeError: store down 51ab" in status.message
        down.unlink()
        healthy = eventually(
            lambda: serve.status().applications["store"].deployments["StoreBacked"],
            lambda d: d.status == "HEALTHY",
            timeout_s=30,
        )
        assert healthy.status == "HEALTHY" and healthy.running_replicas == 1, healthy
    assert handle.remote().result(timeout_s=10) == "ok"
    text = caplog.text
    assert "Replacing replica store#StoreBacked#" in text and "store gone 51ab" in text
    assert "Starting a replica of" in text and "next try in" in text
    assert "recovered" in text
    base = http_url()
    assert base is not None
    metrics = httpx.get(base + "/metrics", timeout=10).text
    restarts = [
        line
        for line in metrics.splitlines()
        if line.startswith("tandem_replica_restarts_total")
        and 'deployment="StoreBacked"' in line
        and 'reason="health_check"' in line
    ]
    assert restarts and float(restarts[0].rsplit(" ", 1)[1]) >= 1, metrics
    failures = [
        line
        for line in metrics.splitlines()
        if line.startswith("tandem_replica_start_failures_total")
        and 'deployment="StoreBacked"' in line
        and 'reason="constructor"' in line
    ]
    assert failures and float(failures[0].rsplit(" ", 1)[1]) >= 2, metrics


@serve.deployment
class SlowToBuild:
    def __init__(self, seconds: float) -> None:
        time.sleep(seconds)

    def __call__(self) -> str:
        return "built"


@pytest.mark.parametrize("backend", ["local", "process"])
def test_slow_deploy_of_one_application_does_not_delay_healing_another(
    tmp_path: Path, backend: str
) -> None:
    import threading

    down = tmp_path / "down"
    healthy = serve.run(
        StoreBacked.bind(str(down)), name="store", route_prefix=None, backend=backend
    )
    first = healthy.remote().result(timeout_s=10)
    assert first == "ok"
    slow = threading.Thread(
        target=lambda: serve.run(
            SlowToBuild.bind(8.0), name="slow", route_prefix=None, backend=backend
        )
    )
    slow.start()
    try:
        assert wait_for(lambda: "slow" in serve.status().applications, 10)
        down.write_text("")  # the health check fails: "store" needs a replacement ...
        restarted = wait_for(
            lambda: serve.status().applications["store"].deployments["StoreBacked"].restarts,
            timeout_s=3.5,
        )
        down.unlink()  # ... which can now start
        assert restarted, "the replica was not replaced while another application deployed"
        back = wait_for(
            lambda: (
                serve.status().applications["store"].deployments["StoreBacked"].status == "HEALTHY"
            ),
            timeout_s=4,
        )
        assert back
        assert serve.status().applications["slow"].status == "DEPLOYING"
    finally:
        slow.join(timeout=60)


# -- route prefixes -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["api", "", "v1/models"])
def test_route_prefix_must_start_with_slash(prefix: str, backend: str) -> None:
    with pytest.raises(ValueError, match="route_prefix"):
        serve.run(_ping.bind(), route_prefix=prefix, backend=backend)
    assert serve.status().applications == {}


def test_route_prefix_none_means_no_http(backend: str) -> None:
    handle = serve.run(_ping.bind(), name="nohttp", route_prefix=None, backend=backend)
    assert handle.remote().result() == "pong"
    assert serve.status().applications["nohttp"].route_prefix is None


def test_two_apps_with_the_same_route_prefix_raise(backend: str) -> None:
    serve.run(_ping.bind(), name="first", route_prefix="/api", backend=backend)
    with pytest.raises(ValueError, match="/api"):
        serve.run(_ping.bind(), name="second", route_prefix="/api", backend=backend)
    assert list(serve.status().applications) == ["first"]
    assert serve.get_app_handle("first").remote().result() == "pong"


def test_same_app_name_keeps_its_route_prefix_on_redeploy(backend: str) -> None:
    serve.run(_ping.bind(), name="app", route_prefix="/api", backend=backend)
    serve.run(_ping.bind(), name="app", route_prefix="/api", backend=backend)
    assert serve.status().applications["app"].route_prefix == "/api"


def test_tandem_and_serve_are_the_same_module() -> None:
    assert serve is tandem
