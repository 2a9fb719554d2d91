"""Direct ingress (http/direct.py): on the process backend, ingress replicas serve HTTP
on the data port themselves, next to the driver's proxy (SO_REUSEPORT).

The kernel spreads new connections over the listeners by their addresses, so each
test opens many connections (one request each): all of them landing on one listener
is as likely as 40 coin flips coming up the same. What the ingress processes served
is read from the controller (the counts they report with their facts).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from starlette.requests import Request
from websockets.sync.client import connect

import tandem as serve
from helpers import TANDEM_MODULE, Server, free_port, parse_prometheus, total, wait_for
from tandem._private.api import http_url
from tandem._private.calls.runtime import current_runtime
from tandem._private.http.direct import ENV, IngressPlan, enabled

CONNECTIONS = 40


@pytest.fixture
def direct(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(ENV, "1")  # replica processes inherit it
    yield
    serve.shutdown()  # while it is still set: stop the listeners it started


@serve.deployment
class Where:
    async def __call__(self, request: Request) -> dict[str, Any]:
        if request.query_params.get("fail"):
            raise RuntimeError("secret internals")
        return {"pid": os.getpid(), "app": "where", "path": request.url.path}


@serve.deployment
class Other:
    async def __call__(self, request: Request) -> str:
        return "other"


def _fresh_requests(path: str, n: int = CONNECTIONS, content: bytes | None = None) -> list[Any]:
    """``n`` requests, each on a connection of its own."""
    url = http_url()
    assert url is not None
    method = "GET" if content is None else "POST"
    return [httpx.request(method, url + path, content=content, timeout=10) for _ in range(n)]


def _served_by_ingress_processes() -> int:
    """Requests the ingress replicas' own proxies answered, as they report them now."""
    runtime = current_runtime()
    assert runtime is not None and runtime.controller is not None
    controller = runtime.controller
    runtime.run_sync(controller.refresh_reports(timeout_s=5))
    counts = controller.proxy_counts()
    served = 0
    for report in counts.values():
        served += sum(sum(s.by_status.values()) for s in report._series.values())
    return served


def test_ingress_replicas_answer_http_themselves(direct: None) -> None:
    serve.run(Where.bind(), backend="process")
    responses = _fresh_requests("/")
    assert [r.status_code for r in responses] == [200] * CONNECTIONS
    pids = {r.json()["pid"] for r in responses}
    assert len(pids) == 1 and pids != {os.getpid()}
    assert all(r.headers["x-request-id"] for r in responses)
    served = _served_by_ingress_processes()
    assert 0 < served < CONNECTIONS, "one listener took every connection"
    # /metrics (from any listener) counts every request, wherever it was answered.
    samples = parse_prometheus(httpx.get(http_url() + "/metrics", timeout=10).text)
    assert total(samples, "tandem_http_requests_total", application="default") == CONNECTIONS


def test_a_request_for_another_application_gets_there(direct: None) -> None:
    serve.run(Where.bind(), backend="process", name="where", route_prefix="/where")
    serve.run(Other.bind(), backend="process", name="other", route_prefix="/other")
    responses = _fresh_requests("/other")
    assert [r.text for r in responses] == ["other"] * CONNECTIONS
    assert _served_by_ingress_processes() > 0
    missing = _fresh_requests("/nowhere", n=10)
    assert {r.status_code for r in missing} == {404}


def test_limits_and_error_bodies_hold_in_ingress_processes(direct: None) -> None:
    serve.start(http_options={"port": 0, "max_body_bytes": 100})
    serve.run(Where.bind(), backend="process")
    too_large = _fresh_requests("/", n=20, content=b"x" * 1000)
    assert {r.status_code for r in too_large} == {413}
    failed = _fresh_requests("/?fail=1", n=20)
    assert {r.status_code for r in failed} == {500}
    for response in failed:
        assert "secret internals" not in response.text
        assert response.headers["x-request-id"] in response.text
    assert _served_by_ingress_processes() > 0


def test_a_killed_ingress_replica_is_replaced_and_serves_again(direct: None) -> None:
    serve.run(Where.bind(), backend="process")
    pid = _fresh_requests("/", n=1)[0].json()["pid"]
    os.kill(pid, signal.SIGKILL)

    def replaced() -> bool:
        try:
            answers = _fresh_requests("/", n=10)
        except httpx.TransportError:  # a connection the dead listener had accepted
            return False
        return all(r.status_code == 200 and r.json()["pid"] != pid for r in answers)

    assert wait_for(replaced, timeout_s=30, interval_s=0.2)
    before = _served_by_ingress_processes()
    _fresh_requests("/")
    assert _served_by_ingress_processes() > before  # the new replica listens too


def test_a_deleted_application_stops_listening(direct: None) -> None:
    serve.run(Where.bind(), backend="process", name="where", route_prefix="/where")
    serve.run(Other.bind(), backend="process", name="other", route_prefix="/other")
    serve.delete("where")

    def only_other_listens() -> bool:
        return {r.status_code for r in _fresh_requests("/where", n=20)} == {404}

    assert wait_for(only_other_listens, timeout_s=10)


def test_the_port_is_free_after_shutdown(direct: None) -> None:
    serve.run(Where.bind(), backend="process")
    url = http_url()
    assert url is not None
    port = int(url.rsplit(":", 1)[1])
    serve.shutdown()
    with socket.socket() as sock:  # no SO_REUSEPORT: fails while any listener is left
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


def test_other_backends_refuse_it_clearly(direct: None) -> None:
    with pytest.raises(ValueError, match="needs the process backend"):
        serve.run(Where.bind(), backend="local")


def test_the_switch_takes_only_yes_or_no(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in [("1", True), ("yes", True), ("0", False), ("", False)]:
        monkeypatch.setenv(ENV, value)
        assert enabled() is expected
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match="set it to 1 or 0"):
        enabled()


def test_a_plan_names_the_deployments_that_listen() -> None:
    from tandem._private.http.options import HTTPOptions

    plan = IngressPlan(HTTPOptions(), (("/a", "a", "Ingress"),))
    assert plan.serves("a", "Ingress")
    assert not plan.serves("a", "Other") and not plan.serves("b", "Ingress")


APP = """
from fastapi import FastAPI, WebSocket
from starlette.requests import Request
from websockets.sync.client import connect
import tandem as serve

@serve.deployment
class Hello:
    async def __call__(self, request: Request) -> str:
        return "hello"

app = Hello.bind()
"""


def test_tandem_run_direct_ingress_logs_every_request_once(tmp_path: Path) -> None:
    """The flag works from the CLI, and ingress processes write the access log as
    the driver does: one line per request, wherever it was answered."""
    (tmp_path / "hello_app.py").write_text(APP)
    port = free_port()
    command = [*TANDEM_MODULE, "run", "hello_app:app", "--backend", "process"]
    server = Server(
        [*command, "--direct-ingress", "--port", str(port)], tmp_path, tmp_path / "log", port
    )
    try:
        server.wait_ready()
        for _ in range(CONNECTIONS):
            assert httpx.get(server.url + "/hi", timeout=10).text == "hello"

        def logged() -> int:
            return sum(" GET /hi 200 " in line for line in server.output().splitlines())

        assert wait_for(lambda: logged() == CONNECTIONS, timeout_s=10), server.output()
        samples = parse_prometheus(server.get("/metrics").text)
        assert total(samples, "tandem_http_requests_total", application="default") == CONNECTIONS
        server.ctrl_c()
        assert server.wait_exit() == 0
    finally:
        server.kill()


ws_app = FastAPI()


@serve.deployment
@serve.ingress(ws_app)
class Echo:
    @ws_app.websocket("/ws")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        async for text in ws.iter_text():
            await ws.send_text(f"{os.getpid()}:{text}")


def test_websocket_sessions_work_through_every_listener(direct: None) -> None:
    serve.run(Echo.bind(), backend="process")
    url = http_url()
    assert url is not None
    for i in range(20):  # each on a connection of its own
        with connect(url.replace("http", "ws", 1) + "/ws") as ws:
            ws.send(f"hi {i}")
            assert str(ws.recv(timeout=10)).endswith(f":hi {i}")
    assert _served_by_ingress_processes() > 0


@serve.deployment(max_ongoing_requests=1, max_queued_requests=0)
class Busy:
    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(2)
        return "done"


def test_ingress_processes_answer_shed_requests_with_the_deployments_backpressure(
    direct: None,
) -> None:
    """The plan carries backpressure_config: a shed request gets 429 and Retry-After
    from whichever listener took it."""
    app = Busy.options(backpressure_config={"status_code": 429, "retry_after_s": 1.5}).bind()
    serve.run(app, backend="process")
    url = http_url()
    assert url is not None

    async def burst() -> list[httpx.Response]:
        async with asyncio.timeout(30):
            clients = [httpx.AsyncClient(timeout=10) for _ in range(12)]
            try:
                return list(await asyncio.gather(*(c.get(url) for c in clients)))
            finally:
                await asyncio.gather(*(c.aclose() for c in clients))

    responses = asyncio.run(burst())
    shed = [r for r in responses if r.status_code != 200]
    assert shed and {r.status_code for r in shed} == {429}
    assert {r.headers.get("retry-after") for r in shed} == {"2"}
    assert _served_by_ingress_processes() > 0


def test_new_http_options_reach_every_listener(direct: None) -> None:
    serve.start(http_options={"port": 0, "max_body_bytes": 100})
    serve.run(Where.bind(), backend="process")
    assert {r.status_code for r in _fresh_requests("/", n=20, content=b"x" * 1000)} == {413}
    serve.start(http_options={"port": 0, "max_body_bytes": 10_000})  # the proxies start again

    def all_take_it() -> bool:
        responses = _fresh_requests("/", n=20, content=b"x" * 1000)
        return {r.status_code for r in responses} == {200}

    assert wait_for(all_take_it, timeout_s=10)
    before = _served_by_ingress_processes()
    _fresh_requests("/")
    assert _served_by_ingress_processes() > before  # the ingress process listens again


def test_the_logging_setup_reaches_the_ingress_processes(
    direct: None, capfd: pytest.CaptureFixture[str]
) -> None:
    """Set after they listen, it still reaches them: once it has, every request gets one
    access line, whichever listener took it (an ingress process's own default setup
    writes none, so a batch with a line short means it has not arrived)."""
    from tandem._private.http.logs import configure_logging

    saved = _logging_state()
    configure_logging("WARNING", access_log=False)  # what the ingress process starts with
    serve.run(Where.bind(), backend="process")
    assert _fresh_requests("/", n=20)
    configure_logging("INFO", access_log=True)
    try:
        batch = iter(range(1000))

        def a_batch_fully_logged() -> bool:
            path = f"/logged-{next(batch)}"
            _fresh_requests(path, n=20)
            err = ""

            def all_in() -> bool:  # both listeners write to this test's stderr
                nonlocal err
                err += capfd.readouterr().err
                return err.count(f" GET {path} 200 ") == 20

            return bool(wait_for(all_in, 2))

        assert wait_for(a_batch_fully_logged, timeout_s=20)
        assert _served_by_ingress_processes() > 0
    finally:
        _restore_logging(saved)


def _logging_state() -> tuple[Any, ...]:
    """What configure_logging() changes in this process (for other tests, it must come back)."""
    from tandem._private.http import logs

    tandem = logging.getLogger("tandem")
    return (
        list(tandem.handlers),
        tandem.level,
        tandem.propagate,
        logs.access_logger.disabled,
        logs.last_config,
    )


def _restore_logging(state: tuple[Any, ...]) -> None:
    from tandem._private.http import logs

    handlers, level, propagate, access_disabled, last_config = state
    tandem = logging.getLogger("tandem")
    for handler in tandem.handlers:
        if handler not in handlers:
            handler.close()
    tandem.handlers[:] = handlers
    tandem.setLevel(level)
    tandem.propagate = propagate
    logs.access_logger.disabled = access_disabled
    logs.last_config = last_config
