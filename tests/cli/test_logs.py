"""``tandem logs``: a running server's replica log lines, read through its control endpoint."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    TANDEM_MODULE,
    Server,
    Servers,
    assert_clear_failure,
    default_ctrl_c,
    env,
    free_port,
    tandem,
)

ECHO = """
import logging

import tandem as serve

log = logging.getLogger("tandem.replica")


@serve.deployment
class Echo:
    def __call__(self, request) -> str:
        word = request.query_params.get("word", "")
        log.info("echo %s", word)
        if word == "boom":
            raise ValueError("cannot echo boom")
        return word


app = Echo.bind()
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "echo.py").write_text(ECHO)
    servers = Servers(folder, tmp_path)
    port = free_port()
    yield servers.start([*TANDEM_MODULE, "run", "echo:app", "--port", str(port)], port)
    servers.kill_all()


def test_logs_prints_lines_filters_by_request_and_follows(server: Server, tmp_path: Path) -> None:
    assert server.get("/", params={"word": "hello"}, headers={"X-Request-Id": "req-1"}).text == (
        "hello"
    )
    boom = server.get("/", params={"word": "boom"}, headers={"X-Request-Id": "req-2"})
    assert boom.status_code == 500

    result = tandem("logs", "--address", server.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "INFO Echo " in result.stdout and "[req-1] echo hello" in result.stdout
    assert "ERROR Echo " in result.stdout and "    Traceback" in result.stdout

    result = tandem("logs", "Echo", "--request-id", "req-2", "--address", server.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[req-2] echo boom" in result.stdout and "req-1" not in result.stdout
    assert "    ValueError: cannot echo boom" in result.stdout

    result = tandem("logs", "--json", "-n", "1", "--address", server.url, cwd=tmp_path)
    [line] = [json.loads(text) for text in result.stdout.splitlines()]
    assert line["request_id"] == "req-2" and line["deployment"] == "Echo"
    assert line["replica"].startswith("default#Echo#")

    result = tandem("logs", "Nobody", "--address", server.url, cwd=tmp_path)
    assert_clear_failure(result, "no deployment 'Nobody'", "Echo")

    # --follow prints the newest line, then one logged after it started; Ctrl-C stops it.
    with subprocess.Popen(
        [*TANDEM_MODULE, "logs", "-f", "-n", "1", "--address", server.url],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_ctrl_c,
    ) as follower:
        printed: queue.Queue[str] = queue.Queue()
        output = follower.stdout
        assert output is not None
        reader = threading.Thread(target=lambda: [printed.put(text) for text in output])
        reader.start()
        try:
            first = printed.get(timeout=20)
            assert "[req-2]" in first, first
            server.get("/", params={"word": "later"}, headers={"X-Request-Id": "req-3"})
            later = _next_line_with(printed, "[req-3]")
            assert later.rstrip().endswith("echo later")
        finally:
            follower.send_signal(signal.SIGINT)
            try:
                code = follower.wait(timeout=20)
            except subprocess.TimeoutExpired:
                follower.kill()  # else leaving the with block waits for it forever
                raise
            finally:
                reader.join(timeout=5)
    assert code == 0, list(printed.queue)


def test_logs_without_a_server_says_so(tmp_path: Path) -> None:
    port = free_port()
    result = tandem("logs", "--address", f"http://127.0.0.1:{port}", cwd=tmp_path)
    assert_clear_failure(result, "No tandem server", str(port), "tandem run")


def _next_line_with(printed: queue.Queue[str], text: str) -> Any:
    while True:
        line = printed.get(timeout=20)
        if text in line:
            return line
