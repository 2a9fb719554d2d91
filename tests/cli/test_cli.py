"""The ``tandem`` command, run as a user would: in a subprocess, from the app's folder.

Servers are few and each serves several checks: starting one costs a Python
start-up and an import of the user's module.
"""

from __future__ import annotations

import json
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from helpers import (
    GREETER,
    TANDEM_MODULE,
    Server,
    Servers,
    assert_clear_failure,
    free_port,
    tandem,
    wait_for,
)

BUILDERS = """
from pydantic import BaseModel

import tandem as serve


@serve.deployment
class Say:
    def __init__(self, text: str) -> None:
        self.text = text

    def __call__(self, request) -> str:
        return self.text


def plain(args: dict) -> serve.Application:
    return Say.bind("plain " + ",".join(f"{k}={v!r}" for k, v in sorted(args.items())))


class Options(BaseModel):
    greeting: str
    times: int = 1


def typed(options: Options) -> serve.Application:
    return Say.bind(" ".join([options.greeting] * options.times))
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """Where the user's modules live and tandem runs (kept apart from logs, for --reload)."""
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "greet.py").write_text(GREETER)
    (folder / "builders.py").write_text(BUILDERS)
    return folder


@pytest.fixture
def serve_cli(app_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """Start ``tandem run ...`` servers; any left running are killed at the end."""
    servers = Servers(app_dir, tmp_path)

    def start(*args: str, port: int | None = None, port_flag: bool = True) -> Server:
        """``tandem run ARGS --port PORT`` (without --port if ``port_flag`` is false)."""
        port = free_port() if port is None else port
        port_args = ["--port", str(port)] if port_flag else []
        return servers.start([*TANDEM_MODULE, "run", *args, *port_args], port)

    yield start
    servers.kill_all()


# -- tandem run module:app ----------------------------------------------------


def test_run_module_app_serves_until_ctrl_c_and_finishes_in_flight_requests(
    serve_cli: Any, app_dir: Path
) -> None:
    server = serve_cli("greet:app")
    r = server.post("/", json={"name": "Dora"})
    assert r.status_code == 200 and r.text == "Hola Dora"
    assert server.get("/-/routes").json() == {"/": "default"}

    # tandem status (the console script) reads the running server
    result = tandem("status", "--address", server.url, cwd=app_dir, script=True)
    assert result.returncode == 0, result.stderr
    status = yaml.safe_load(result.stdout)
    assert status["applications"]["default"]["status"] == "RUNNING"
    assert set(status["applications"]["default"]["deployments"]) == {"Front", "Responder"}
    as_json = tandem("status", "--json", "--address", server.url, cwd=app_dir)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == status

    # Ctrl-C while a 1 s request is in flight: the request finishes, then tandem exits 0.
    answers: list[Any] = []

    def slow_request() -> None:
        try:
            answers.append(server.get("/", params={"sleep": "1"}, timeout=15))
        except httpx.HTTPError as exc:
            answers.append(exc)

    client = threading.Thread(target=slow_request)
    client.start()
    # Ctrl-C once the request is in flight; a loaded machine may not have sent it yet.
    in_flight = 'tandem_http_requests_in_flight{application="default"} 1.0'
    assert wait_for(lambda: in_flight in server.get("/metrics").text, timeout_s=10)
    server.ctrl_c()
    client.join(timeout=15)
    assert server.wait_exit() == 0, server.output()
    [answer] = answers
    assert isinstance(answer, httpx.Response), (answer, server.output())
    assert answer.status_code == 200 and answer.text == "slept"
    with pytest.raises(httpx.ConnectError):  # and nothing listens any more
        server.get("/-/healthz", timeout=2)


# -- tandem run module:builder key=value ---------------------------------------


def test_run_dict_builder_with_args_name_and_route_prefix_then_sigterm(
    serve_cli: Any,
) -> None:
    server = serve_cli(
        "builders:plain", "color=red", "size=3", "--name", "shop", "--route-prefix", "/v1"
    )
    r = server.get("/v1")
    assert r.status_code == 200
    assert r.text == "plain color='red',size='3'"
    assert server.get("/-/routes").json() == {"/v1": "shop"}
    assert server.get("/").status_code == 404

    server.proc.send_signal(signal.SIGTERM)  # `kill PID`
    assert server.wait_exit() == 0, server.output()


def test_run_pydantic_builder_validates_args(serve_cli: Any) -> None:
    server = serve_cli("builders:typed", "greeting=hi", "times=3")
    assert server.get("/").text == "hi hi hi"
    server.ctrl_c()
    assert server.wait_exit() == 0, server.output()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["builders:typed", "greeting=hi", "times=many"], ["times", "integer"]),
        (["builders:typed", "times=2"], ["greeting", "required"]),
        (["builders:typed", "greeting"], ["key=value", "greeting"]),
        (["greet:app", "color=red"], ["greet:app", "color"]),
    ],
)
def test_bad_builder_args_fail_clearly(app_dir: Path, args: list[str], words: list[str]) -> None:
    result = tandem("run", *args, "--port", str(free_port()), cwd=app_dir, timeout=20)
    assert_clear_failure(result, *words)


# -- config files, tandem status / deploy / shutdown --------------------------------


def write_config(path: Path, port: int, message: str, **greet_override: Any) -> Path:
    config = {
        "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 1},
        "applications": [
            {
                "name": "greet",
                "route_prefix": "/greet",
                "import_path": "greet:greeter",
                "deployments": [
                    {
                        "name": "Greeter",
                        "num_replicas": 2,
                        "user_config": {"message": message},
                        **greet_override,
                    }
                ],
            },
            {
                "name": "shop",
                "route_prefix": "/shop",
                "import_path": "builders:plain",
                "args": {"items": 2, "open": True},
            },
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_file_with_two_apps_status_and_deploy(
    serve_cli: Any, app_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path / "serve.yaml", port, "hello")
    server = serve_cli(str(config), port=port, port_flag=False)  # the port comes from the file

    assert server.get("/greet").text == "hello"  # user_config reached reconfigure
    assert server.get("/shop").text == "plain items=2,open=True"  # args keep their YAML types
    assert server.get("/-/routes").json() == {"/greet": "greet", "/shop": "shop"}
    assert server.get("/greet", params={"sleep": "3"}).status_code == 408  # request_timeout_s: 1

    result = tandem("status", "--address", server.url, cwd=app_dir)
    assert result.returncode == 0, result.stderr
    status = yaml.safe_load(result.stdout)
    greeter = status["applications"]["greet"]["deployments"]["Greeter"]
    assert greeter["running_replicas"] == 2
    assert greeter["target_replicas"] == 2
    assert status["applications"]["shop"]["deployments"]["Say"]["running_replicas"] == 1

    # A changed config, applied to the running server.
    changed = write_config(tmp_path / "changed.yaml", port, "goodbye")
    result = tandem("deploy", str(changed), "--address", server.url, cwd=app_dir, script=True)
    assert result.returncode == 0, result.stderr
    assert server.get("/greet").text == "goodbye"

    # Bad configs are refused with the field at fault; the server keeps what it serves.
    bad_files = {
        "unknown_field": (
            write_config(tmp_path / "bad1.yaml", port, "bad", num_replica=3),
            ["applications[0].deployments[0].num_replica"],
        ),
        "wrong_type": (
            write_config(tmp_path / "bad2.yaml", port, "bad", max_ongoing_requests="many"),
            ["applications[0].deployments[0].max_ongoing_requests"],
        ),
        "zero_replicas": (
            write_config(tmp_path / "bad3.yaml", port, "bad", num_replicas=0),
            ["applications[0].deployments[0].num_replicas", ">= 1"],
        ),
        "unknown_deployment": (
            write_config(tmp_path / "bad4.yaml", port, "bad", name="Nobody"),
            ["Nobody"],
        ),
    }
    for name, (path, words) in bad_files.items():
        result = tandem("deploy", str(path), "--address", server.url, cwd=app_dir)
        assert result.returncode != 0, (name, result)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        for word in words:
            assert word in result.stderr, (name, word, result.stderr)
        assert server.get("/greet").text == "goodbye", name
        assert server.get("/shop").status_code == 200, name

    missing_module = tmp_path / "bad5.yaml"
    missing_module.write_text(
        changed.read_text()
        .replace("builders:plain", "not_a_module:plain")
        .replace("goodbye", "bad")
    )
    result = tandem("deploy", str(missing_module), "--address", server.url, cwd=app_dir)
    assert result.returncode != 0 and "not_a_module" in result.stderr, result
    assert server.get("/greet").text == "goodbye"  # no application changed, not even the good one
    assert server.get("/shop").status_code == 200

    # A config without "shop" deletes it; the other application keeps serving.
    only_greet = yaml.safe_load(changed.read_text())
    only_greet["applications"] = only_greet["applications"][:1]
    (tmp_path / "only_greet.yaml").write_text(yaml.safe_dump(only_greet))
    result = tandem(
        "deploy", str(tmp_path / "only_greet.yaml"), "--address", server.url, cwd=app_dir
    )
    assert result.returncode == 0, result.stderr
    assert server.get("/-/routes").json() == {"/greet": "greet"}
    assert server.get("/shop").status_code == 404
    assert server.get("/greet").text == "goodbye"

    server.ctrl_c()
    assert server.wait_exit() == 0, server.output()


def test_deploy_of_new_user_config_reconfigures_without_restart(
    serve_cli: Any, app_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path / "serve.yaml", port, "hello", num_replicas=1)
    server = serve_cli(str(config), port=port, port_flag=False)
    instance = server.get("/greet", params={"instance": "1"}).text
    changed = write_config(tmp_path / "changed.yaml", port, "goodbye", num_replicas=1)
    result = tandem("deploy", str(changed), "--address", server.url, cwd=app_dir)
    assert result.returncode == 0, result.stderr
    assert server.get("/greet").text == "goodbye"
    assert server.get("/greet", params={"instance": "1"}).text == instance


def test_bad_num_replicas_names_its_field_path(app_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        textwrap.dedent(
            """
            applications:
              - name: first
                route_prefix: /first
                import_path: greet:greeter
              - name: second
                route_prefix: /second
                import_path: greet:greeter
                deployments:
                  - name: Greeter
                    num_replicas: 0
            """
        )
    )
    result = tandem("run", str(config), "--port", str(free_port()), cwd=app_dir, timeout=20)
    assert_clear_failure(result, "applications[1].deployments[0].num_replicas")


ENV_APP = """
import json
import os
import tandem as serve

@serve.deployment(
    ray_actor_options={"runtime_env": {"env_vars": {"OWN": "mine", "BOTH": "deployment"}}}
)
class Env:
    def __call__(self, request) -> dict:
        return {name: os.environ.get(name) for name in ("APP", "OWN", "BOTH")}

app = Env.bind()
"""


def test_config_runtime_env_is_inherited_by_deployments(
    serve_cli: Any, app_dir: Path, tmp_path: Path
) -> None:
    (app_dir / "envs.py").write_text(ENV_APP)
    config = tmp_path / "serve.yaml"
    config.write_text(
        textwrap.dedent(
            """
            applications:
              - name: envs
                route_prefix: /
                import_path: envs:app
                runtime_env:
                  working_dir: .
                  env_vars: {APP: app, BOTH: app}
            """
        )
    )
    # Replica processes get the env_vars: the application's, under the deployment's own.
    server = serve_cli(str(config), "--backend", "process")
    assert server.get("/").json() == {"APP": "app", "OWN": "mine", "BOTH": "deployment"}
    log = server.output()
    assert "runtime_env working_dir, which the process backend does not apply" in log, log
    assert log.count("backend does not apply") == 1, log  # once per deployment


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "http_options:\n  port: not-a-port\napplications:\n  - name: a\n",
            ["http_options.port", "integer", "applications[0].import_path", "required"],
        ),
        (
            "applications:\n  - name: a\n    import_path: greet:app\n    route_prefix: nope\n",
            ["applications[0]", "route_prefix", "'/'"],
        ),
        ("applications: []\n", ["applications"]),
        ("applications:\n  - import_path: greet:app\n  bad: [\n", ["YAML"]),
    ],
)
def test_run_rejects_an_invalid_config_file(
    app_dir: Path, tmp_path: Path, text: str, words: list[str]
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    result = tandem("run", str(config), "--port", str(free_port()), cwd=app_dir, timeout=20)
    assert_clear_failure(result, "serve.yaml", *words)


def test_build_writes_a_config_that_run_serves_and_shutdown_stops_it(
    serve_cli: Any, app_dir: Path
) -> None:
    result = tandem("build", "greet:app", "-o", "built.yaml", cwd=app_dir, script=True)
    assert result.returncode == 0, result.stderr
    built = yaml.safe_load((app_dir / "built.yaml").read_text())
    [application] = built["applications"]
    assert application["import_path"] == "greet:app"
    assert application["route_prefix"] == "/"
    assert {d["name"] for d in application["deployments"]} == {"Front", "Responder"}

    server = serve_cli("built.yaml")
    assert server.post("/", json={"name": "Ana"}).text == "Hola Ana"

    result = tandem("shutdown", "--address", server.url, cwd=app_dir, script=True)
    assert result.returncode == 0, result.stderr
    assert server.wait_exit() == 0, server.output()


# -- failures a user can cause ------------------------------------------------------


def test_import_errors_fail_clearly(app_dir: Path) -> None:
    (app_dir / "broken.py").write_text("import not_installed_package\n")
    for target, words in (
        ("no_such_module:app", ["no_such_module"]),
        ("greet:no_such_app", ["greet", "no_such_app"]),
        ("broken:app", ["not_installed_package"]),
        ("greet", ["module:app"]),
    ):
        result = tandem("run", target, "--port", str(free_port()), cwd=app_dir, timeout=20)
        assert_clear_failure(result, *words)


def test_constructor_error_fails_with_the_deployment_name(app_dir: Path) -> None:
    (app_dir / "failing.py").write_text(
        "import tandem as serve\n\n"
        "@serve.deployment\n"
        "class Model:\n"
        "    def __init__(self):\n"
        "        raise RuntimeError('weights file is missing')\n\n"
        "app = Model.bind()\n"
    )
    result = tandem("run", "failing:app", "--port", str(free_port()), cwd=app_dir, timeout=30)
    assert result.returncode != 0
    assert "Model" in result.stderr and "weights file is missing" in result.stderr, result.stderr


def test_port_in_use_fails_clearly(app_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = tandem("run", "greet:app", "--port", str(port), cwd=app_dir, timeout=20)
    assert_clear_failure(result, str(port), "in use")


def test_commands_without_a_server_fail_clearly(app_dir: Path, tmp_path: Path) -> None:
    # A port held bound but not listening: refused, and no other test can take it meanwhile.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{held.getsockname()[1]}"
        result = tandem("status", "--address", address, cwd=app_dir)
        assert_clear_failure(result, address, "No tandem server")
        result = tandem("shutdown", "--address", address, cwd=app_dir, script=True)
        assert_clear_failure(result, address)
        config = write_config(tmp_path / "serve.yaml", 8000, "x")
        result = tandem("deploy", str(config), "--address", address, cwd=app_dir)
        assert_clear_failure(result, address)


def test_a_control_socket_left_by_a_killed_server_says_no_server_serves_the_address(
    app_dir: Path,
) -> None:
    from tandem._private.rundir import control_socket_path

    with socket.socket() as held:  # a port nothing serves, held so no other test takes it
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        stale = control_socket_path(port)
        stale.unlink(missing_ok=True)  # one an earlier run left for this port
        left = socket.socket(socket.AF_UNIX)  # bound, never listening: as a SIGKILLed server's
        try:
            left.bind(str(stale))
            address = f"http://127.0.0.1:{port}"
            result = tandem("status", "--address", address, cwd=app_dir)
            assert_clear_failure(result, f"No tandem server of yours serves {address}", str(stale))
        finally:
            left.close()
            stale.unlink(missing_ok=True)


# -- --reload ---------------------------------------------------------------------


RELOADABLE = """
import asyncio
from pathlib import Path

import tandem as serve


@serve.deployment
class Version:
    async def __call__(self, request) -> str:
        if request.query_params.get("started"):
            Path(request.query_params["started"]).touch()
        if request.query_params.get("sleep"):
            await asyncio.sleep(float(request.query_params["sleep"]))
        return "version one"


app = Version.bind()
"""


def wait_for_text(server: Server, want: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline and text != want:
        try:
            text = server.get("/", timeout=2).text
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return text


def test_reload_restarts_when_the_module_changes(serve_cli: Any, app_dir: Path) -> None:
    module = app_dir / "reloadable.py"
    module.write_text(RELOADABLE)
    server = serve_cli("reloadable:app", "--reload")
    assert server.get("/").text == "version one"

    module.write_text(RELOADABLE.replace("version one", "version two"))
    assert wait_for_text(server, "version two") == "version two", server.output()

    # A typo takes the server down with a clear error; tandem keeps watching for the fix.
    seen = len(server.output())
    module.write_text(RELOADABLE.replace("async def __call__", "async def __call__(("))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "Error" not in server.output()[seen:]:
        time.sleep(0.1)
    assert "reloadable.py" in server.output()[seen:], server.output()
    with pytest.raises(httpx.ConnectError):
        server.get("/-/healthz", timeout=1)
    assert server.proc.poll() is None, server.output()
    module.write_text(RELOADABLE.replace("version one", "version three"))
    assert wait_for_text(server, "version three") == "version three", server.output()

    server.ctrl_c()
    assert server.wait_exit() == 0, server.output()
    with pytest.raises(httpx.ConnectError):  # the served child stopped too
        server.get("/-/healthz", timeout=2)


def test_reload_ctrl_c_lets_in_flight_requests_finish(
    serve_cli: Any, app_dir: Path, tmp_path: Path
) -> None:
    (app_dir / "reloadable.py").write_text(RELOADABLE)
    server = serve_cli("reloadable:app", "--reload")
    # Outside app_dir: a file written there would reload the server.
    started = tmp_path / "request-started"
    answers: list[Any] = []

    def slow_request() -> None:
        try:
            params = {"sleep": "1", "started": str(started)}
            answers.append(server.get("/", params=params, timeout=15))
        except httpx.HTTPError as exc:
            answers.append(exc)

    client = threading.Thread(target=slow_request)
    client.start()
    # Ctrl-C once the request runs; before, a loaded machine may not have sent it yet.
    assert wait_for(started.exists, timeout_s=10), server.output()
    server.ctrl_c()
    client.join(timeout=15)
    assert server.wait_exit() == 0, server.output()
    [answer] = answers
    assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer


def test_reload_ctrl_c_stops_a_server_started_with_sigint_ignored(
    app_dir: Path, tmp_path: Path
) -> None:
    """`tandem run --reload ... &` in a script: a background job of a non-interactive
    shell starts with SIGINT ignored, yet Ctrl-C (kill -INT) stops the server process,
    so it must stop the watcher too."""
    (app_dir / "reloadable.py").write_text(RELOADABLE)
    port = free_port()
    ignoring_sigint = ["sh", "-c", 'trap "" INT; exec "$@"', "sh"]
    command = [*TANDEM_MODULE, "run", "reloadable:app", "--reload", "--port", str(port)]
    server = Server([*ignoring_sigint, *command], app_dir, tmp_path / "server.log", port)
    try:
        server.wait_ready()
        server.ctrl_c()
        assert server.wait_exit() == 0, server.output()
        with pytest.raises(httpx.ConnectError):  # the served child stopped too
            server.get("/-/healthz", timeout=2)
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("option", "value"),
    [("--address", "10.0.0.5:6379"), ("--working-dir", "."), ("--runtime-env-json", "{}")],
)
def test_ray_options_are_for_the_ray_backend_only(app_dir: Path, option: str, value: str) -> None:
    result = tandem(
        "run", "greet:app", "--backend", "process", option, value, cwd=app_dir, timeout=20
    )  # fmt: skip
    assert_clear_failure(result, option, "--backend ray")


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--runtime-env-json", "{pip: [emoji]}", ["--runtime-env-json", "not valid JSON"]),
        ("--runtime-env-json", '["emoji"]', ["--runtime-env-json", "JSON object"]),
        ("--working-dir", "no/such/dir", ["--working-dir", "'no/such/dir'", "not a directory"]),
    ],
)
def test_bad_ray_runtime_env_options_fail_before_anything_starts(
    app_dir: Path, option: str, value: str, words: list[str]
) -> None:
    result = tandem("run", "greet:app", option, value, cwd=app_dir, timeout=20)
    assert_clear_failure(result, *words)


def test_config_with_proxy_location_disabled_serves_no_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tandem
    from tandem._private.api import http_url
    from tandem._private.app.config_file import validate_config
    from tandem._private.cli.serving import ServeSession

    (tmp_path / "quiet_app.py").write_text(
        "import tandem as serve\n\n"
        "@serve.deployment\n"
        "def hello(name: str) -> str:\n"
        "    return f'hello {name}'\n\n"
        "app = hello.bind()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = validate_config(
        {
            "proxy_location": "Disabled",
            "http_options": {"port": 0},
            "applications": [{"name": "quiet", "import_path": "quiet_app:app"}],
        }
    )
    session = ServeSession("local")
    try:
        assert session.deploy(config) is None
        assert tandem.get_app_handle("quiet").remote("Dora").result() == "hello Dora"
        assert http_url() is None
    finally:
        session.close()
