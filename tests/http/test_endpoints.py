"""The data port's own endpoints and the control endpoint's routes, in memory (no server)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tandem._private.http.control import ControlActions, ControlApp
from tandem._private.http.endpoints import proxy_endpoints


def _request(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


def _data_port() -> Any:
    return proxy_endpoints(routes=lambda: {"/": "default"}, metrics=lambda: b"m 1\n")


def test_data_port_endpoints_answer_get_and_head() -> None:
    app = _data_port()
    assert _request(app, "GET", "/-/healthz").text == "success"
    assert _request(app, "GET", "/-/routes").json() == {"/": "default"}
    metrics = _request(app, "GET", "/metrics")
    assert metrics.text == "m 1\n"
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert _request(app, "HEAD", "/-/healthz").status_code == 200


def test_data_port_endpoints_refuse_other_methods_and_paths() -> None:
    app = _data_port()
    refused = _request(app, "POST", "/-/routes")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, HEAD"
    for path in ("/-/status", "/-/routes/", "/-/applications", "/-/shutdown"):
        answer = _request(app, "GET", path)
        assert answer.status_code == 404, path
        assert "GET /-/healthz" in answer.text


class _Owner:
    def __init__(self) -> None:
        self.applied: list[Any] = []
        self.deleted: list[str] = []
        self.stopped = False

    def actions(self) -> ControlActions:
        async def status() -> Any:
            class _Status:
                def to_dict(self) -> dict[str, Any]:
                    return {"applications": {}}

            return _Status()

        async def apply(config: Any) -> None:
            if config == {"bad": True}:
                raise ValueError("applications: field required")
            self.applied.append(config)

        async def delete(name: str) -> bool:
            self.deleted.append(name)
            return name == "known"

        def shutdown() -> None:
            self.stopped = True

        return ControlActions(
            status=status,
            routes=lambda: {"/": "default"},
            apply_config=apply,
            delete=delete,
            shutdown=shutdown,
        )


def test_control_routes_reach_their_actions() -> None:
    owner = _Owner()
    app = ControlApp(owner.actions())
    assert _request(app, "GET", "/-/healthz").text == "success"
    assert _request(app, "GET", "/-/status").json() == {"applications": {}}
    assert _request(app, "GET", "/-/routes").json() == {"/": "default"}
    assert _request(app, "PUT", "/-/applications", json={"applications": []}).json() == {
        "applied": True
    }
    assert owner.applied == [{"applications": []}]
    assert _request(app, "DELETE", "/-/applications/known").json() == {"deleted": "known"}
    assert _request(app, "DELETE", "/-/applications/other").status_code == 404
    assert owner.deleted == ["known", "other"]
    assert _request(app, "POST", "/-/shutdown").json() == {"shutting_down": True}
    assert owner.stopped


def test_control_refuses_bad_configs_and_unknown_requests_clearly() -> None:
    app = ControlApp(_Owner().actions())
    bad = _request(app, "PUT", "/-/applications", json={"bad": True})
    assert (bad.status_code, bad.json()) == (400, {"error": "applications: field required"})
    not_json = _request(app, "PUT", "/-/applications", content=b"{")
    assert not_json.status_code == 400
    assert "not JSON" in not_json.json()["error"]
    unknown = _request(app, "GET", "/-/nothing")
    assert unknown.status_code == 404
    assert "POST /-/shutdown" in unknown.json()["error"]
    assert _request(app, "GET", "/-/shutdown").status_code == 405
