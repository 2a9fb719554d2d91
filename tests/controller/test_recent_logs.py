"""Each replica's recent log lines, read back through the controller (controller/logs.py,
Backend.logs), on every backend: a user's logger, a failed request's traceback and
access lines, each with its request id, filtered by deployment and request id."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

import tandem as serve
from helpers import eventually
from tandem._private.api import http_url
from tandem._private.calls.runtime import current_runtime
from tandem._private.controller.logs import UnknownLogSource
from tandem.handle import DeploymentHandle

LOGGER = logging.getLogger("tandem.replica")


@serve.deployment(logging_config={"enable_access_log": True, "log_level": "INFO"})
class Scorer:
    def score(self, text: str) -> int:  # sync: runs in a worker thread
        LOGGER.info("scoring %r", text)
        LOGGER.debug("below the deployment's log_level")
        if text == "boom":
            raise ValueError("the model cannot score boom")
        return len(text)


@serve.deployment
class Front:
    def __init__(self, scorer: DeploymentHandle) -> None:
        self._scorer = scorer

    async def __call__(self, request: Any) -> str:
        text = request.query_params["text"]
        LOGGER.info("front got %r", text)  # no logging_config: INFO, as Ray Serve
        return str(await self._scorer.score.remote(text))


def _recent_logs(**filters: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    runtime = current_runtime()
    assert runtime is not None and runtime.controller is not None
    result: tuple[list[dict[str, Any]], dict[str, int]] = runtime.run_sync(
        runtime.controller.recent_logs(**filters)
    )
    return result


def test_replica_lines_come_back_with_their_request_ids(backend: str) -> None:
    serve.run(Front.bind(Scorer.bind()), name="scores", route_prefix="/scores", backend=backend)
    base = http_url()
    assert base is not None
    ok = httpx.get(base + "/scores", params={"text": "hello"}, headers={"X-Request-Id": "req-ok"})
    assert ok.text == "5"
    failed = httpx.get(
        base + "/scores", params={"text": "boom"}, headers={"X-Request-Id": "req-boom"}
    )
    assert failed.status_code == 500

    def messages(lines: list[dict[str, Any]]) -> list[str]:
        return [line["message"] for line in lines]

    # Only the scorer's access lines and tracebacks wait for the call to end: read once
    # every expected line is there.
    lines, cursors = eventually(
        lambda: _recent_logs(deployment="Scorer", request_id="req-boom"),
        lambda got: any(line["exception"] for line in got[0]) and len(got[0]) >= 3,
    )
    assert {line["deployment"] for line in lines} == {"Scorer"}
    assert {line["request_id"] for line in lines} == {"req-boom"}
    assert {line["application"] for line in lines} == {"scores"}
    assert "scoring 'boom'" in messages(lines)
    assert "below the deployment's log_level" not in messages(lines)
    failure = next(line for line in lines if line["level"] == "ERROR" and line["exception"])
    assert "ValueError: the model cannot score boom" in failure["exception"]
    assert "Traceback" in failure["exception"]
    access = [line for line in lines if line["logger"] == "tandem.replica.access"]
    assert access and "score ERROR" in access[0]["message"]
    [scorer_replica] = cursors

    everything, _ = _recent_logs(app="scores")
    assert [line["time"] for line in everything] == sorted(line["time"] for line in everything)
    front = [line for line in everything if line["deployment"] == "Front"]
    assert messages(front) == [
        "front got 'hello'",
        "front got 'boom'",
        "Request to method '__call__' failed: ValueError: the model cannot score boom",
    ]
    assert [line["request_id"] for line in front] == ["req-ok", "req-boom", "req-boom"]
    ok_lines, _ = _recent_logs(request_id="req-ok")
    assert {line["deployment"] for line in ok_lines} == {"Front", "Scorer"}
    assert "scoring 'hello'" in messages(ok_lines)

    # Following: only lines newer than the cursors come back.
    httpx.get(base + "/scores", params={"text": "again"}, headers={"X-Request-Id": "req-3"})
    newer, _ = eventually(
        lambda: _recent_logs(deployment="Scorer", after=cursors),
        lambda got: "scoring 'again'" in messages(got[0]),
    )
    assert {line["request_id"] for line in newer} == {"req-3"}
    assert _recent_logs(replica=scorer_replica, limit=1)[0][0]["replica"] == scorer_replica


def test_unknown_deployments_are_named_with_those_that_exist() -> None:
    serve.run(Front.bind(Scorer.bind()), name="scores", route_prefix="/scores", backend="local")
    with pytest.raises(UnknownLogSource, match=r"'Nope'.*Front, Scorer"):
        _recent_logs(deployment="Nope")
    with pytest.raises(UnknownLogSource, match=r"no application 'other'.*scores"):
        _recent_logs(app="other")
    assert _recent_logs(request_id="no-such-request") == ([], _recent_logs()[1])
