"""WebSockets through the proxy, as Ray Serve serves them: a FastAPI (or plain ASGI)
ingress's ``@app.websocket`` routes, the session running in the ingress replica on
every backend, messages relayed both ways as they come, with bounded buffers.

Clients are real: the ``websockets`` library's synchronous client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import WebSocketRoute
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

import tandem as serve
from helpers import wait_for
from tandem._private.api import http_url
from tandem._private.http import websocket as proxy_websocket
from tandem.handle import DeploymentHandle

echo_app = FastAPI()


@serve.deployment
class Upper:
    def __call__(self, text: str) -> str:
        return text.upper()


@serve.deployment
class Slow:
    async def __call__(self, marker: str) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            Path(marker).write_text("cancelled")
            raise


@serve.deployment
@serve.ingress(echo_app)
class Chat:
    def __init__(self, upper: DeploymentHandle, slow: DeploymentHandle) -> None:
        self.upper = upper
        self.slow = slow

    @echo_app.websocket("/echo")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    await ws.send_text(message["text"])
                else:
                    await ws.send_bytes(message["bytes"])
        except WebSocketDisconnect:
            pass

    @echo_app.websocket("/upper")
    async def upper_each(self, ws: WebSocket) -> None:
        await ws.accept()
        async for text in ws.iter_text():  # ends at the client's disconnect
            await ws.send_text(await self.upper.remote(text))

    @echo_app.websocket("/count/{n}")
    async def count(self, ws: WebSocket, n: int) -> None:
        await ws.accept()
        for i in range(n):
            await ws.send_text(str(i))
        await ws.close(code=1000, reason="done")

    @echo_app.websocket("/flood")
    async def flood(self, ws: WebSocket) -> None:
        """Sends FLOOD messages, writing after each how many it sent so far."""
        progress = Path(ws.query_params["progress"])
        await ws.accept()
        chunk = os.urandom(FLOOD_BYTES)  # incompressible: WebSockets deflate messages
        for i in range(FLOOD):
            await ws.send_bytes(chunk)
            progress.write_text(str(i + 1))
        await ws.close()

    @echo_app.websocket("/deaf")
    async def deaf(self, ws: WebSocket) -> None:
        """Reads nothing until the file ``release`` exists, then echoes a count of all."""
        release = Path(ws.query_params["release"])
        await ws.accept()
        while not release.exists():
            await asyncio.sleep(0.01)
        count = 0
        async for _ in ws.iter_bytes():
            count += 1
            if count == SENT:
                await ws.send_text(str(count))

    @echo_app.websocket("/left")
    async def left(self, ws: WebSocket) -> None:
        """Records that it saw its client leave."""
        marker = Path(ws.query_params["marker"])
        await ws.accept()
        try:
            while True:
                await ws.receive_text()
        except WebSocketDisconnect as exc:
            marker.write_text(f"disconnect {exc.code}")

    @echo_app.websocket("/stuck")
    async def stuck(self, ws: WebSocket) -> None:
        """Awaits a call that never ends, whatever its client does."""
        await ws.accept()
        await ws.send_text("waiting")
        await self.slow.remote(ws.query_params["marker"])

    @echo_app.websocket("/fails-before")
    async def fails_before(self, ws: WebSocket) -> None:
        raise ValueError("secret internals")

    @echo_app.websocket("/fails-after")
    async def fails_after(self, ws: WebSocket) -> None:
        await ws.accept()
        await ws.receive_text()
        raise ValueError("secret internals")

    @echo_app.websocket("/refuses")
    async def refuses(self, ws: WebSocket) -> None:
        await ws.close(code=1008)

    @echo_app.websocket("/denies")
    async def denies(self, ws: WebSocket) -> None:
        await ws.send_denial_response(PlainTextResponse("sign in first", status_code=401))

    @echo_app.get("/plain")
    def plain(self) -> str:
        return "http still works"


FLOOD = 3000
FLOOD_BYTES = 32 * 1024
SENT = 2000


def ws_url(path: str) -> str:
    url = http_url()
    assert url is not None
    return "ws" + url.removeprefix("http") + path


def run_chat(backend: str) -> None:
    serve.run(Chat.bind(Upper.bind(), Slow.bind()), backend=backend)


def test_echo_session_keeps_text_and_bytes_apart(backend: str) -> None:
    run_chat(backend)
    with connect(ws_url("/echo")) as ws:
        assert ws.response is not None
        assert ws.response.headers["x-request-id"]
        for text in ("hello", "wörld", ""):
            ws.send(text)
            assert ws.recv(timeout=10) == text
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=10) == b"\x00\x01binary"
    # Sessions and HTTP share the app.
    assert httpx.get(http_url() + "/plain", timeout=10).json() == "http still works"


def test_each_message_calls_another_deployment_through_a_handle(backend: str) -> None:
    run_chat(backend)
    with connect(ws_url("/upper")) as ws:
        for word in ("one", "two", "three"):
            ws.send(word)
            assert ws.recv(timeout=10) == word.upper()


def test_server_streams_then_closes_normally(backend: str) -> None:
    run_chat(backend)
    with connect(ws_url("/count/200")) as ws:
        received = [ws.recv(timeout=10) for _ in range(200)]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert received == [str(i) for i in range(200)]
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "done")


def test_a_client_that_drops_is_seen_by_its_handler_and_others_go_on(
    backend: str, tmp_path: Path
) -> None:
    run_chat(backend)
    marker = tmp_path / "left"
    with connect(ws_url(f"/left?marker={marker}")) as ws:
        ws.send("hello")
        ws.socket.shutdown(socket.SHUT_RDWR)  # no close frame: as if its network went away
    # Written by the handler (created, then filled): wait for what it wrote.
    assert wait_for(lambda: marker.exists() and marker.read_text(), timeout_s=20)
    assert marker.read_text().startswith("disconnect")
    with connect(ws_url("/echo")) as other:
        other.send("still serving")
        assert other.recv(timeout=10) == "still serving"


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)
def test_a_slow_client_stops_the_app_instead_of_filling_memory(
    backend: str, tmp_path: Path
) -> None:
    run_chat(backend)
    progress = tmp_path / "progress"
    sent = lambda: int(progress.read_text() or 0) if progress.exists() else 0  # noqa: E731
    with connect(ws_url(f"/flood?progress={progress}"), max_size=None) as ws:
        assert wait_for(lambda: sent() > 0, timeout_s=20)
        # Read nothing: the app must stop well before the end, and stay stopped.
        assert wait_for(_stalled(sent), timeout_s=30), "the app never stopped sending"
        assert sent() < FLOOD, f"all {FLOOD} messages went out to a client that read none"
        received = 0
        while received < FLOOD:
            ws.recv(timeout=20)
            received += 1
    assert sent() == FLOOD


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)
def test_an_app_that_reads_nothing_stops_its_client(backend: str, tmp_path: Path) -> None:
    run_chat(backend)
    release = tmp_path / "release"
    count = [0]
    with connect(ws_url(f"/deaf?release={release}"), max_size=None) as ws:
        chunk = os.urandom(FLOOD_BYTES)

        def send_all() -> None:
            for _ in range(SENT):
                ws.send(chunk)
                count[0] += 1

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        assert wait_for(_stalled(lambda: count[0]), timeout_s=30), "the client never stopped"
        assert count[0] < SENT, "the server took every message while its app read none"
        release.touch()
        sender.join(timeout=60)
        assert ws.recv(timeout=30) == str(SENT)


def _stalled(value: Any, quiet_s: float = 0.5) -> Any:
    """A predicate: true once ``value()`` has not changed for ``quiet_s``."""
    import time

    last = [value(), time.monotonic()]

    def check() -> bool:
        now_value = value()
        if now_value != last[0]:
            last[:] = [now_value, time.monotonic()]
            return False
        return time.monotonic() - last[1] >= quiet_s

    return check


def test_a_session_that_outlives_its_client_is_cancelled_with_its_calls(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy_websocket, "DISCONNECT_GRACE_S", 0.2)
    run_chat(backend)
    marker = tmp_path / "cancelled"
    with connect(ws_url(f"/stuck?marker={marker}")) as ws:
        assert ws.recv(timeout=10) == "waiting"
    assert wait_for(marker.exists, timeout_s=20), "the downstream call was never cancelled"


def test_failures_say_only_a_status_and_the_request_id(backend: str) -> None:
    run_chat(backend)
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url("/fails-before"))
    response = refused.value.response
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    assert request_id in response.body.decode()
    assert "secret" not in response.body.decode()
    with connect(ws_url("/fails-after")) as ws:
        ws.send("go")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1011
    assert "secret" not in closed.value.rcvd.reason


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)
def test_refused_and_unknown_sessions_get_http_errors(backend: str) -> None:
    run_chat(backend)
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url("/refuses"))
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as denied:  # the app's own HTTP answer, relayed
        connect(ws_url("/denies"))
    assert denied.value.response.status_code == 401
    assert denied.value.response.body == b"sign in first"
    assert denied.value.response.headers["x-request-id"]
    serve.run(Upper.bind(), name="upper", route_prefix="/upper-app", backend=backend)
    with pytest.raises(InvalidStatus) as not_asgi:  # a __call__ ingress takes HTTP only
        connect(ws_url("/upper-app"))
    assert not_asgi.value.response.status_code == 403
    serve.delete("default")
    with pytest.raises(InvalidStatus) as unknown:
        connect(ws_url("/nothing-here"))
    assert unknown.value.response.status_code == 404


async def _raw_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept", "subprotocol": "chat.v1"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": "raw:" + message["text"]})


async def _starlette_echo(ws: Any) -> None:
    await ws.accept()
    await ws.send_text("starlette:" + await ws.receive_text())
    await ws.close()


@serve.deployment
@serve.ingress(_raw_echo)
class RawASGI:
    pass


@serve.deployment
@serve.ingress(Starlette(routes=[WebSocketRoute("/ws", _starlette_echo)]))
class StarletteIngress:
    pass


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)
def test_plain_asgi_and_starlette_ingresses_serve_sessions(backend: str) -> None:
    serve.run(RawASGI.bind(), name="raw", route_prefix="/raw", backend=backend)
    serve.run(StarletteIngress.bind(), name="star", route_prefix="/star", backend=backend)
    with connect(ws_url("/raw"), subprotocols=["chat.v1"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat.v1"
        ws.send("hi")
        assert ws.recv(timeout=10) == "raw:hi"
    with connect(ws_url("/star/ws")) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "starlette:hi"


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)
def test_sessions_are_counted_and_logged(backend: str) -> None:
    run_chat(backend)
    with connect(ws_url("/echo")) as ws:
        ws.send("x")
        ws.recv(timeout=10)
    url = http_url()
    assert url is not None

    def counted() -> bool:
        text = httpx.get(url + "/metrics", timeout=10).text
        return any(
            line.startswith("tandem_http_requests_total{")
            and 'method="WEBSOCKET"' in line
            and 'status_code="101"' in line
            for line in text.splitlines()
        )

    assert wait_for(counted, timeout_s=10)


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_messages_over_the_size_limit_close_the_session(backend: str) -> None:
    serve.start(http_options={"port": 0, "max_body_bytes": 1024})
    run_chat(backend)
    with connect(ws_url("/echo"), max_size=None) as ws:
        ws.send("small")
        assert ws.recv(timeout=10) == "small"
        ws.send("z" * 4096)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009  # message too big
