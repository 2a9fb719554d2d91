"""gRPC from the command line: ``tandem run`` serves it from a config file's
grpc_options or from flags, ``tandem status`` says where, and mistakes (a servicer
function that does not import, a taken port, new grpc_options for a running
server) fail clearly."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from grpc_helpers import SERVICER, compile_user_proto, greeter_stub, pb, write_user_proto
from helpers import TANDEM_MODULE, Server, Servers, assert_clear_failure, free_port, tandem

APP = """
import tandem as serve
import tandemtest_pb2 as pb


@serve.deployment
class Hello:
    def __call__(self, ask):
        return pb.Answer(greeting=f"Hello {ask.name}")


app = Hello.bind()
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """The user's folder: their compiled protos and application, where tandem runs."""
    folder = tmp_path / "app"
    write_user_proto(folder)
    (folder / "hello_grpc.py").write_text(APP)
    compile_user_proto(tmp_path / "client")  # the test's own client imports them too
    return folder


@pytest.fixture
def servers(app_dir: Path, tmp_path: Path) -> Iterator[Servers]:
    started = Servers(app_dir, tmp_path)
    yield started
    started.kill_all()


def greet(address: str, name: str) -> str:
    channel, stub = greeter_stub(address)
    with channel:
        return str(stub.__call__(pb().Ask(name=name), timeout=10).greeting)


def write_config(path: Path, port: int, grpc_port: int) -> Path:
    config: dict[str, Any] = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [SERVICER]},
        "applications": [{"name": "hello", "import_path": "hello_grpc:app"}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_file_serves_grpc_status_shows_it_and_deploy_keeps_its_options(
    servers: Servers, app_dir: Path, tmp_path: Path
) -> None:
    port, grpc_port = free_port(), free_port()
    config = write_config(tmp_path / "serve.yaml", port, grpc_port)
    server = servers.start([*TANDEM_MODULE, "run", str(config)], port)
    assert greet(f"127.0.0.1:{grpc_port}", "file") == "Hello file"
    assert f"gRPC at 127.0.0.1:{grpc_port}" in server.output()

    status = tandem("status", "--address", server.url, cwd=app_dir)
    assert status.returncode == 0, status.stderr
    assert yaml.safe_load(status.stdout)["grpc"] == {"address": f"127.0.0.1:{grpc_port}"}

    changed = write_config(tmp_path / "changed.yaml", port, free_port())
    refused = tandem("deploy", str(changed), "--address", server.url, cwd=app_dir)
    assert_clear_failure(refused, "grpc_options cannot change while the server runs")
    assert greet(f"127.0.0.1:{grpc_port}", "still") == "Hello still"


def test_run_flags_serve_grpc(servers: Servers) -> None:
    port, grpc_port = free_port(), free_port()
    command = [*TANDEM_MODULE, "run", "hello_grpc:app", "--port", str(port)]
    command += ["--grpc-port", str(grpc_port), "--grpc-servicer-functions", SERVICER]
    server: Server = servers.start(command, port)
    assert greet(f"127.0.0.1:{grpc_port}", "flags") == "Hello flags"
    server.ctrl_c()
    assert server.wait_exit() == 0, server.output()


def test_run_fails_clearly_for_a_bad_servicer_or_a_taken_grpc_port(app_dir: Path) -> None:
    bad = tandem(
        "run",
        "hello_grpc:app",
        "--port",
        str(free_port()),
        "--grpc-servicer-functions",
        "tandemtest_pb2_grpc.add_Nothing_to_server",
        cwd=app_dir,
    )
    assert_clear_failure(bad, "grpc_servicer_functions", "add_Nothing_to_server")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = taken.getsockname()[1]
        busy = tandem(
            "run",
            "hello_grpc:app",
            "--port",
            str(free_port()),
            "--grpc-port",
            str(grpc_port),
            "--grpc-servicer-functions",
            SERVICER,
            cwd=app_dir,
        )
    assert_clear_failure(busy, f"Cannot serve gRPC on 127.0.0.1:{grpc_port}", "--grpc-port")


def test_build_writes_grpc_options(app_dir: Path) -> None:
    built = tandem("build", "hello_grpc:app", "--grpc-servicer-functions", SERVICER, cwd=app_dir)
    assert built.returncode == 0, built.stderr
    config = yaml.safe_load(built.stdout)
    assert config["grpc_options"] == {"port": 9000, "grpc_servicer_functions": [SERVICER]}
