"""Connection limits on the data port, as an attacker (and a normal client) meets them.

Every test talks to a real server over raw sockets: an oversized head gets 431
and a close, a head that trickles in or stops half-way is cut at its deadline,
connections past the cap get 503 at once, idle keep-alive connections close on
time, and the server keeps serving throughout. The limits reach the server
from ``tandem.start(http_options=...)``, from a config file and from
``tandem run`` flags; a ``tandem run`` starts with its open-file limit raised
and its connection cap derived from it, and survives running out of
descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml

import tandem as serve
from helpers import GREETER, Server, Servers, assert_clear_failure, free_port, tandem, wait_for
from tandem._private.api import http_url
from tandem._private.app.config_file import validate_config
from tandem._private.http.limits import (
    ConnectionLimits,
    Refusals,
    default_max_connections,
    protocol_class,
)

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@serve.deployment
class Hello:
    async def __call__(self, request: Any) -> str:
        await request.body()
        if request.query_params.get("sleep"):
            await asyncio.sleep(float(request.query_params["sleep"]))
        return "ok"


@pytest.fixture
def serve_limits() -> Iterator[Callable[..., int]]:
    """Serve Hello with these http_options (on a free port); return the port."""

    def start(**options: Any) -> int:
        serve.start(http_options={"port": 0, **options})
        serve.run(Hello.bind(), backend="local")
        base = http_url()
        assert base is not None
        return int(base.rsplit(":", 1)[1])

    yield start


# -- raw HTTP over sockets -------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_to_close(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    deadline = time.monotonic() + timeout_s
    answer = b""
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            part = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return answer
        except TimeoutError:
            pytest.fail(f"the server kept the connection open; it sent {answer[:200]!r}")
        if not part:
            return answer
        answer += part


def read_response(sock: socket.socket) -> bytes:
    """One response (with a Content-Length) on a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"the server closed the connection after {data!r}"
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer.split(b" ", 2)[1])


def get_status(port: int, extra_headers: bytes = b"") -> int | None:
    """A fresh connection's answer to GET / (None if it was cut without one)."""
    with connect(port) as sock:
        try:
            sock.sendall(
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra_headers + b"\r\n"
            )
        except OSError:
            pass
        return status_of(read_to_close(sock))


def hold(port: int, stack: contextlib.ExitStack) -> socket.socket:
    """A kept-alive connection the server has answered (so it counts it as open).

    Retried while the server still counts a connection the test just closed.
    """
    deadline = time.monotonic() + 10
    while True:
        sock = connect(port)
        try:
            sock.sendall(GET)
            answer = read_response(sock)
        except (AssertionError, OSError):
            answer = b""
        if status_of(answer) == 200:
            return stack.enter_context(sock)
        sock.close()
        assert time.monotonic() < deadline, answer
        time.sleep(0.05)


def send_until_answered(sock: socket.socket, chunks: Iterator[bytes]) -> None:
    """Send ``chunks`` until the server answers or hangs up, as a careful client would."""
    for chunk in chunks:
        if select.select([sock], [], [], 0)[0]:
            return
        try:
            sock.sendall(chunk)
        except OSError:
            return


# -- header size ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [100 * 1024, 2 * 1024 * 1024], ids=["100KiB", "2MiB"])
def test_oversized_head_gets_431_and_a_close_and_the_server_still_serves(
    serve_limits: Callable[..., int], size: int
) -> None:
    port = serve_limits()  # the default limit, 64 KiB
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        send_until_answered(sock, (b"a" * 65536 for _ in range(size // 65536)))
        answer = read_to_close(sock)
    assert status_of(answer) == 431, answer[:300]
    assert b"connection: close" in answer
    assert b"over 65536 bytes" in answer
    # A large head under the limit is served; so is everyone else.
    assert get_status(port, b"X-Fine: " + b"b" * 60_000 + b"\r\n") == 200
    assert get_status(port) == 200


def test_many_small_headers_over_the_limit_get_431(
    serve_limits: Callable[..., int],
) -> None:
    port = serve_limits(max_header_bytes=4096)
    lines = [b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(200)]
    assert get_status(port, b"".join(lines)) == 431
    assert get_status(port, b"".join(lines[:60])) == 200  # about 3 KB


def test_oversized_pipelined_head_lets_the_response_before_it_finish_then_closes(
    serve_limits: Callable[..., int],
) -> None:
    port = serve_limits(max_header_bytes=4096)
    with connect(port) as sock:
        sock.sendall(b"GET /?sleep=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
        answer = read_to_close(sock)
    # One whole response, nothing wedged into it, and then the connection ends.
    assert answer.count(b"HTTP/1.1 ") == 1 and status_of(answer) == 200, answer
    assert answer.endswith(b"\r\n\r\nok")
    assert get_status(port) == 200


# -- header time ---------------------------------------------------------------------


def test_half_open_connections_are_closed_at_the_deadline_while_others_are_served(
    serve_limits: Callable[..., int],
) -> None:
    port = serve_limits(header_timeout_s=1)
    partial = [b"GET /slow", b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: "]
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect(port)) for _ in range(50)]
        opened = time.monotonic()
        for index, sock in enumerate(socks):
            sock.sendall(partial[index % 2])
        assert get_status(port) == 200  # meanwhile, a normal request
        answers = [read_to_close(sock, timeout_s=15) for sock in socks]
        elapsed = time.monotonic() - opened
    assert all(status_of(a) == 408 for a in answers), {a[:60] for a in answers}
    assert 0.9 <= elapsed < 15, elapsed
    assert get_status(port) == 200


@pytest.mark.parametrize("kind", ["fresh", "kept_alive", "crlf"])
def test_a_trickling_head_is_cut_at_the_deadline(
    serve_limits: Callable[..., int], kind: str
) -> None:
    """Slowloris: a byte every 0.2 s never completes a head; 1.5 s after its first byte
    (or the connection opening) the server answers 408 and hangs up."""
    port = serve_limits(header_timeout_s=1.5)
    with connect(port) as sock:
        if kind != "fresh":  # a whole request first: the clock restarts with the next one
            sock.sendall(GET)
            assert status_of(read_response(sock)) == 200
            time.sleep(0.5)  # idle, within keep_alive_timeout_s: the connection stays
        trickle = b"\r\n" if kind == "crlf" else b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "
        started = time.monotonic()
        index = 0
        while time.monotonic() - started < 20:
            try:
                sock.sendall(trickle[index % len(trickle) : index % len(trickle) + 1])
            except OSError:
                break
            index += 1
            if select.select([sock], [], [], 0.2)[0]:
                break
        answer = read_to_close(sock)
        cut_after = time.monotonic() - started
    assert status_of(answer) == 408, answer
    assert 1.3 <= cut_after < 10, cut_after


# -- idle time -----------------------------------------------------------------------


def test_idle_keep_alive_connection_closes_after_a_fractional_timeout(
    serve_limits: Callable[..., int],
) -> None:
    port = serve_limits(keep_alive_timeout_s=1.5)
    with connect(port) as sock:
        sock.sendall(GET)
        assert status_of(read_response(sock)) == 200
        answered = time.monotonic()
        assert read_to_close(sock) == b""
        idle = time.monotonic() - answered
    assert 1.4 <= idle < 10, idle


# -- open connections ----------------------------------------------------------------


def test_connections_past_the_cap_get_503_and_a_close_and_the_others_still_work(
    serve_limits: Callable[..., int],
) -> None:
    port = serve_limits(max_connections=3)
    with contextlib.ExitStack() as stack:
        held = [hold(port, stack) for _ in range(3)]
        with connect(port) as extra:
            answer = read_to_close(extra)  # answered before the client says anything
        assert status_of(answer) == 503, answer
        assert b"connection: close" in answer and b"too many open connections" in answer
        for sock in held:
            sock.sendall(GET)
            assert status_of(read_response(sock)) == 200
    # Once they are closed, new connections are served.
    assert wait_for(lambda: get_status(port) == 200, timeout_s=10)


def test_default_cap_leaves_a_reserve_of_the_open_file_limit() -> None:
    assert default_max_connections(1024) == 768
    assert default_max_connections(65536) == 49152
    assert default_max_connections(300) == 44
    assert default_max_connections(100) == 16
    assert default_max_connections(None) == 49152


# -- every parser uvicorn may use ------------------------------------------------------


@contextlib.contextmanager
def uvicorn_with_limits(parser: Any, limits: ConnectionLimits) -> Iterator[int]:
    """A bare uvicorn server (no tandem) with the limits' protocol for ``parser``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop = asyncio.new_event_loop()
    config = uvicorn.Config(
        app,
        loop="none",
        lifespan="off",
        log_level="critical",
        http=protocol_class(limits, Refusals(limits), parser),
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=loop.run_until_complete, args=(server.serve(sockets=[sock]),), daemon=True
    )
    thread.start()
    try:
        assert wait_for(lambda: server.started, timeout_s=10)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        loop.close()
        sock.close()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_each_parser_enforces_size_time_and_cap(parser: str) -> None:
    limits = ConnectionLimits(max_header_bytes=4096, header_timeout_s=1, max_connections=2)
    with uvicorn_with_limits(parser, limits) as port:
        assert get_status(port, b"X-Big: " + b"a" * 8192 + b"\r\n") == 431
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
            send_until_answered(sock, (b"a" * 1000 for _ in range(50)))  # in small reads
            assert status_of(read_to_close(sock)) == 431
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost")
            assert status_of(read_to_close(sock)) == 408
        with connect(port) as one, connect(port) as two:
            for sock in (one, two):
                sock.sendall(GET)
                assert status_of(read_response(sock)) == 200
            with connect(port) as third:
                assert status_of(read_to_close(third)) == 503
        assert wait_for(lambda: get_status(port) == 200, timeout_s=10)


# -- tandem run and config files -------------------------------------------------------


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "greet.py").write_text(GREETER)
    return folder


@pytest.fixture
def run_server(app_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``tandem run ARGS --port P``, under an open-file limit (soft, hard) if given."""
    servers = Servers(app_dir, tmp_path)

    def start(*args: str, open_files: tuple[int, int] | None = None) -> Server:
        port = free_port()
        command = [sys.executable, "-m", "tandem"]
        if open_files is not None:  # the limit a shell's `ulimit -n` would set
            command = [
                sys.executable,
                "-c",
                "import resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, {open_files}); "
                "from tandem._private.cli.main import main; main()",
            ]
        return servers.start([*command, "run", *args, "--port", str(port)], port)

    yield start
    servers.kill_all()


def test_tandem_run_flags_reach_the_server(run_server: Callable[..., Server]) -> None:
    server = run_server(
        "greet:greeter",
        "--max-header-bytes",
        "2048",
        "--header-timeout-s",
        "1",
        "--keep-alive-timeout-s",
        "1.5",
        "--max-connections",
        "3",
        "--max-body-bytes",
        "1000",
    )
    port = server.port
    assert get_status(port, b"X-Big: " + b"a" * 4096 + b"\r\n") == 431
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        assert status_of(read_to_close(sock)) == 408
    assert server.post("/", content=b"z" * 2000).status_code == 413
    with contextlib.ExitStack() as stack:
        for _ in range(2):
            hold(port, stack)
        last = hold(port, stack)
        answered = time.monotonic()
        with connect(port) as extra:
            assert status_of(read_to_close(extra)) == 503
        assert read_to_close(last) == b""  # kept alive for 1.5 s, not 1
        assert time.monotonic() - answered >= 1.4
    assert wait_for(lambda: get_status(port) == 200, timeout_s=10)


def test_tandem_run_raises_the_open_file_limit_and_derives_the_cap_from_it(
    run_server: Callable[..., Server],
) -> None:
    # Soft 300 under hard 600: raised to 600, the cap is 600 - 256 = 344 (from 300 it
    # would be 44).
    server = run_server("greet:greeter", open_files=(300, 600))
    cap = default_max_connections(600)
    with contextlib.ExitStack() as stack:
        for _ in range(cap):
            hold(server.port, stack)
        with connect(server.port) as extra:
            assert status_of(read_to_close(extra)) == 503
    assert wait_for(lambda: get_status(server.port) == 200, timeout_s=10)
    assert wait_for(lambda: "with 503: 344 were open" in server.output()), server.output()


def test_server_out_of_descriptors_keeps_running_and_serves_again(
    run_server: Callable[..., Server],
) -> None:
    """With a cap above what the open-file limit allows, accept() fails with EMFILE:
    the server drops what it cannot accept, and serves once descriptors are free."""
    server = run_server("greet:greeter", "--max-connections", "100000", open_files=(160, 160))
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect(server.port)) for _ in range(300)]
        # Some were dropped: the process has no descriptor left for them.
        assert wait_for(lambda: _dropped(socks), timeout_s=10)
        assert server.proc.poll() is None
    assert wait_for(lambda: _answers(server.port), timeout_s=15)
    assert server.proc.poll() is None
    assert "Traceback" not in server.output()


def _dropped(socks: list[socket.socket]) -> bool:
    readable = select.select(socks, [], [], 0.1)[0]
    for sock in readable:
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":
                return True
        except OSError:
            return True
    return False


def _answers(port: int) -> bool:
    try:
        return get_status(port) == 200
    except OSError:
        return False


def test_unknown_limit_in_a_config_file_is_refused_clearly(app_dir: Path) -> None:
    config = {
        "http_options": {"port": free_port(), "max_header_byte": 2048},
        "applications": [{"name": "default", "import_path": "greet:greeter"}],
    }
    (app_dir / "serve.yaml").write_text(yaml.safe_dump(config))
    result = tandem("run", "serve.yaml", cwd=app_dir)
    assert_clear_failure(result, "max_header_byte", "did you mean 'max_header_bytes'")
    # Spelled right, it is taken, and so are the other limits.
    config["http_options"] = {
        "max_header_bytes": 2048,
        "header_timeout_s": 2.5,
        "keep_alive_timeout_s": 0.5,
        "max_connections": 10,
        "max_body_bytes": None,
    }
    options = validate_config(config).http_options
    assert (options.max_header_bytes, options.header_timeout_s) == (2048, 2.5)
    assert (options.max_connections, options.max_body_bytes) == (10, None)
    with pytest.raises(ValueError, match="did you mean 'max_connections'"):
        serve.start(http_options={"max_conections": 10})
