"""What the network can and cannot make a tandem server do.

The data port serves applications and three read-only endpoints; nothing on it
changes the server or shows its internals, however the path is spelled. The
control endpoint (deploy, shutdown, detailed status) is a Unix socket only the
owner can use, or a TCP port that needs a token. Clients see no internals:
5xx bodies carry a short message and the request id, and a client's request
id is kept only when sane. Bodies over the limit are refused before they are
buffered.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import tandem as serve
from helpers import GREETER, Server, Servers, free_port, tandem, wait_for
from tandem._private.api import http_url
from tandem._private.rundir import control_socket_path, user_dir

# A config whose "application" is logging.config.dictConfig with a handler
# whose factory is os.system: applying it runs a shell command.
MARKER_COMMAND = "touch {marker}"


def dict_config_payload(marker: Path) -> bytes:
    handler = {"()": "os.system", "command": MARKER_COMMAND.format(marker=marker)}
    return json.dumps(
        {
            "applications": [
                {
                    "name": "pwned",
                    "route_prefix": "/pwned",
                    "import_path": "logging.config:dictConfig",
                    "args": {"version": 1, "handlers": {"h": handler}},
                }
            ]
        }
    ).encode()


# Spellings of the control paths a client might try on the data port.
SPELLINGS = [
    "/-/applications",
    "//-/applications",
    "/%2D/applications",
    "/%2d/applications",
    "/./-/applications",
    "/a/../-/applications",
    "/-/%61pplications",
    "/-/applications/",
    "/-//applications",
    "/%2F-/applications",
    "/-/shutdown",
    "//-/shutdown",
    "/%2D/shutdown",
    "/./-/shutdown",
    "/a/../-/shutdown",
    "/-/%73hutdown",
    "/-/status",
    "/%2D/status",
    "/-/logs",
    "/-/logs?follow=1",
    "/%2D/logs",
    "/-/%6Cogs",
]
METHODS = ["PUT", "POST", "PATCH", "DELETE", "GET"]


def raw_request(port: int, method: str, target: str, body: bytes = b"", **headers: str) -> bytes:
    """One HTTP/1.1 request sent byte for byte (clients normalise paths; attackers do not)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def status_code(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "greet.py").write_text(GREETER)
    return folder


@pytest.fixture
def cli_server(app_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """Start ``tandem run ARGS`` servers (local backend) and kill any left at the end."""
    servers = Servers(app_dir, tmp_path)

    def start(*args: str) -> Server:
        port = free_port()
        command = [sys.executable, "-m", "tandem", "run", *args, "--port", str(port)]
        return servers.start(command, port)

    yield start
    servers.kill_all()


# -- the data port is no control plane --------------------------------------------


def test_control_requests_on_the_data_port_do_nothing_however_spelled(
    cli_server: Any, tmp_path: Path
) -> None:
    server = cli_server("greet:app")
    marker = tmp_path / "pwned"
    payload = dict_config_payload(marker)
    for target in SPELLINGS:
        for method in METHODS:
            answer = raw_request(
                server.port, method, target, payload, Content_Type="application/json"
            )
            code = status_code(answer)
            assert code in (400, 404, 405, 500), (method, target, answer[:300])
            assert b"Traceback" not in answer and b"replica" not in answer.lower()
    # Cross-origin, as a web page would send it (no preflight for text/plain).
    answer = raw_request(
        server.port,
        "POST",
        "/-/shutdown",
        b"{}",
        Content_Type="text/plain",
        Origin="http://evil.example",
    )
    assert status_code(answer) == 404
    assert not marker.exists()
    # Still serving, with its one application only.
    assert server.post("/", json={"name": "Dora"}).text == "Hola Dora"
    assert server.get("/-/routes").json() == {"/": "default"}
    assert server.proc.poll() is None
    assert "pwned" not in server.output()


def test_owner_controls_the_server_through_its_control_socket(
    cli_server: Any, app_dir: Path
) -> None:
    server = cli_server("greet:app")
    path = control_socket_path(server.port)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert f"control socket {path}" in server.output()

    result = tandem("status", "--address", server.url, cwd=app_dir)
    assert result.returncode == 0, result.stderr
    status = yaml.safe_load(result.stdout)
    replicas = status["applications"]["default"]["deployments"]["Front"]["replicas"]
    assert replicas and replicas[0]["replica_id"]  # the details are the owner's

    result = tandem("delete", "nobody", "--address", server.url, cwd=app_dir)
    assert result.returncode != 0 and "no application 'nobody'" in result.stderr, result
    result = tandem("delete", "default", "--address", server.url, cwd=app_dir)
    assert result.returncode == 0, result.stderr
    assert server.get("/-/routes").json() == {}
    assert server.post("/", json={"name": "Dora"}).status_code == 404

    result = tandem("shutdown", "--address", server.url, cwd=app_dir)
    assert result.returncode == 0, result.stderr
    assert server.wait_exit() == 0
    assert not path.exists()  # the socket goes with its server


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_control_socket_refuses_other_users(
    cli_server: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    # A runtime directory of its own, in /tmp (which anyone may cross): the test opens it
    # to others, and other tests' servers, running meanwhile, keep theirs private.
    base = Path(tempfile.mkdtemp(prefix="tandem-uid-test-"))
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    os.chmod(base, 0o711)
    monkeypatch.setenv("TANDEM_RUNTIME_DIR", str(base / "run"))
    server = cli_server("greet:app")
    path = str(control_socket_path(server.port))
    # The directory (0700) already keeps others out; open it to test the uid check itself.
    folder = Path(path).parent
    before = stat.S_IMODE(folder.stat().st_mode)
    os.chmod(folder, 0o711)
    os.chmod(path, 0o666)
    try:
        code = textwrap_script(
            f"""
            import os, socket
            os.setgid(65534); os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(5)
            sock.connect({path!r})
            try:
                sock.sendall(b"GET /-/status HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
                answer = sock.recv(65536)
            except OSError:
                answer = b""
            print("ANSWER", answer[:40])
            """
        )
    finally:
        os.chmod(folder, before)
        os.chmod(path, 0o600)
    assert code.returncode == 0, code.stderr
    assert "ANSWER b''" in code.stdout, code.stdout
    assert "Refused a control connection from user id 65534" in server.output()


def textwrap_script(source: str) -> subprocess.CompletedProcess[str]:
    import textwrap

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_control_port_needs_the_token_and_works_from_elsewhere(
    cli_server: Any, app_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control_port = free_port()
    server = cli_server("greet:app", "--control-port", str(control_port))
    token_file = control_socket_path(server.port).with_suffix(".token")
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f"control port 127.0.0.1:{control_port}, token in {token_file}" in server.output()
    control = f"http://127.0.0.1:{control_port}"

    # "Another machine": a user directory without this server's socket.
    monkeypatch.setenv("TANDEM_RUNTIME_DIR", str(tmp_path / "elsewhere"))
    result = tandem("status", "--address", server.url, cwd=app_dir)
    assert result.returncode != 0 and "--control" in result.stderr, result

    result = tandem("status", "--control", control, cwd=app_dir)
    assert result.returncode != 0 and "401" in result.stderr and "token" in result.stderr
    # Before any token is checked, the port's own limits hold: a 100 KiB head is refused.
    huge = raw_request(control_port, "GET", "/-/status", X_Padding="p" * 100_000)
    assert status_code(huge) == 431
    bad = tmp_path / "bad.token"
    bad.write_text("not-the-token\n")
    result = tandem("status", "--control", control, "--token-file", str(bad), cwd=app_dir)
    assert result.returncode != 0 and "401" in result.stderr
    assert "Traceback" not in result.stderr

    result = tandem("status", "--control", control, "--token-file", str(token_file), cwd=app_dir)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["applications"]["default"]["status"] == "RUNNING"
    # The token also comes from the environment.
    monkeypatch.setenv("TANDEM_CONTROL_TOKEN", token_file.read_text().strip())
    result = tandem("shutdown", "--control", control, cwd=app_dir)
    assert result.returncode == 0, result.stderr
    assert server.wait_exit() == 0
    assert not token_file.exists()


def test_status_of_a_remote_address_says_how_to_reach_it(app_dir: Path) -> None:
    result = tandem("status", "--address", "http://192.0.2.7:8000", cwd=app_dir)
    assert (
        result.returncode != 0 and "--control" in result.stderr and "SECURITY.md" in (result.stderr)
    )
    port = free_port()
    result = tandem("status", "--address", f"http://127.0.0.1:{port}", cwd=app_dir)
    assert result.returncode != 0 and f"port {port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_non_loopback_host_says_what_the_network_reaches(cli_server: Any) -> None:
    server = cli_server("greet:app", "--host", "0.0.0.0")
    assert (
        "--host 0.0.0.0: the data port is reachable from the network; the control endpoint "
        "is not" in server.output()
    )
    local = cli_server("greet:app")
    assert "reachable from the network" not in local.output()


def test_library_use_opens_no_control_endpoint() -> None:
    serve.run(Echo.bind(), backend="local")
    base = http_url()
    assert base is not None
    port = int(base.rsplit(":", 1)[1])
    path = control_socket_path(port)
    if path.exists():  # left by a server killed earlier on this port (another test's)
        with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(str(path))  # nothing listens on it
    assert httpx.get(base + "/-/status").status_code == 404
    assert httpx.put(base + "/-/applications", content=b"{}").status_code in (404, 405)


def test_stale_control_socket_of_a_killed_server_is_replaced(
    cli_server: Any, app_dir: Path
) -> None:
    first = cli_server("greet:app")
    path = control_socket_path(first.port)
    first.kill()  # SIGKILL: the socket file stays behind
    assert path.exists()
    port = first.port
    second = Server(
        [sys.executable, "-m", "tandem", "run", "greet:app", "--port", str(port)],
        app_dir,
        app_dir.parent / "second.log",
        port,
    )
    try:
        second.wait_ready()
        result = tandem("status", "--address", second.url, cwd=app_dir)
        assert result.returncode == 0, result.stderr
    finally:
        second.kill()


# -- clients see no internals ------------------------------------------------------


@serve.deployment(max_ongoing_requests=1, max_queued_requests=0)
class Echo:
    async def __call__(self, request: Any) -> str:
        if request.query_params.get("fail"):
            raise RuntimeError("secret detail at /srv/models/weights.bin")
        if request.query_params.get("sleep"):
            import asyncio

            await asyncio.sleep(float(request.query_params["sleep"]))
        return "ok"


def url(path: str = "/") -> str:
    base = http_url()
    assert base is not None
    return base + path


def test_error_bodies_carry_a_short_message_and_the_request_id() -> None:
    serve.run(Echo.bind(), backend="local")
    with httpx.Client(timeout=10) as client:
        failed = client.get(url(), params={"fail": "1"})
        assert failed.status_code == 500
        request_id = failed.headers["x-request-id"]
        assert failed.text == f"Internal Server Error (request id {request_id}).\n"

        # Backpressure: one request runs, none may wait.
        import threading

        slow = threading.Thread(target=lambda: client.get(url(), params={"sleep": "1"}))
        slow.start()
        try:
            busy = wait_for(
                lambda: (r := httpx.get(url(), timeout=10)).status_code == 503 and r,
                timeout_s=5,
            )
        finally:
            slow.join()
    assert busy, "no request was refused while the replica was busy"
    assert busy.text.startswith("Service Unavailable: too many requests are waiting")
    assert "Echo" not in busy.text and "Traceback" not in busy.text
    assert busy.text.endswith(f"(request id {busy.headers['x-request-id']}).\n")


def test_sane_request_ids_are_kept_and_hostile_ones_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    serve.run(Echo.bind(), backend="local")
    with httpx.Client(timeout=10) as client:
        kept = client.get(url(), headers={"x-request-id": "abc-123_X.y:z"})
        assert kept.headers["x-request-id"] == "abc-123_X.y:z"
        for hostile in [
            "a" * 129,
            "has space",
            "tab\there",
            "<script>alert(1)</script>",
            "esc\x1b[31mred",
            "quote\"'",
            "",
        ]:
            with caplog.at_level("INFO", logger="tandem.access"):
                answer = client.get(url(), headers={"x-request-id": hostile})
            if answer.status_code == 400 and "x-request-id" not in answer.headers:
                assert "\x1b" in hostile  # the HTTP parser refused the request itself
                continue
            given = answer.headers["x-request-id"]
            assert given != hostile and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", given)
            assert all(hostile not in record.getMessage() for record in caplog.records if hostile)


def test_newline_in_path_does_not_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    serve.run(Echo.bind(), backend="local")
    with caplog.at_level("INFO", logger="tandem.access"):
        answer = raw_request(
            int(url().rsplit(":", 1)[1].rstrip("/")), "GET", "/x%0AFAKE%20200%20OK"
        )
        assert status_code(answer) == 200
        wait_for(lambda: any("FAKE" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if "FAKE" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines), lines


# -- body limits ---------------------------------------------------------------------


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_large_body_is_refused_before_it_is_buffered() -> None:
    serve.run(Echo.bind(), backend="local")
    port = int(url().rsplit(":", 1)[1].rstrip("/"))
    before = _rss_kb()
    size = 300 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        sent = 0
        chunk = b"x" * (1024 * 1024)
        try:
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server answered and hung up
        answer = b""
        try:
            while part := sock.recv(65536):
                answer += part
        except OSError:
            pass
    assert status_code(answer) == 413, answer[:200]
    assert b"at most 104857600 bytes" in answer
    assert _rss_kb() - before < 100 * 1024, "the proxy buffered the body it refused"
    assert httpx.get(url(), timeout=10).text == "ok"


def test_chunked_body_over_the_limit_is_refused() -> None:
    serve.start(http_options={"port": 0, "max_body_bytes": 1024 * 1024})
    try:
        serve.run(Echo.bind(), backend="local")

        def chunks() -> Iterator[bytes]:
            for _ in range(64):
                yield b"y" * (64 * 1024)

        with httpx.Client(timeout=10) as client:
            try:
                answer = client.post(url(), content=chunks())
                assert answer.status_code == 413
            except httpx.HTTPError:
                pass  # the server may hang up before the client reads the answer
            assert client.post(url(), content=b"small").text == "ok"
    finally:
        serve.start(http_options={"port": 0})


def test_body_at_the_limit_is_served() -> None:
    serve.start(http_options={"port": 0, "max_body_bytes": 1000})
    try:
        serve.run(Echo.bind(), backend="local")
        with httpx.Client(timeout=10) as client:
            assert client.post(url(), content=b"z" * 1000).text == "ok"
            too_big = client.post(url(), content=b"z" * 1001)
            assert too_big.status_code == 413
            assert too_big.headers["connection"] == "close"
    finally:
        serve.start(http_options={"port": 0})


def test_user_dir_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_RUNTIME_DIR", str(tmp_path / "mine"))
    folder = user_dir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (tmp_path / "link").symlink_to(tmp_path)
    monkeypatch.setenv("TANDEM_RUNTIME_DIR", str(tmp_path / "link"))
    with pytest.raises(RuntimeError, match="not a directory"):
        user_dir()
