"""What the test modules share: waiting helpers that poll until a condition holds,
with a deadline, instead of sleeping a fixed time that a loaded machine may not
honour; and ``tandem`` commands run in a subprocess as a user runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float = 5.0, interval_s: float = 0.02) -> T:
    """Call ``predicate`` until it returns something truthy or ``timeout_s`` passes;
    return its last value (falsy on timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def eventually(
    read: Callable[[], T],
    until: Callable[[T], Any],
    timeout_s: float = 5.0,
    interval_s: float = 0.05,
) -> T:
    """``read()`` until ``until`` holds for its value or ``timeout_s`` passes; return the
    last value read, for the caller's assertion (and its message) to check."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if until(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


# -- a `tandem` command in a subprocess, as a user runs it ----------------------------

TANDEM_MODULE = [sys.executable, "-m", "tandem"]
TANDEM_SCRIPT = [str(Path(sys.executable).with_name("tandem"))]

GREETER = """
import asyncio
import os

import tandem as serve
from starlette.requests import Request
from tandem.handle import DeploymentHandle


@serve.deployment
class Responder:
    def say_hello(self, name: str) -> str:
        return f"Hola {name}"


@serve.deployment
class Front:
    def __init__(self, responder: DeploymentHandle) -> None:
        self.responder = responder

    async def __call__(self, request: Request) -> str:
        if request.query_params.get("sleep"):
            await asyncio.sleep(float(request.query_params["sleep"]))
            return "slept"
        body = await request.json()
        return await self.responder.say_hello.remote(body["name"])


app = Front.bind(Responder.bind())


@serve.deployment
class Greeter:
    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.message = "unconfigured"
        self.instance = os.urandom(4).hex()

    def reconfigure(self, config: dict) -> None:
        self.message = config["message"]

    async def __call__(self, request: Request) -> str:
        if request.query_params.get("sleep"):
            await asyncio.sleep(float(request.query_params["sleep"]))
        if request.query_params.get("instance"):
            return self.instance
        return f"{self.prefix}{self.message}"


greeter = Greeter.bind()
"""


def default_ctrl_c() -> None:
    """A child's Ctrl-C as in a terminal (pass as ``preexec_fn``): a process started with
    SIGINT ignored keeps ignoring it, and test workers may ignore it (Ray's do)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env() -> dict[str, str]:
    return {**os.environ, "TANDEM_BACKEND": "local", "PYTHONUNBUFFERED": "1"}


class Server:
    """A ``tandem run`` process in its own process group (as a shell job would be)."""

    def __init__(self, args: list[str], cwd: Path, log: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tandem run exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/-/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"tandem run did not answer /-/healthz within {timeout_s} s:\n{self.output()}")

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=kwargs.pop("timeout", 10), **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=kwargs.pop("timeout", 10), **kwargs)

    def ctrl_c(self) -> None:
        """What a terminal's Ctrl-C does: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait_exit(self, timeout_s: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"tandem run did not exit within {timeout_s} s:\n{self.output()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self._log.close()


def tandem(
    *args: str, cwd: Path, script: bool = False, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run one short ``tandem`` command and return what it printed."""
    command = TANDEM_SCRIPT if script else TANDEM_MODULE
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
    )


def assert_clear_failure(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Non-zero exit, a message on stderr that names the problem, and no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


class Servers:
    """The ``tandem run`` servers one test starts, each ready when returned; call
    :meth:`kill_all` at the end to stop any left running."""

    def __init__(self, cwd: Path, log_dir: Path) -> None:
        self._cwd = cwd
        self._log_dir = log_dir
        self._servers: list[Server] = []

    def start(self, command: list[str], port: int) -> Server:
        log = self._log_dir / f"server{len(self._servers)}.log"
        server = Server(command, self._cwd, log, port)
        self._servers.append(server)
        server.wait_ready()
        return server

    def kill_all(self) -> None:
        for server in self._servers:
            server.kill()


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text, ``name{labels} value`` lines -> {(name, sorted label pairs): value}."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = []
        for part in rest.rstrip("}").split('",'):
            if "=" in part:
                key, _, raw = part.partition("=")
                labels.append((key.strip(","), raw.strip('"')))
        samples[(name, tuple(sorted(labels)))] = float(value)
    return samples


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items())
    )
