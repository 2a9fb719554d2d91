"""Ray Serve's external scaler: an application deployed with ``external_scaler_enabled``
(``run()`` or its config file) has its replica counts set from outside, through
the owner's control endpoint (``POST /api/v1/applications/APP/deployments/NAME/scale``);
the reconciliation loop starts and stops replicas to match, status shows the new
target, and a redeploy that changes nothing of a deployment keeps it. Such an
application may not autoscale; the control endpoint answers bad requests as Ray's
dashboard does; the data port does not scale anything."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import ValidationError

import tandem as serve
from helpers import eventually, tandem
from tandem._private.app.config_file import build_applications, validate_config
from tandem._private.app.external_scaler import (
    ExternalScalerDisabledError,
    ScaleDeploymentRequest,
)
from tandem._private.calls.runtime import current_runtime
from tandem._private.cli.serving import ServeSession

SCALED_APP = """
import tandem as serve


@serve.deployment(num_replicas=1)
class Worker:
    def __call__(self, x: int) -> int:
        return x * 2


@serve.deployment
class Front:
    def __init__(self, worker) -> None:
        self.worker = worker

    async def __call__(self, x: int) -> int:
        return await self.worker.remote(x)


app = Front.bind(Worker.bind())


@serve.deployment(num_replicas="auto")
class Elastic:
    def __call__(self, x: int) -> int:
        return x


elastic = Elastic.bind()
"""

SCALE_PATH = "/api/v1/applications/{app}/deployments/{deployment}/scale"


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``scaled_app`` importable (here and in replica processes), forgotten after the test."""
    (tmp_path / "scaled_app.py").write_text(SCALED_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("scaled_app", None)


def _config(*apps: dict[str, Any]) -> dict[str, Any]:
    return {
        "http_options": {"host": "127.0.0.1", "port": 0},
        "applications": list(apps)
        or [
            {
                "name": "scaled",
                "route_prefix": "/scaled",
                "import_path": "scaled_app:app",
                "external_scaler_enabled": True,
            }
        ],
    }


@contextmanager
def _serving(backend: str, config: dict[str, Any]) -> Iterator[tuple[str, httpx.Client]]:
    """A serving session (as ``tandem run`` has) and a client of its control socket."""
    serve.shutdown()  # the session opens its own runtime
    session = ServeSession(backend)
    try:
        url = session.deploy(validate_config(config))
        assert session.control is not None and url is not None
        transport = httpx.HTTPTransport(uds=str(session.control.socket_path))
        with httpx.Client(transport=transport, base_url="http://control", timeout=30) as client:
            yield url, client
    finally:
        session.close()


def _scale(client: httpx.Client, n: Any, app: str = "scaled", name: str = "Worker") -> Any:
    path = SCALE_PATH.format(app=app, deployment=name)
    return client.post(path, json={"target_num_replicas": n})


def _worker(client: httpx.Client) -> dict[str, Any]:
    status = client.get("/-/status").json()
    return status["applications"]["scaled"]["deployments"]["Worker"]  # type: ignore[no-any-return]


def _settled(client: httpx.Client, n: int) -> dict[str, Any]:
    """Worker's status once it runs ``n`` replicas at a target of ``n`` (or the last read)."""
    return eventually(
        lambda: _worker(client),
        lambda d: (d["target_replicas"], d["running_replicas"], d["status"]) == (n, n, "HEALTHY"),
        timeout_s=60,
    )


# -- scaling through the control endpoint -------------------------------------------


@pytest.mark.parametrize("backend", ["local", "process"])
def test_the_control_endpoint_scales_a_deployment_up_and_down(
    backend: str, module_dir: Path
) -> None:
    with _serving(backend, _config()) as (_url, client):
        assert _worker(client)["target_replicas"] == 1

        answer = _scale(client, 3)
        assert answer.status_code == 200, answer.text
        assert "3 replica" in answer.json()["message"]
        assert _worker(client)["target_replicas"] == 3  # at once; replicas follow
        worker = _settled(client, 3)
        assert worker["running_replicas"] == 3, worker
        assert len({r["replica_id"] for r in worker["replicas"]}) == 3
        local = serve.status().applications["scaled"].deployments["Worker"]
        assert (local.target_replicas, local.running_replicas) == (3, 3)
        assert serve.get_app_handle("scaled").remote(21).result(timeout_s=30) == 42

        assert _scale(client, 0).status_code == 200
        worker = _settled(client, 0)
        assert (worker["running_replicas"], worker["replicas"]) == (0, []), worker

        assert _scale(client, 1).status_code == 200
        assert _settled(client, 1)["running_replicas"] == 1
        assert serve.get_app_handle("scaled").remote(5).result(timeout_s=30) == 10
        # The other deployment of the application was left alone.
        front = client.get("/-/status").json()["applications"]["scaled"]["deployments"]["Front"]
        assert front["target_replicas"] == 1


def test_tandem_status_shows_the_target_and_a_redeploy_that_changes_nothing_keeps_it(
    module_dir: Path,
) -> None:
    config = _config()
    with _serving("local", config) as (url, client):
        assert _scale(client, 3).status_code == 200
        _settled(client, 3)
        result = tandem("status", "--address", url, cwd=module_dir)
        assert result.returncode == 0, result.stderr
        shown = yaml.safe_load(result.stdout)["applications"]["scaled"]["deployments"]["Worker"]
        assert (shown["target_replicas"], shown["running_replicas"]) == (3, 3)

        # The same config again (as `tandem deploy` sends it): the scaler's target stands.
        assert client.put("/-/applications", json=config).status_code == 200
        assert _worker(client)["target_replicas"] == 3
        assert _settled(client, 3)["running_replicas"] == 3

        # A config that changes the deployment starts over from its options.
        changed = _config(
            {**config["applications"][0], "deployments": [{"name": "Worker", "num_replicas": 2}]}
        )
        assert client.put("/-/applications", json=changed).status_code == 200
        assert _settled(client, 2)["running_replicas"] == 2


def test_bad_scale_requests_are_answered_as_ray_serve_answers_them(module_dir: Path) -> None:
    plain = {"name": "plain", "route_prefix": "/plain", "import_path": "scaled_app:app"}
    config = _config({**_config()["applications"][0]}, plain)
    with _serving("local", config) as (_url, client):
        path = SCALE_PATH.format(app="scaled", deployment="Worker")
        for body in (
            b"{",
            b"[3]",
            b"{}",
            b'{"target_num_replicas": -1}',
            b'{"target_num_replicas": 1.5}',
            b'{"target_num_replicas": true}',
            b'{"target_num_replicas": 2, "replicas": 2}',
        ):
            answer = client.post(path, content=body)
            assert answer.status_code == 400, (body, answer.text)
            assert answer.json()["error"].startswith("Invalid request body"), answer.text
        missing = client.post(path, content=b"{}").json()["error"]
        assert "target_num_replicas" in missing

        # A bad body is refused before the application is looked up, as by Ray's dashboard.
        assert _scale(client, -1, app="nobody").status_code == 400
        for app, name, words in (
            ("nobody", "Worker", "no application 'nobody'"),
            ("scaled", "Nobody", "no deployment 'Nobody'"),
        ):
            answer = _scale(client, 2, app=app, name=name)
            assert answer.status_code == 404, answer.text
            assert words in answer.json()["error"]

        disabled = _scale(client, 2, app="plain")
        assert disabled.status_code == 412, disabled.text
        assert "external_scaler_enabled" in disabled.json()["error"]
        assert client.get(SCALE_PATH.format(app="scaled", deployment="Worker")).status_code == 405
        assert _worker(client)["target_replicas"] == 1  # none of this changed anything
        plain_worker = client.get("/-/status").json()["applications"]["plain"]
        assert plain_worker["deployments"]["Worker"]["target_replicas"] == 1


def test_the_data_port_does_not_serve_the_scale_request(module_dir: Path) -> None:
    with _serving("local", _config()) as (url, client):
        base = url.rstrip("/")
        for path in (
            SCALE_PATH.format(app="scaled", deployment="Worker"),
            "/-" + SCALE_PATH.format(app="scaled", deployment="Worker"),
        ):
            answer = httpx.post(base + path, json={"target_num_replicas": 3}, timeout=10)
            assert answer.status_code == 404, (path, answer.text)
        assert _worker(client)["target_replicas"] == 1


# -- the flag through run() and config files ------------------------------------------


ENABLED = {"external_scaler_enabled": True}


@serve.deployment(num_replicas=2)
class Counter:
    def __call__(self) -> str:
        return "counted"


def _controller() -> Any:
    runtime = current_runtime()
    assert runtime is not None and runtime.controller is not None
    return runtime, runtime.controller


def test_run_takes_the_flag_and_the_controller_scales_its_deployments() -> None:
    serve.run(Counter.bind(), name="ext", route_prefix=None, backend="local", **ENABLED)
    runtime, controller = _controller()
    runtime.run_sync(controller.scale("ext", "Counter", 4))
    counter = eventually(
        lambda: serve.status().applications["ext"].deployments["Counter"],
        lambda d: d.running_replicas == 4,
        timeout_s=30,
    )
    assert (counter.target_replicas, counter.running_replicas) == (4, 4)

    serve.run(Counter.bind(), name="plain", route_prefix=None, backend="local")
    with pytest.raises(ExternalScalerDisabledError, match="external_scaler_enabled"):
        runtime.run_sync(controller.scale("plain", "Counter", 4))
    with pytest.raises(LookupError, match="no deployment 'Other'"):
        runtime.run_sync(controller.scale("ext", "Other", 4))
    with pytest.raises(TypeError, match="external_scaler_enabled must be True or False"):
        serve.run(Counter.bind(), name="x", backend="local", external_scaler_enabled="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [{"num_replicas": "auto"}, {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}],
)
def test_an_application_with_the_flag_may_not_autoscale(options: dict[str, Any]) -> None:
    app = Counter.options(**{"name": "Scaled", "num_replicas": None, **options}).bind()
    with pytest.raises(ValueError) as info:
        serve.run(app, name="ext", route_prefix=None, backend="local", **ENABLED)
    message = str(info.value)
    assert "external_scaler_enabled" in message and "'Scaled'" in message, message
    assert "ext" not in serve.status().applications  # nothing of it was deployed
    serve.run(app, name="ext", route_prefix=None, backend="local")  # without the flag: fine


def test_a_config_file_with_the_flag_may_not_autoscale(module_dir: Path) -> None:
    scaled = _config()["applications"][0]
    # The file's own overrides are refused as it is read (as Ray Serve's schema does) ...
    for override in ({"num_replicas": "auto"}, {"autoscaling_config": {"max_replicas": 3}}):
        with pytest.raises(ValueError, match=r"external_scaler_enabled.*'Worker'"):
            validate_config(_config({**scaled, "deployments": [{"name": "Worker", **override}]}))
    # ... and the code's once it is imported, before anything is deployed.
    elastic = {**scaled, "import_path": "scaled_app:elastic"}
    with pytest.raises(ValueError, match=r"external_scaler_enabled.*'Elastic'"):
        build_applications(validate_config(_config(elastic)))
    # A file that gives the deployment a fixed count takes it out of autoscaling.
    fixed = {**elastic, "deployments": [{"name": "Elastic", "num_replicas": 2}]}
    [(app_config, _app)] = build_applications(validate_config(_config(fixed)))
    assert app_config.external_scaler_enabled is True


def test_scale_deployment_request_has_ray_serves_field() -> None:
    assert ScaleDeploymentRequest(target_num_replicas=3).target_num_replicas == 3
    assert (
        ScaleDeploymentRequest.model_validate({"target_num_replicas": 0}).target_num_replicas == 0
    )
    assert list(ScaleDeploymentRequest.model_fields) == ["target_num_replicas"]
    bad_bodies: list[dict[str, Any]] = [
        {},
        {"target_num_replicas": -1},
        {"target_num_replicas": True},
        {"target_num_replicas": 1, "other": 2},
    ]
    for bad in bad_bodies:
        with pytest.raises(ValidationError):
            ScaleDeploymentRequest.model_validate(bad)
