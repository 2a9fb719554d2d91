"""Priority: calls waiting for a replica leave the queue highest priority first, then
in order of arrival; the priority comes from ``handle.options(priority=...)``, or from
the client (``X-Request-Priority``), and calls made while serving a request inherit it.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import tandem as serve
from tandem._private.api import http_url
from tandem.handle import DeploymentHandle


@serve.deployment(max_ongoing_requests=1)
class Log:
    """Serves one call at a time and notes the order they started in."""

    def __init__(self) -> None:
        self.order: list[str] = []

    async def work(self, tag: str, seconds: float = 0.0) -> str:
        self.order.append(tag)
        await asyncio.sleep(seconds)
        return tag

    def seen(self) -> list[str]:
        return list(self.order)


@serve.deployment(max_ongoing_requests=100)
class Front:
    """Calls Log; its calls inherit the priority of the request it serves."""

    def __init__(self, log: DeploymentHandle) -> None:
        self.log = log

    async def __call__(self, request: Any) -> str:
        seconds = float(request.query_params.get("seconds", 0))
        return await self.log.work.remote(request.query_params["tag"], seconds)

    async def relay(self, tag: str, seconds: float = 0.0) -> str:
        return await self.log.work.remote(tag, seconds)


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)  # nothing of Ray's own
def test_higher_priority_calls_leave_the_queue_first(backend: str) -> None:
    log = serve.run(Log.bind(), backend=backend, route_prefix=None)
    busy = log.work.remote("busy", 0.5)  # the only slot; the rest queue in this process
    queued = [
        log.work.remote("first"),
        log.options(priority=-3).work.remote("lowest"),
        log.work.remote("second"),
        log.options(priority=5).work.remote("urgent"),
        log.options(priority=1).work.remote("soon"),
    ]
    assert busy.result(timeout_s=10) == "busy"
    assert [r.result(timeout_s=10) for r in queued] == [
        "first",
        "lowest",
        "second",
        "urgent",
        "soon",
    ]
    assert log.seen.remote().result(timeout_s=10) == [
        "busy",
        "urgent",
        "soon",
        "first",
        "second",
        "lowest",
    ]


def test_calls_made_while_serving_inherit_the_priority(backend: str) -> None:
    front = serve.run(Front.bind(Log.bind()), backend=backend, route_prefix=None)
    log = serve.get_deployment_handle("Log", "default")
    busy = front.relay.remote("busy", 1.0)  # Log's only slot; Front's calls queue in Front
    plain = front.relay.remote("plain")
    time.sleep(0.3)  # the plain call waits first
    urgent = front.options(priority=7).relay.remote("urgent")
    assert [r.result(timeout_s=10) for r in (busy, plain, urgent)] == ["busy", "plain", "urgent"]
    assert log.seen.remote().result(timeout_s=10) == ["busy", "urgent", "plain"]


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)  # nothing of Ray's own
def test_the_client_sets_the_priority_over_http(backend: str) -> None:
    serve.run(Front.bind(Log.bind()), backend=backend, route_prefix="/front")
    log = serve.get_deployment_handle("Log", "default")
    base = http_url()
    assert base is not None
    with httpx.Client(timeout=10) as client:
        for bad in ("high", "1.5", str(2**31), ""):
            refused = client.get(base + "/front", headers={"X-Request-Priority": bad})
            assert refused.status_code == 400, refused.text
            assert "X-Request-Priority must be a whole number" in refused.text
        answers: dict[str, str] = {}

        def get(tag: str, priority: str | None = None, seconds: float = 0) -> None:
            headers = {} if priority is None else {"X-Request-Priority": priority}
            params = {"tag": tag, "seconds": str(seconds)}
            answer = client.get(base + "/front", params=params, headers=headers)
            answers[tag] = answer.text

        threads = [
            threading.Thread(target=get, args=("busy", None, 1.0)),  # Log's only slot
            threading.Thread(target=get, args=("plain",)),
            threading.Thread(target=get, args=("urgent", "3")),
        ]
        for thread in threads:
            thread.start()
            time.sleep(0.3)  # each waits in Front's queue for Log before the next
        for thread in threads:
            thread.join(10)
    assert answers == {"busy": "busy", "plain": "plain", "urgent": "urgent"}
    assert log.seen.remote().result(timeout_s=10) == ["busy", "urgent", "plain"]


def test_priority_must_be_a_whole_number_in_range() -> None:
    handle = DeploymentHandle("Log")
    for bad_type in ("1", True, 1.5, None.__class__):
        with pytest.raises(TypeError, match="priority must be an int"):
            handle.options(priority=bad_type)
    for out_of_range in (2**31, -(2**31) - 1):
        with pytest.raises(ValueError, match="priority must be between"):
            handle.options(priority=out_of_range)
    kept = handle.options(priority=4)
    assert kept.other_method._priority == 4  # method handles keep it
    assert pickle.loads(pickle.dumps(kept))._priority == 4
    assert kept.options(priority=None)._priority is None  # back to the request's
    assert kept != handle


sessions = FastAPI()


@serve.deployment(max_ongoing_requests=100)
@serve.ingress(sessions)
class Sessions:
    """A WebSocket session calls Log as it starts; its calls take the session's priority."""

    def __init__(self, log: DeploymentHandle) -> None:
        self.log = log

    @sessions.get("/busy")
    async def busy(self) -> str:
        return str(await self.log.work.remote("busy", 1.0))

    @sessions.websocket("/ws/{tag}")
    async def session(self, ws: WebSocket, tag: str) -> None:
        await ws.accept()
        await ws.send_text(await self.log.work.remote(tag))
        await ws.close()


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)  # nothing of Ray's own
def test_a_websocket_session_takes_the_clients_priority(backend: str) -> None:
    serve.run(Sessions.bind(Log.bind()), backend=backend, route_prefix="/s")
    log = serve.get_deployment_handle("Log", "default")
    base = http_url()
    assert base is not None
    ws_base = base.replace("http://", "ws://") + "/s/ws/"
    for headers, words in (
        ({"X-Request-Priority": "high"}, "X-Request-Priority must be a whole number"),
        ({"X-Request-Deadline-Ms": "500"}, "not to WebSocket sessions"),
    ):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_base + "refused", additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 400
        assert words in refused.value.response.body.decode()
    answers: dict[str, str] = {}

    def session(tag: str, priority: str | None = None) -> None:
        headers = {} if priority is None else {"X-Request-Priority": priority}
        with connect(ws_base + tag, additional_headers=headers, open_timeout=10) as ws:
            answers[tag] = str(ws.recv(timeout=10))

    busy = threading.Thread(target=lambda: httpx.get(base + "/s/busy", timeout=10))
    threads = [
        busy,  # Log's only slot
        threading.Thread(target=session, args=("plain",)),
        threading.Thread(target=session, args=("urgent", "3")),
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.3)  # each waits in the ingress's queue for Log before the next
    for thread in threads:
        thread.join(10)
    assert answers == {"plain": "plain", "urgent": "urgent"}
    assert log.seen.remote().result(timeout_s=10) == ["busy", "urgent", "plain"]
