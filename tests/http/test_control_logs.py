"""GET /-/logs of the control endpoint (http/control_logs.py), against a fake reader."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tandem._private.http.control import ControlActions, ControlApp


class _Logs:
    """Answers as Controller.recent_logs does; each call after the first has one new line."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.app: ControlApp | None = None

    async def read(self, **kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
        self.calls.append(kwargs)
        if kwargs.get("deployment") == "Nope":
            raise LookupError("There is no deployment 'Nope' (deployments: Model).")
        seq = len(self.calls)
        if seq == 3 and self.app is not None:
            self.app.closing.set()  # the server stops: the followed response ends
        line = {"seq": seq, "message": f"line {seq}", "replica": "r1"}
        return [line], {"r1": seq}


def _app(logs: _Logs) -> ControlApp:
    async def nothing(*_: Any) -> Any:
        return None

    actions = ControlActions(
        status=nothing,
        routes=dict,
        apply_config=nothing,
        delete=nothing,
        shutdown=lambda: None,
        logs=logs.read,
    )
    app = ControlApp(actions)
    logs.app = app
    return app


def _get(app: ControlApp, path: str) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    return asyncio.run(send())


def test_lines_are_read_with_the_filters_given() -> None:
    logs = _Logs()
    answer = _get(_app(logs), "/-/logs?deployment=Model&request_id=abc&limit=5&app=")
    assert answer.status_code == 200
    assert answer.json() == {"lines": [{"seq": 1, "message": "line 1", "replica": "r1"}]}
    assert logs.calls == [{"limit": 5, "deployment": "Model", "request_id": "abc"}]


def test_follow_streams_new_lines_from_the_cursors_until_the_server_stops() -> None:
    logs = _Logs()
    answer = _get(_app(logs), "/-/logs?follow=1&replica=r1")
    assert answer.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(text) for text in answer.text.splitlines()]
    assert [line["message"] for line in lines] == ["line 1", "line 2", "line 3"]
    assert logs.calls[1]["after"] == {"r1": 1} and logs.calls[2]["after"] == {"r1": 2}
    assert logs.calls[1]["replica"] == "r1"


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("limit=0", "limit must be a whole number from 1 to 10000, got '0'"),
        ("limit=many", "got 'many'"),
        ("follow=maybe", "follow takes 1 or 0, got 'maybe'"),
        ("request-id=abc", "Unknown parameter 'request-id'"),
    ],
)
def test_bad_parameters_get_a_400_that_says_what_is_wrong(query: str, words: str) -> None:
    answer = _get(_app(_Logs()), f"/-/logs?{query}")
    assert answer.status_code == 400 and words in answer.json()["error"]


def test_an_unknown_deployment_gets_a_404_naming_those_that_exist() -> None:
    answer = _get(_app(_Logs()), "/-/logs?deployment=Nope")
    assert answer.status_code == 404
    assert answer.json()["error"] == "There is no deployment 'Nope' (deployments: Model)."
