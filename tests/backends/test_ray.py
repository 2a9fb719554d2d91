"""What only the ``ray`` backend does: replicas are Ray actors.

Covers: ``ray_actor_options`` reach the actor (resources, runtime_env); a
replica no node could hold fails ``run`` at once with a clear error; an actor
killed through Ray is replaced; ``_to_object_ref`` gives the replica's own
ObjectRef, which a Ray task can take (and ``ray.put`` results elsewhere);
``tandem run --backend ray`` starts its own Ray and stops it on Ctrl-C.

The shared behaviours run on this backend through the ``backend`` and
``remote_backend`` fixtures; this file is skipped when Ray is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import tandem as serve
from helpers import wait_for
from tandem.exceptions import (
    DeploymentFailedError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from tandem.handle import DeploymentHandle, DeploymentResponse

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.skipif(
    "ray" not in os.environ.get("TANDEM_TEST_BACKENDS", "ray"),
    reason="the ray backend is not among $TANDEM_TEST_BACKENDS",
)


@pytest.fixture(autouse=True)
def _ray(local_ray: None) -> None:
    """Every test here needs the session's local Ray."""


# --------------------------------------------------------------------------
# actor options
# --------------------------------------------------------------------------


@serve.deployment(
    ray_actor_options={
        "num_cpus": 2,
        "resources": {"tandem_test_slot": 1},
        "runtime_env": {"env_vars": {"TANDEM_TEST_FLAVOUR": "vanilla"}},
    }
)
class Placed:
    def facts(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {
            "resources": context.get_assigned_resources(),
            "flavour": os.environ.get("TANDEM_TEST_FLAVOUR"),
            "actor": context.get_actor_id() is not None,
            "pid": os.getpid(),
        }


def test_ray_actor_options_reach_the_replica_actor() -> None:
    handle = serve.run(Placed.bind(), name="placed", route_prefix=None, backend="ray")
    facts = handle.facts.remote().result(timeout_s=30)
    assert facts["actor"]
    assert facts["pid"] != os.getpid()
    assert facts["resources"].get("CPU") == 2
    assert facts["resources"].get("tandem_test_slot") == 1
    assert facts["flavour"] == "vanilla"
    replica = serve.status().applications["placed"].deployments["Placed"].replicas[0]
    assert replica.pid == facts["pid"]
    assert replica.node == ray.util.get_node_ip_address()


@serve.deployment(ray_actor_options={"num_gpus": 64})
class Greedy:
    def __call__(self) -> str:
        return "never"


def test_a_replica_no_node_can_hold_fails_run_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(DeploymentFailedError) as info:
        serve.run(Greedy.bind(), name="greedy", route_prefix=None, backend="ray")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "Greedy" in message
    assert "GPU=64" in message
    assert "no node of the Ray cluster" in message
    assert "greedy" not in serve.status().applications


# --------------------------------------------------------------------------
# an actor killed through Ray
# --------------------------------------------------------------------------


@serve.deployment(graceful_shutdown_timeout_s=0.2)
class Victim:
    def pid(self) -> int:
        return os.getpid()

    def slow(self) -> str:
        time.sleep(30)
        return "finished"


def test_an_actor_killed_through_ray_is_replaced() -> None:
    handle = serve.run(Victim.bind(), name="victim", route_prefix=None, backend="ray")
    old_pid = handle.pid.remote().result(timeout_s=30)
    in_flight = handle.slow.remote()
    time.sleep(0.3)
    (actor_name,) = [n for n in ray.util.list_named_actors() if str(n).startswith("tandem:")]
    ray.kill(ray.get_actor(actor_name))

    with pytest.raises(ReplicaUnavailableError):
        in_flight.result(timeout_s=10)

    def replaced() -> bool:
        status = serve.status().applications["victim"].deployments["Victim"]
        return status.restarts >= 1 and status.running_replicas == 1

    assert wait_for(replaced, 15), "the killed actor was not replaced"
    deadline = time.monotonic() + 15
    while True:
        try:
            new_pid = handle.pid.remote().result(timeout_s=10)
            break
        except ReplicaUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert new_pid != old_pid


# --------------------------------------------------------------------------
# ObjectRefs
# --------------------------------------------------------------------------


@ray.remote
def _shout(text: str) -> str:
    return text.upper() + "!"


@serve.deployment
class Speaker:
    def __call__(self, word: str) -> str:
        return f"hello {word}"


@serve.deployment
class Forwarder:
    def __init__(self, speaker: DeploymentHandle) -> None:
        self.speaker = speaker

    async def __call__(self, word: str) -> dict[str, Any]:
        response: DeploymentResponse = self.speaker.remote(word)
        ref = await response._to_object_ref()
        shouted = await _shout.remote(ref)
        return {"type": type(ref).__name__, "shouted": shouted, "direct": await response}


def test_to_object_ref_is_the_replica_call_a_ray_task_can_take() -> None:
    handle = serve.run(
        Forwarder.bind(Speaker.bind()), name="refs", route_prefix=None, backend="ray"
    )
    result = handle.remote("world").result(timeout_s=30)
    assert result == {"type": "ObjectRef", "shouted": "HELLO WORLD!", "direct": "hello world"}


def test_to_object_ref_sync_from_the_driver_on_every_backend(backend: str) -> None:
    handle = serve.run(Speaker.bind(), name="sync_refs", route_prefix=None, backend=backend)
    ref = handle.remote("ray")._to_object_ref_sync()
    assert isinstance(ref, ray.ObjectRef)
    assert ray.get(ref, timeout=30) == "hello ray"
    assert ray.get(_shout.remote(ref), timeout=30) == "HELLO RAY!"


def test_to_object_ref_of_a_failed_call_holds_its_error() -> None:
    handle = serve.run(Speaker.bind(), name="bad_refs", route_prefix=None, backend="ray")
    ref = handle.missing_method.remote()._to_object_ref_sync()
    assert isinstance(ref, ray.ObjectRef)  # as in Ray: the error comes with the value
    with pytest.raises(AttributeError, match="missing_method"):
        ray.get(ref, timeout=30)


@serve.deployment
class Sleeper:
    async def __call__(self) -> str:
        await asyncio.sleep(30)
        return "woke"


def test_a_call_cancelled_through_ray_raises_request_cancelled_to_its_caller() -> None:
    handle = serve.run(Sleeper.bind(), name="ray_cancel", route_prefix=None, backend="ray")
    response = handle.remote()
    ref = response._to_object_ref_sync()
    time.sleep(0.3)  # let it start
    ray.cancel(ref)  # not the caller's doing: the caller sees tandem's error, not Ray's
    with pytest.raises(RequestCancelledError, match="cancelled"):
        response.result(timeout_s=10)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=10)


# --------------------------------------------------------------------------
# tandem run --backend ray
# --------------------------------------------------------------------------

APP = """
import os
import tandem as serve

@serve.deployment
class Where:
    def __call__(self, request) -> dict:
        import ray
        with open("data.txt") as data:  # relative: from the working directory
            text = data.read()
        return {
            "pid": os.getpid(),
            "in_actor": ray.get_runtime_context().get_actor_id() is not None,
            "cwd": os.getcwd(),
            "data": text,
            "flavour": os.environ.get("TANDEM_TEST_FLAVOUR"),
            "gcs": ray.get_runtime_context().gcs_address,
        }

app = Where.bind()
"""


def test_tandem_run_on_its_own_ray_serves_and_stops_it(tmp_path: Path) -> None:
    (tmp_path / "where.py").write_text(APP)
    (tmp_path / "data.txt").write_text("shipped")
    env_json = json.dumps({"env_vars": {"TANDEM_TEST_FLAVOUR": "salty"}})
    # These imply --backend ray; "local": a Ray of its own whatever else runs here.
    options = ["--address", "local", "--working-dir", ".", "--runtime-env-json", env_json]
    with _tandem_run(tmp_path, "where:app", *options) as (server, url):
        reply = httpx.get(url, timeout=30)
        assert reply.status_code == 200, reply.text
        facts = reply.json()
        pid = facts["pid"]
        assert pid != server.pid
        assert facts["in_actor"] is True
        # The replica works in Ray's copy of the working dir, with the job's env_vars.
        assert facts["data"] == "shipped"
        assert Path(facts["cwd"]).resolve() != tmp_path.resolve()
        assert facts["flavour"] == "salty"
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
    # Its Ray went with it: the replica actor's process is gone.
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10)


CLUSTER_APP = """
import ray
import tandem as serve


@serve.deployment(ray_actor_options={"resources": {"second_node": 1}})
class Far:
    def __call__(self) -> str:
        return ray.get_runtime_context().get_node_id()


@serve.deployment(ray_actor_options={"resources": {"first_node": 1}})
class Near:
    def __init__(self, far):
        self.far = far

    async def __call__(self, request) -> str:
        return ray.get_runtime_context().get_node_id() + " " + await self.far.remote()


app = Near.bind(Far.bind())
"""


def test_tandem_run_on_a_running_two_node_cluster(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 2, "resources": {"first_node": 1}},
    )
    try:
        cluster.add_node(num_cpus=2, resources={"second_node": 1})
        cluster.wait_for_nodes()
        (tmp_path / "spread.py").write_text(CLUSTER_APP)
        with _tandem_run(tmp_path, "spread:app", "--address", cluster.address) as (
            server,
            url,
        ):
            reply = httpx.get(url, timeout=30)
            assert reply.status_code == 200, reply.text
            near, far = reply.text.split()
            assert near != far  # the two replicas run on two nodes and call each other
            server.send_signal(signal.SIGINT)
            assert server.wait(timeout=60) == 0
    finally:
        cluster.shutdown()


PUT_SCRIPT = """
import ray
import tandem as serve

@serve.deployment
def hello() -> str:
    return "hello"

handle = serve.run(hello.bind(), backend="process", route_prefix=None)
print(ray.get(handle.remote()._to_object_ref_sync(), timeout=60))
serve.shutdown()
"""


@pytest.fixture
def ray_start_record() -> Iterator[Path]:
    """The machine's record of its `ray start` cluster, put back after the test."""
    from ray._private.utils import get_ray_address_file

    record = Path(get_ray_address_file(None))
    before = record.read_text() if record.exists() else None
    yield record
    if before is None:
        record.unlink(missing_ok=True)
    else:
        record.write_text(before)


@pytest.mark.timeout(300)
def test_tandem_run_through_ray_client_then_on_its_own_ray_despite_the_record(
    tmp_path: Path, ray_start_record: Path
) -> None:
    (tmp_path / "where.py").write_text(APP)
    (tmp_path / "data.txt").write_text("shipped")
    gcs_port, client_port = _free_port(), _free_port()
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
        ],
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        assert wait_for(lambda: _accepts(client_port), 60), "the Ray Client server never listened"
        # Through Ray Client, as from outside the cluster, with the code's folder shipped.
        address = f"ray://127.0.0.1:{client_port}"
        # Ray's client server sometimes fails to start its per-client server under
        # load (the forked process dies before it runs, or psutil.ZombieProcess in its
        # proxier; its log is empty): that is Ray's, and the next client gets a new one.
        for attempt in range(3):
            try:
                facts = _serve_where(tmp_path, "--address", address, "--working-dir", ".")
                break
            except AssertionError as failure:
                if "Initialization failure from server" not in str(failure) or attempt == 2:
                    raise
        assert facts["in_actor"] is True
        assert facts["gcs"].endswith(f":{gcs_port}")
        assert facts["data"] == "shipped"
        assert Path(facts["cwd"]).resolve() != tmp_path.resolve()
    finally:  # that Ray's processes are all in the group `ray start` leads
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=10)
    assert wait_for(lambda: not _accepts(gcs_port), 30), "that Ray's GCS outlived it"
    # Gone, that Ray leaves its record behind (which ray.init() alone would follow):
    # without an address tandem starts a Ray of its own,
    ray_start_record.write_text(facts["gcs"])
    assert not _serve_where(tmp_path, "--working-dir", ".")["gcs"].endswith(f":{gcs_port}")
    # as does _to_object_ref on the other backends (ray.put alone would try to join it).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    put = subprocess.run(
        [sys.executable, "-c", PUT_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert put.returncode == 0 and put.stdout.strip() == "hello", put.stdout + put.stderr


def _serve_where(app_dir: Path, *args: str) -> dict[str, Any]:
    """`tandem run where:app ARGS`: what its replica says about itself; then Ctrl-C."""
    with _tandem_run(app_dir, "where:app", *args) as (server, url):
        reply = httpx.get(url, timeout=60)
        assert reply.status_code == 200, reply.text
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
        return dict(reply.json())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def _tandem_run(app_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`tandem run ARGS --port 0` in ``app_dir`` (no $RAY_ADDRESS): the process, its URL."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(app_dir)
    server = subprocess.Popen(
        [sys.executable, "-m", "tandem", "run", *args, "--port", "0"],
        cwd=app_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield server, _served_url(server)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()


def _served_url(server: subprocess.Popen[str]) -> str:
    """The URL `tandem run` says it serves at (it logs one line with it)."""
    assert server.stdout is not None
    seen = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "serving" in line and "http://" in line:
            return "http://" + line.split("http://", 1)[1].split()[0]
    raise AssertionError("tandem run never said where it serves:\n" + "".join(seen))


EXITING_DRIVER = """
import os, sys
import tandem as serve  # before Ray: Ray's exit handler is then registered after tandem's
import ray
ray.init(address=sys.argv[1])

@serve.deployment
class Pid:
    def __call__(self) -> int:
        return os.getpid()

print(serve.run(Pid.bind(), backend="ray", route_prefix=None).remote().result(), flush=True)
# No tandem.shutdown(): the interpreter's exit must stop the replicas cleanly.
"""


def test_a_driver_that_exits_without_shutdown_stops_its_replicas_cleanly(tmp_path: Path) -> None:
    script = tmp_path / "exiting.py"
    script.write_text(EXITING_DRIVER)
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, str(script), address], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    pid = int(done.stdout.split()[-1])
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10), "the replica outlived it"
