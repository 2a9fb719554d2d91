"""Replicas in other processes: the ``process`` backend, and the ``ray`` backend where
its semantics match (tests taking ``remote_backend``).

Covers: replicas that die (kill -9, segfault, ``os._exit``) are noticed and
replaced while their in-flight requests fail promptly; failing health checks
replace replicas; constructors that raise (at once, or only on restart);
rolling redeploys without failed requests; no replica outlives its driver;
``max_queued_requests`` at the caller (handle and HTTP 503) and
``max_ongoing_requests`` at the replica with several caller processes; GPU
and CPU accounting; status() facts about replica processes; classes defined
in a function and large payloads across processes; streaming across processes.

Every test names its backend explicitly and bounds its waits with deadlines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import tandem as serve
from helpers import eventually, wait_for
from tandem._private.api import http_url
from tandem.exceptions import (
    BackPressureError,
    DeploymentFailedError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    TandemError,
)
from tandem.handle import DeploymentHandle

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; the process backend targets Linux"
)

WORKER_MODULE = b"tandem._private.backends.process.worker"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (zombies count as gone)."""
    state = _proc_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def _worker_children() -> list[int]:
    """Live (non-zombie) children of this test process that run a tandem replica."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        state = _proc_state(pid)
        if state is None or state[1] != me or state[0] in ("Z", "X"):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if WORKER_MODULE in cmdline:
            found.append(pid)
    return found


def _deployment_status(app: str, name: str) -> Any:
    return serve.status().applications[app].deployments[name]


def _status_pids(app: str, name: str) -> list[int]:
    return [r.pid for r in _deployment_status(app, name).replicas]


def _call_until_ok(fn: Callable[[], Any], timeout: float) -> Any:
    """Call ``fn`` until it stops raising ReplicaUnavailableError (a replica is being replaced)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except ReplicaUnavailableError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _no_worker_children(timeout: float = 3.0) -> list[int]:
    """Wait until no replica process of this driver is alive; returns those still alive."""
    wait_for(lambda: not _worker_children(), timeout)
    return _worker_children()


def _leftover_replicas(backend: str, timeout: float = 3.0) -> list[Any]:
    """Wait until no replica of this driver is alive; returns those still alive.

    Process backend: replica processes that are children of this test. Ray backend:
    live replica actors (tandem names them ``tandem:<replica id>``).
    """
    if backend == "process":
        return _no_worker_children(timeout)
    import ray

    def alive() -> list[str]:
        return [n for n in ray.util.list_named_actors() if str(n).startswith("tandem:")]

    wait_for(lambda: not alive(), timeout)
    return alive()


def _reap_leftover_replicas() -> None:
    """Kill and reap replica processes tandem lost track of (after a bug), so that their
    unreaped Popen objects do not raise ResourceWarnings in later tests."""
    for pid in _worker_children():
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _pids_until(handle: DeploymentHandle, count: int, timeout: float = 5.0) -> set[int]:
    """Distinct replica pids seen by calling ``handle.pid`` until ``count`` are seen."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        seen.add(handle.pid.remote().result(timeout_s=5))
    return seen


# --------------------------------------------------------------------------
# replicas that die
# --------------------------------------------------------------------------


@serve.deployment(graceful_shutdown_timeout_s=0.2)
class Fragile:
    def pid(self) -> int:
        return os.getpid()

    def slow(self, seconds: float) -> str:
        time.sleep(seconds)
        return "finished"

    def die(self, how: str) -> None:
        if how == "segfault":
            import ctypes
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file to write
            ctypes.string_at(0)
        os._exit(1)


@pytest.mark.parametrize("how", ["sigkill", "segfault", "os_exit"])
def test_dead_replica_is_replaced_and_in_flight_requests_fail(
    how: str, remote_backend: str
) -> None:
    handle = serve.run(Fragile.bind(), name="fragile", route_prefix=None, backend=remote_backend)
    old_pid = handle.pid.remote().result(timeout_s=10)
    assert old_pid != os.getpid()
    assert _status_pids("fragile", "Fragile") == [old_pid]
    assert _deployment_status("fragile", "Fragile").restarts == 0

    in_flight = handle.slow.remote(30)
    time.sleep(0.3)  # let it reach the replica
    started = time.monotonic()
    if how == "sigkill":
        os.kill(old_pid, signal.SIGKILL)
        killer = None
    else:
        killer = handle.die.remote("segfault" if how == "segfault" else "exit")

    # Requests in flight on the dead replica fail promptly, with ReplicaUnavailableError.
    with pytest.raises(ReplicaUnavailableError):
        in_flight.result(timeout_s=5)
    assert time.monotonic() - started < 2.0
    if killer is not None:
        with pytest.raises(ReplicaUnavailableError):
            killer.result(timeout_s=5)

    # The death is noticed within a second (the replacement counts as a restart).
    noticed = wait_for(lambda: _deployment_status("fragile", "Fragile").restarts >= 1, 3.0)
    assert noticed, "the dead replica was not noticed"
    assert time.monotonic() - started < 1.0

    # New requests succeed once the replacement is up, in a new process.
    new_pid = _call_until_ok(lambda: handle.pid.remote().result(timeout_s=5), timeout=5.0)
    assert new_pid not in (old_pid, os.getpid())
    status = _deployment_status("fragile", "Fragile")
    assert status.restarts == 1
    assert [r.pid for r in status.replicas] == [new_pid]
    assert [r.state for r in status.replicas] == ["RUNNING"]
    assert status.status == "HEALTHY"
    assert not _alive(old_pid)
    assert handle.slow.remote(0).result(timeout_s=5) == "finished"


@serve.deployment(
    health_check_period_s=0.2, health_check_timeout_s=0.5, graceful_shutdown_timeout_s=0.2
)
class Sickly:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sick = False

    def pid(self) -> int:
        return os.getpid()

    def fall_ill(self) -> None:
        self.sick = True

    async def check_health(self) -> None:
        if not self.sick:
            return
        if self.mode == "raise":
            raise RuntimeError("not feeling well")
        await asyncio.sleep(10)  # longer than health_check_timeout_s


@pytest.mark.parametrize("mode", ["raise", "timeout"])
def test_failing_health_check_replaces_the_replica(mode: str, remote_backend: str) -> None:
    handle = serve.run(Sickly.bind(mode), name="sickly", route_prefix=None, backend=remote_backend)
    old_pid = handle.pid.remote().result(timeout_s=10)
    time.sleep(0.5)  # several healthy checks: nothing is replaced
    assert _deployment_status("sickly", "Sickly").restarts == 0

    handle.fall_ill.remote().result(timeout_s=5)

    def replaced() -> int | None:
        pids = _status_pids("sickly", "Sickly")
        return pids[0] if pids and pids[0] != old_pid else None

    new_pid = wait_for(replaced, 5.0)
    assert new_pid, "the unhealthy replica was not replaced"
    assert _call_until_ok(lambda: handle.pid.remote().result(timeout_s=5), 5.0) == new_pid
    assert wait_for(lambda: not _alive(old_pid), 3.0), "the unhealthy replica still runs"
    time.sleep(0.6)  # the replacement is healthy: it stays
    status = _deployment_status("sickly", "Sickly")
    assert status.restarts == 1
    assert _status_pids("sickly", "Sickly") == [new_pid]
    assert status.status == "HEALTHY"


@serve.deployment(
    health_check_period_s=0.2, health_check_timeout_s=0.5, graceful_shutdown_timeout_s=0.2
)
class Collector:
    def collect(self) -> int:
        gc.collect()  # what any allocation-heavy replica eventually does on its own
        return os.getpid()


def test_replica_survives_garbage_collection(remote_backend: str) -> None:
    handle = serve.run(Collector.bind(), name="gc", route_prefix=None, backend=remote_backend)
    pid = handle.collect.remote().result(timeout_s=10)
    time.sleep(1.2)  # several health checks
    status = _deployment_status("gc", "Collector")
    assert status.restarts == 0, status.message
    assert _status_pids("gc", "Collector") == [pid]
    assert handle.collect.remote().result(timeout_s=5) == pid
    started = time.monotonic()
    serve.shutdown()
    assert time.monotonic() - started < 2.0
    # A process is gone when shutdown() returns; a Ray actor's process a moment later.
    assert wait_for(lambda: not _alive(pid), 0 if remote_backend == "process" else 5.0)


# --------------------------------------------------------------------------
# constructors that raise
# --------------------------------------------------------------------------


@serve.deployment
class Leaf:
    def __call__(self) -> str:
        return "leaf"


@serve.deployment(num_replicas=2)
class ExplodingParent:
    def __init__(self, leaf: DeploymentHandle, which: str) -> None:
        if which == "all" or serve.get_replica_context().rank.rank == 0:
            raise ValueError("constructor exploded 7f3a")
        time.sleep(0.5)  # this replica is still starting when its sibling fails


@pytest.mark.parametrize(
    "which",
    ["all", "rank0"],
    ids=["every-replica-raises", "one-replica-raises"],
)
def test_constructor_that_raises_fails_run_and_leaves_no_process(
    which: str, remote_backend: str
) -> None:
    started = time.monotonic()
    try:
        with pytest.raises(DeploymentFailedError) as info:
            serve.run(
                ExplodingParent.bind(Leaf.bind(), which),
                name="exploding",
                route_prefix=None,
                backend=remote_backend,
            )
        assert time.monotonic() - started < 15
        message = str(info.value)
        assert "ExplodingParent" in message
        assert "ValueError" in message
        assert "constructor exploded 7f3a" in message
        assert "Traceback" in message
        assert "__init__" in message  # the frame of the original traceback
        assert "exploding" not in serve.status().applications
        time.sleep(0.7)  # a replica that was still starting has had time to finish
        leftover = _leftover_replicas(remote_backend)
        assert leftover == [], f"replicas left behind: {leftover}"
    finally:
        _reap_leftover_replicas()


@serve.deployment(graceful_shutdown_timeout_s=0.2)
class Flaky:
    """Constructs unless its flag file exists (its model store is down, say)."""

    def __init__(self, down: str) -> None:
        if os.path.exists(down):
            raise RuntimeError("model store unreachable 9c1e")

    def pid(self) -> int:
        return os.getpid()


def test_constructor_failing_after_a_healthy_start_is_retried_until_it_recovers(
    tmp_path: Path, remote_backend: str
) -> None:
    down = tmp_path / "down"
    handle = serve.run(
        Flaky.bind(str(down)), name="flaky", route_prefix=None, backend=remote_backend
    )
    pid = handle.pid.remote().result(timeout_s=10)
    down.write_text("")
    os.kill(pid, signal.SIGKILL)

    # It keeps trying, with backoff, and says so in one line: what is missing, the
    # last error, the next try.
    status = eventually(
        lambda: _deployment_status("flaky", "Flaky"),
        lambda s: s.status == "UNHEALTHY" and "failed 2 time(s)" in s.message,
        timeout_s=30,
    )
    assert status.status == "UNHEALTHY", status
    assert "0 of 1 replicas running" in status.message
    assert "RuntimeError: model store unreachable 9c1e" in status.message
    assert "next try in" in status.message or "trying again now" in status.message
    assert "Traceback" not in status.message
    assert status.replica_states.get("FAILED", 0) >= 2
    assert serve.status().applications["flaky"].status == "UNHEALTHY"
    # Callers are answered at once instead of waiting for a replica.
    with pytest.raises(DeploymentUnavailableError, match="model store unreachable 9c1e"):
        handle.pid.remote().result(timeout_s=10)

    down.unlink()  # the store is back: the deployment recovers by itself
    healthy = eventually(
        lambda: _deployment_status("flaky", "Flaky"),
        lambda s: s.status == "HEALTHY" and s.running_replicas == 1,
        timeout_s=30,
    )
    assert healthy.status == "HEALTHY" and healthy.message == "", healthy
    assert handle.pid.remote().result(timeout_s=10) != pid
    assert serve.status().applications["flaky"].status == "RUNNING"


EMFILE_DRIVER = """
import os
import resource
import signal
import time

import tandem as serve


@serve.deployment(num_replicas=2)
class Pid:
    def __call__(self) -> int:
        return os.getpid()


def status():
    return serve.status().applications["fd"].deployments["Pid"]


resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
serve.run(Pid.bind(), name="fd", route_prefix=None, backend="process")
victim = status().replicas[0].pid
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
os.kill(victim, signal.SIGKILL)
failed = None
deadline = time.monotonic() + 20
while time.monotonic() < deadline and failed is None:
    current = status()
    if current.replica_states.get("FAILED"):
        failed = (current.status, current.running_replicas, current.message)
    time.sleep(0.05)
for fd in held:
    os.close(fd)
deadline = time.monotonic() + 40
while time.monotonic() < deadline:
    current = status()
    if current.status == "HEALTHY" and current.running_replicas == 2:
        break
    time.sleep(0.1)
print("FAILED", failed)
pids = [r.pid for r in current.replicas]
print("FINAL", current.status, current.running_replicas, victim in pids)
serve.shutdown()
"""


def test_replacement_that_fails_for_lack_of_file_descriptors_recovers(tmp_path: Path) -> None:
    """The driver runs out of file descriptors as a replica dies: its replacement
    fails (EMFILE), the status says so, and once descriptors are back it recovers."""
    script = tmp_path / "driver.py"
    script.write_text(EMFILE_DRIVER)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failed_line, final_line = result.stdout.strip().splitlines()[-2:]
    assert "UNHEALTHY" in failed_line and "Too many open files" in failed_line, result.stdout
    assert "1 of 2 replicas running" in failed_line
    assert final_line == "FINAL HEALTHY 2 False", (final_line, result.stderr[-3000:])


# --------------------------------------------------------------------------
# redeploys
# --------------------------------------------------------------------------


@serve.deployment(num_replicas=2, graceful_shutdown_timeout_s=5)
class Versioned:
    def __init__(self, version: str) -> None:
        self.version = version

    def get(self) -> str:
        time.sleep(0.02)
        return self.version

    def pid(self) -> int:
        return os.getpid()


def test_redeploy_with_new_args_fails_no_request(remote_backend: str) -> None:
    handle = serve.run(
        Versioned.bind("v1"), name="versioned", route_prefix=None, backend=remote_backend
    )
    assert handle.get.remote().result(timeout_s=10) == "v1"
    old_pids = _status_pids("versioned", "Versioned")

    results: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            try:
                results.append(handle.get.remote().result(timeout_s=10))
            except BaseException as exc:  # noqa: BLE001 - every failure is reported
                errors.append(exc)

    threads = [threading.Thread(target=keep_calling) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        serve.run(Versioned.bind("v2"), name="versioned", route_prefix=None, backend=remote_backend)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert set(results) == {"v1", "v2"}
    assert [handle.get.remote().result(timeout_s=5) for _ in range(10)] == ["v2"] * 10
    new_pids = _status_pids("versioned", "Versioned")
    assert len(new_pids) == 2 and not set(new_pids) & set(old_pids)
    assert wait_for(lambda: not any(_alive(p) for p in old_pids), 8.0), "old replicas still run"


# --------------------------------------------------------------------------
# the driver's exit
# --------------------------------------------------------------------------

DRIVER = """
import json, os, sys, time
import tandem as serve

MARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "destroyed")

@serve.deployment(num_replicas=2)
class Worker:
    def pid(self):
        return os.getpid()

    def __del__(self):
        os.makedirs(MARKS, exist_ok=True)
        open(os.path.join(MARKS, str(os.getpid())), "w").close()

serve.run(Worker.bind(), name="orphans", route_prefix=None, backend="process")
status = serve.status().applications["orphans"].deployments["Worker"]
print(json.dumps([r.pid for r in status.replicas]), flush=True)
how = sys.argv[1]
if how == "shutdown":
    serve.shutdown()
    sys.exit(0)
if how == "exit":
    sys.exit(0)
if how == "os_exit":
    os._exit(0)
time.sleep(60)
"""


def _start_driver(tmp_path: Path, how: str) -> tuple[subprocess.Popen[bytes], list[int]]:
    """Run the driver script; return it and the pids of its two replicas."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        driver = subprocess.Popen(
            [sys.executable, str(script), how], cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr
        )
    assert driver.stdout is not None
    ready, _, _ = select.select([driver.stdout], [], [], 30)
    line = driver.stdout.readline() if ready else b""
    if not line:
        _stop_driver(driver, [])
        pytest.fail("the driver printed no pids: " + (tmp_path / "stderr.txt").read_text())
    pids = json.loads(line)
    assert len(pids) == 2 and all(isinstance(p, int) for p in pids)
    return driver, pids


def _stop_driver(driver: subprocess.Popen[bytes], pids: list[int]) -> None:
    if driver.poll() is None:
        driver.kill()
    driver.wait()
    for pid in pids:  # cleanup after a failure: the replicas this test's driver started
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert driver.stdout is not None
    driver.stdout.close()


@pytest.mark.parametrize("how", ["kill9", "exit", "os_exit"])
def test_no_replica_outlives_its_driver(tmp_path: Path, how: str) -> None:
    driver, pids = _start_driver(tmp_path, how)
    try:
        if how == "kill9":
            assert all(_alive(p) for p in pids)
            driver.kill()
        driver.wait(timeout=20)
        gone = wait_for(lambda: not any(_alive(p) for p in pids), 3.0)
        assert gone, f"replicas outlived the driver ({how}): {[p for p in pids if _alive(p)]}"
    finally:
        _stop_driver(driver, pids)


@pytest.mark.parametrize(
    "how",
    [
        "shutdown",
        "exit",
    ],
)
def test_driver_exit_stops_replicas_gracefully(tmp_path: Path, how: str) -> None:
    driver, pids = _start_driver(tmp_path, how)
    try:
        assert driver.wait(timeout=20) == 0
        assert wait_for(lambda: not any(_alive(p) for p in pids), 3.0)
        errors = (tmp_path / "stderr.txt").read_text()
        assert "Traceback" not in errors, errors
        marks = tmp_path / "destroyed"
        destroyed = sorted(int(p.name) for p in marks.iterdir()) if marks.exists() else []
        assert destroyed == sorted(pids), "__del__ did not run in every replica"
    finally:
        _stop_driver(driver, pids)


# --------------------------------------------------------------------------
# request limits
# --------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Narrow:
    def slow(self, seconds: float) -> str:
        time.sleep(seconds)
        return "ok"

    def __call__(self, request: Any) -> str:
        time.sleep(0.6)
        return "ok"


def test_max_queued_requests_rejects_extra_callers_with_backpressure(remote_backend: str) -> None:
    handle = serve.run(Narrow.bind(), name="narrow", route_prefix="/narrow", backend=remote_backend)
    assert handle.slow.remote(0).result(timeout_s=10) == "ok"

    # Through a handle: one runs, one waits, the others are refused at once.
    started = time.monotonic()
    responses = [handle.slow.remote(0.6) for _ in range(4)]
    with pytest.raises(BackPressureError):
        responses[-1].result(timeout_s=5)
    assert time.monotonic() - started < 0.5
    outcomes = []
    for response in responses:
        try:
            outcomes.append(response.result(timeout_s=10))
        except BackPressureError:
            outcomes.append("backpressure")
    assert sorted(outcomes) == ["backpressure", "backpressure", "ok", "ok"]

    # Through HTTP: refused requests are 503s.
    base = http_url()
    assert base is not None

    async def many() -> list[int]:
        async with httpx.AsyncClient(timeout=15) as client:
            replies = await asyncio.gather(*(client.get(f"{base}/narrow") for _ in range(4)))
        return [r.status_code for r in replies]

    codes = asyncio.run(many())
    assert sorted(codes) == [200, 200, 503, 503], codes
    with httpx.Client(timeout=15) as client:
        assert client.get(f"{base}/narrow").status_code == 200  # it serves on afterwards


@serve.deployment(max_ongoing_requests=2)
class Guarded:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.calls = 0

    def work(self) -> int:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
        time.sleep(0.15)
        with self.lock:
            self.now -= 1
        return os.getpid()

    def counts(self) -> dict[str, int]:
        return {"most": self.most, "calls": self.calls}


@serve.deployment
class Caller:
    def __init__(self, target: DeploymentHandle) -> None:
        self.target = target

    async def hit(self, n: int) -> list[int]:
        return list(await asyncio.gather(*(self.target.work.remote() for _ in range(n))))

    def pid(self) -> int:
        return os.getpid()


@serve.deployment
class FanOut:
    def __init__(self, a: DeploymentHandle, b: DeploymentHandle) -> None:
        self.a = a
        self.b = b

    async def go(self, n: int) -> dict[str, Any]:
        a, b = await asyncio.gather(self.a.hit.remote(n), self.b.hit.remote(n))
        pids = await asyncio.gather(self.a.pid.remote(), self.b.pid.remote())
        return {"answers": len(a) + len(b), "target_pids": sorted(set(a + b)), "callers": pids}


def test_max_ongoing_requests_holds_at_the_replica_with_several_callers(
    remote_backend: str,
) -> None:
    target = Guarded.bind()
    app = FanOut.bind(
        Caller.options(name="CallerA").bind(target), Caller.options(name="CallerB").bind(target)
    )
    handle = serve.run(app, name="strict", route_prefix=None, backend=remote_backend)
    direct = serve.get_deployment_handle("Guarded", app_name="strict")

    fanned = handle.go.remote(6)
    from_driver = [direct.work.remote() for _ in range(4)]
    result = fanned.result(timeout_s=30)
    driver_pids = {r.result(timeout_s=30) for r in from_driver}

    assert result["answers"] == 12
    assert len(set(result["callers"])) == 2  # two caller processes
    target_pid = _status_pids("strict", "Guarded")[0]
    assert set(result["target_pids"]) == driver_pids == {target_pid}
    counts = direct.counts.remote().result(timeout_s=5)
    assert counts["calls"] == 16
    assert counts["most"] == 2, counts


# --------------------------------------------------------------------------
# resources
# --------------------------------------------------------------------------


@serve.deployment(num_replicas=2, ray_actor_options={"num_gpus": 1})
class OnGPU:
    def pid(self) -> int:
        return os.getpid()

    def devices(self) -> tuple[int, str | None]:
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


def _devices_by_pid(handle: DeploymentHandle, count: int) -> dict[int, str | None]:
    seen: dict[int, str | None] = {}
    deadline = time.monotonic() + 5
    while len(seen) < count and time.monotonic() < deadline:
        pid, devices = handle.devices.remote().result(timeout_s=5)
        seen[pid] = devices
    return seen


def test_gpus_are_given_out_one_per_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_NUM_GPUS", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    handle = serve.run(OnGPU.bind(), name="gpu", route_prefix=None, backend="process")
    devices = _devices_by_pid(handle, 2)
    assert sorted(devices.values()) == ["0", "1"], devices

    # A replacement takes the device its dead predecessor held.
    victim, freed = next(iter(devices.items()))
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        pids = _status_pids("gpu", "OnGPU")
        return len(pids) == 2 and victim not in pids

    assert wait_for(replaced, 5.0)
    after = _call_until_ok(lambda: _devices_by_pid(handle, 2), 5.0)
    assert victim not in after
    assert sorted(after.values()) == ["0", "1"], after


def test_more_gpus_than_exist_fails_run_promptly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_NUM_GPUS", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    started = time.monotonic()
    try:
        with pytest.raises(TandemError, match="GPU"):
            serve.run(
                OnGPU.options(num_replicas=3).bind(),
                name="gpu",
                route_prefix=None,
                backend="process",
            )
        assert time.monotonic() - started < 10
        assert _no_worker_children() == []
        # What the failed attempt claimed is free again.
        handle = serve.run(OnGPU.bind(), name="gpu", route_prefix=None, backend="process")
        assert sorted(_devices_by_pid(handle, 2).values()) == ["0", "1"]
    finally:
        _reap_leftover_replicas()


@pytest.mark.parametrize(
    "replicas, cpus",
    [(3, (os.cpu_count() or 1) / 2), (1, 64)],
    ids=["3-replicas-of-half-the-cores", "64-cpus"],
)
def test_cpu_oversubscription_warns_but_serves(
    caplog: pytest.LogCaptureFixture, replicas: int, cpus: float
) -> None:
    caplog.set_level(logging.WARNING, logger="tandem")
    handle = serve.run(
        Fragile.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus}).bind(),
        name="cpus",
        route_prefix=None,
        backend="process",
    )
    assert len(_pids_until(handle, replicas)) == replicas
    warnings = [
        r
        for r in caplog.records
        if r.name == "tandem" and r.levelno == logging.WARNING and "CPU" in r.getMessage()
    ]
    assert warnings, [r.getMessage() for r in caplog.records]
    assert "Fragile" in warnings[0].getMessage()


# --------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------


def test_status_shows_replica_processes(remote_backend: str) -> None:
    handle = serve.run(
        Fragile.options(num_replicas=2).bind(),
        name="shown",
        route_prefix=None,
        backend=remote_backend,
    )
    status = serve.status()
    assert status.backend == remote_backend
    app = status.applications["shown"]
    assert app.status == "RUNNING"
    deployment = app.deployments["Fragile"]
    assert deployment.status == "HEALTHY"
    assert deployment.target_replicas == 2
    assert deployment.running_replicas == 2
    assert deployment.restarts == 0
    assert [r.state for r in deployment.replicas] == ["RUNNING", "RUNNING"]
    assert sorted(r.rank for r in deployment.replicas) == [0, 1]
    pids = [r.pid for r in deployment.replicas]
    assert all(isinstance(p, int) and p != os.getpid() for p in pids)
    assert len(set(pids)) == 2
    assert all(_alive(p) for p in pids)
    assert _pids_until(handle, 2) == set(pids)
    if remote_backend == "process":
        assert set(pids) <= set(_worker_children())
    # As JSON, too.
    as_dict = status.to_dict()
    listed = as_dict["applications"]["shown"]["deployments"]["Fragile"]["replicas"]
    assert sorted(r["pid"] for r in listed) == sorted(pids)


# --------------------------------------------------------------------------
# what travels between processes
# --------------------------------------------------------------------------


def test_local_classes_and_large_payloads_cross_processes(remote_backend: str) -> None:
    @dataclasses.dataclass
    class Parcel:
        data: bytes
        label: str

    @serve.deployment
    class Inner:
        def echo(self, value: Any) -> Any:
            return value

        def wrap(self, parcel: Parcel) -> Parcel:
            return Parcel(parcel.data[::-1], parcel.label + "!")

        def pid(self) -> int:
            return os.getpid()

    @serve.deployment
    class Outer:
        def __init__(self, inner: DeploymentHandle) -> None:
            self.inner = inner

        async def echo(self, value: Any) -> Any:
            return await self.inner.echo.remote(value)

        async def wrap(self, parcel: Parcel) -> Parcel:
            return await self.inner.wrap.remote(parcel)

        async def pids(self) -> list[int]:
            return [os.getpid(), await self.inner.pid.remote()]

    handle = serve.run(
        Outer.bind(Inner.bind()), name="local", route_prefix=None, backend=remote_backend
    )
    pids = handle.pids.remote().result(timeout_s=10)
    assert len(set(pids + [os.getpid()])) == 3  # driver, Outer and Inner: three processes

    payload = os.urandom(10 * 2**20)
    assert handle.echo.remote(payload).result(timeout_s=30) == payload

    parcel = handle.wrap.remote(Parcel(payload, "box")).result(timeout_s=30)
    assert parcel.label == "box!"
    assert parcel.data == payload[::-1]

    try:
        import numpy as np
    except ImportError:
        return
    array = np.arange(10 * 2**20 // 8, dtype=np.float64).reshape(1024, -1)
    back = handle.echo.remote(array).result(timeout_s=30)
    assert isinstance(back, np.ndarray)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert np.array_equal(back, array)


# --------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------


@serve.deployment(graceful_shutdown_timeout_s=0.2)
class Source:
    def __init__(self) -> None:
        self.produced = {"sync": 0, "async": 0}
        self.closed = {"sync": 0, "async": 0}

    def paced(self, n: int, delay: float) -> Iterator[int]:
        for i in range(n):
            if i:
                time.sleep(delay)
            yield i

    def endless_sync(self) -> Iterator[int]:
        try:
            for i in range(10_000):
                self.produced["sync"] += 1
                yield i
                time.sleep(0.05)
        finally:
            self.closed["sync"] += 1

    async def endless_async(self) -> Any:
        try:
            for i in range(10_000):
                self.produced["async"] += 1
                yield i
                await asyncio.sleep(0.05)
        finally:
            self.closed["async"] += 1

    def state(self) -> dict[str, dict[str, int]]:
        return {"produced": dict(self.produced), "closed": dict(self.closed)}


@serve.deployment(graceful_shutdown_timeout_s=0.2)
class Relay:
    def __init__(self, source: DeploymentHandle) -> None:
        self.source = source

    async def paced(self, n: int, delay: float) -> Any:
        async for item in self.source.options(method_name="paced", stream=True).remote(n, delay):
            yield item

    async def endless_async(self) -> Any:
        async for item in self.source.options(method_name="endless_async", stream=True).remote():
            yield item


def _arrival_times(handle: DeploymentHandle, method: str) -> list[float]:
    started = time.monotonic()
    times = []
    items = []
    for item in handle.options(method_name=method, stream=True).remote(4, 0.3):
        items.append(item)
        times.append(time.monotonic() - started)
    assert items == [0, 1, 2, 3]
    return times


def test_streams_cross_processes_item_by_item_and_stop_when_closed(remote_backend: str) -> None:
    relay = serve.run(
        Relay.bind(Source.bind()), name="streams", route_prefix=None, backend=remote_backend
    )
    source = serve.get_deployment_handle("Source", app_name="streams")

    # Items arrive as they are yielded: directly, and through a second replica process.
    for handle in (source, relay):
        times = _arrival_times(handle, "paced")
        assert times[-1] - times[0] >= 0.7, times
        assert times[1] - times[0] >= 0.2, times

    # Closing early stops the generator in the replica process.
    cases = [
        (source, "endless_sync", "sync", 1),
        (source, "endless_async", "async", 1),
        (relay, "endless_async", "async", 2),  # the relay's stream, closed in the driver
    ]
    for handle, method, kind, number in cases:
        stream = handle.options(method_name=method, stream=True).remote()
        assert [next(stream), next(stream)] == [0, 1]
        stream.close()

        def closed(kind: str = kind, number: int = number) -> bool:
            return source.state.remote().result(timeout_s=5)["closed"][kind] == number

        assert wait_for(closed, 3.0, interval_s=0.05), (method, source.state.remote().result())
        produced = source.state.remote().result(timeout_s=5)["produced"][kind]
        time.sleep(0.3)
        assert source.state.remote().result(timeout_s=5)["produced"][kind] == produced
