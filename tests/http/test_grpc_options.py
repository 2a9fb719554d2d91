"""grpc_options as Ray Serve takes them, and the limits tandem adds, each with a
fresh server: the model and its defaults, servicer functions checked by start(),
request_timeout_s, the message size and concurrency caps, reflection, when a gRPC
server runs at all, and tandem without grpcio."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import tandem as serve
import tandem.config
import tandem.schema
from grpc_helpers import SERVICER, compile_user_proto, greeter_stub, pb
from helpers import eventually, wait_for
from tandem._private.api import grpc_address, http_url
from tandem.handle import DeploymentHandle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _protos(tmp_path_factory: pytest.TempPathFactory) -> None:
    compile_user_proto(tmp_path_factory.mktemp("protos"))


def grpc_start(**options: Any) -> None:
    serve.start(
        http_options={"port": 0},
        grpc_options={"port": 0, "grpc_servicer_functions": [SERVICER], **options},
    )


@pytest.fixture
def stub() -> Iterator[Any]:
    address = grpc_address()
    assert address is not None
    channel, stub = greeter_stub(address)
    with channel:
        yield stub


@serve.deployment
class Sleepy:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __call__(self, ask: Any) -> Any:
        return pb().Answer(greeting=f"{len(ask.blob)} bytes")

    async def Slow(self, ask: Any) -> Any:
        self.events.append("started")
        try:
            await asyncio.sleep(ask.sleep_s)
        except asyncio.CancelledError:
            self.events.append("cancelled")
            raise
        return pb().Answer(greeting="slept")

    def seen(self) -> list[str]:
        return list(self.events)


# -- the options ------------------------------------------------------------------


def test_grpc_options_have_ray_serves_fields_and_defaults() -> None:
    options = tandem.config.gRPCOptions()
    assert tandem.schema.gRPCOptionsSchema is tandem.config.gRPCOptions
    assert (options.port, options.grpc_servicer_functions) == (9000, [])
    assert (options.request_timeout_s, options.enable_reflection) == (None, True)
    given = tandem.config.gRPCOptions(port=9001, grpc_servicer_functions=("a.b",))
    assert given.grpc_servicer_functions == ["a.b"]
    with pytest.raises(ValueError, match="did you mean 'request_timeout_s'"):
        tandem.config.gRPCOptions(request_timeout=3)
    with pytest.raises(ValueError, match="port"):
        tandem.config.gRPCOptions(port=70000)


@pytest.mark.parametrize(
    ("functions", "words"),
    [
        (["nowhere_at_all.add_XServicer_to_server"], "Cannot import module 'nowhere_at_all'"),
        (["tandemtest_pb2_grpc.add_NoSuchServicer_to_server"], "has no attribute"),
        (["tandemtest_pb2.DESCRIPTOR"], "not a function"),
        (["tandemtest_pb2_grpc.GreeterStub"], "failed when tandem registered its service"),
    ],
)
def test_start_refuses_servicer_functions_that_serve_nothing(
    functions: list[str], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        serve.start(grpc_options={"grpc_servicer_functions": functions})


def test_no_grpc_server_without_servicer_functions_or_without_proxies() -> None:
    serve.start(http_options={"port": 0}, grpc_options={"port": 0})
    serve.run(Sleepy.bind(), backend="local")
    assert http_url() is not None and grpc_address() is None
    serve.shutdown()
    serve.start(proxy_location="Disabled", grpc_options={"grpc_servicer_functions": [SERVICER]})
    handle = serve.run(Sleepy.bind(), backend="local")
    assert handle.remote(pb().Ask(blob=b"ab")).result().greeting == "2 bytes"
    assert http_url() is None and grpc_address() is None


def test_start_restarts_grpc_with_new_options_and_shutdown_frees_the_port() -> None:
    grpc_start()
    serve.run(Sleepy.bind(), backend="local")
    first = grpc_address()
    port = free_port()
    serve.start(grpc_options={"port": port, "grpc_servicer_functions": [SERVICER]})
    assert grpc_address() == f"127.0.0.1:{port}" != first
    channel, stub = greeter_stub(f"127.0.0.1:{port}")
    with channel:
        assert stub.__call__(pb().Ask(blob=b"x")).greeting == "1 bytes"
    serve.shutdown()
    with socket.socket() as sock:  # nothing listens there any more
        # As a server binds (grpc does too): a connection the server closed first may
        # still be in TIME_WAIT on the port, which only a listener would conflict with.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_a_taken_port_is_a_warning_and_http_and_handles_still_serve(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve.start(
            http_options={"port": 0},
            grpc_options={"port": port, "grpc_servicer_functions": [SERVICER]},
        )
        with caplog.at_level(logging.WARNING, logger="tandem"):
            handle = serve.run(Sleepy.bind(), backend="local")
    assert grpc_address() is None and http_url() is not None
    assert any(f"Cannot serve gRPC on 127.0.0.1:{port}" in r.getMessage() for r in caplog.records)
    assert handle.remote(pb().Ask()).result().greeting == "0 bytes"


# -- timeouts and limits ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "process"])
def test_request_timeout_s_is_deadline_exceeded_and_cancels_the_ingress(backend: str) -> None:
    grpc_start(request_timeout_s=0.5)
    handle = serve.run(Sleepy.bind(), backend=backend)
    address = grpc_address()
    assert address is not None
    channel, stub = greeter_stub(address)
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.Slow(pb().Ask(sleep_s=30), metadata=(("request_id", "r-late"),), timeout=30)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.details() == "Request timed out after 0.5 s (request id r-late)."
    seen = eventually(lambda: handle.seen.remote().result(), lambda e: "cancelled" in e)
    assert seen == ["started", "cancelled"]


def test_a_message_over_max_message_bytes_is_resource_exhausted() -> None:
    grpc_start(max_message_bytes=1024)
    serve.run(Sleepy.bind(), backend="local")
    address = grpc_address()
    assert address is not None
    channel, stub = greeter_stub(address)
    with channel:
        assert stub.__call__(pb().Ask(blob=b"x" * 900)).greeting == "900 bytes"
        with pytest.raises(grpc.RpcError) as caught:
            stub.__call__(pb().Ask(blob=b"x" * 2000))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.__call__(pb().Ask()).greeting == "0 bytes"


def test_rpcs_past_max_concurrent_rpcs_are_resource_exhausted() -> None:
    grpc_start(max_concurrent_rpcs=1)
    handle = serve.run(Sleepy.bind(), backend="local")
    address = grpc_address()
    assert address is not None
    channel, stub = greeter_stub(address)
    with channel:
        held = stub.Slow.future(pb().Ask(sleep_s=30))
        assert wait_for(lambda: handle.seen.remote().result())
        with pytest.raises(grpc.RpcError) as caught:
            stub.__call__(pb().Ask())
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        held.cancel()
        assert eventually(lambda: handle.seen.remote().result(), lambda e: "cancelled" in e)
        assert wait_for(lambda: _answers(stub))


def _answers(stub: Any) -> bool:
    try:
        return bool(stub.__call__(pb().Ask()).greeting == "0 bytes")
    except grpc.RpcError:
        return False  # the cancelled RPC may still hold its place for a moment


@pytest.mark.parametrize("enabled", [True, False])
def test_reflection_lists_the_services_unless_disabled(enabled: bool) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    grpc_start(enable_reflection=enabled)
    serve.run(Sleepy.bind(), backend="local")
    address = grpc_address()
    assert address is not None
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        if enabled:
            services = set(database.get_services())
            assert "tandemtest.Greeter" in services
            assert "ray.serve.RayServeAPIService" not in services  # as Ray: users' services
        else:
            with pytest.raises(grpc.RpcError) as caught:
                list(database.get_services())
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- without grpcio --------------------------------------------------------------------

WITHOUT_GRPC = """
import sys

for name in ("grpc", "google.protobuf", "grpc_reflection"):
    sys.modules[name] = None  # as if not installed: importing them fails

import httpx
import tandem as serve
import tandem.config, tandem.grpc_util, tandem.schema
from tandem._private.api import http_url


@serve.deployment
def hello(request):
    return "hello"


serve.start(http_options={"port": 0}, grpc_options={"port": 0})
serve.run(hello.bind(), backend="local")
print(httpx.get(http_url()).text)
try:
    serve.start(grpc_options={"grpc_servicer_functions": ["user_pb2_grpc.add_X_to_server"]})
except ImportError as exc:
    print(exc)
serve.shutdown()
"""

GRPC_UNUSED = """
import sys
import httpx
import tandem as serve
from tandem._private.api import http_url


@serve.deployment
def hello(request):
    return "hello"


serve.start(http_options={"port": 0})
serve.run(hello.bind(), backend=sys.argv[1])
assert httpx.get(http_url()).text == "hello"
serve.shutdown()
print(sorted(m for m in sys.modules if m == "grpc" or m.startswith(("grpc.", "google.protobuf"))))
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_tandem_serves_http_without_grpcio_and_says_what_to_install() -> None:
    result = _python(WITHOUT_GRPC)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "hello"
    assert "Serving gRPC needs grpcio, protobuf, grpcio-reflection" in lines[1]
    assert "pip install 'tandem-serve[grpc]'" in lines[1]


@pytest.mark.parametrize("backend", ["local", "process"])
def test_grpcio_is_not_imported_unless_grpc_is_configured(backend: str) -> None:
    result = _python(GRPC_UNUSED, backend)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_handles_pass_protobuf_messages_across_processes() -> None:
    # What the gRPC proxy relies on: a message pickles to a replica elsewhere and back
    # (tests/http/test_grpc.py sends them through the proxy to Ray actors too).
    handle: DeploymentHandle[Any] = serve.run(Sleepy.bind(), backend="process")
    assert handle.remote(pb().Ask(blob=b"abc")).result().greeting == "3 bytes"


def test_grpc_input_stream_wraps_an_async_iterator_and_stops_when_cancelled() -> None:
    from tandem.grpc_util import gRPCInputStream

    async def numbers() -> Any:
        for i in range(5):
            yield i

    async def read() -> tuple[list[int], bool, bool]:
        stream: gRPCInputStream[int] = gRPCInputStream(numbers())
        seen = []
        async for number in stream:
            seen.append(number)
            if number == 2:
                stream.cancel()
        return seen, stream.is_cancelled(), stream.is_exhausted

    assert asyncio.run(read()) == ([0, 1, 2], True, True)
