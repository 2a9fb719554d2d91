"""What the gRPC tests share: a small user proto compiled with grpcio-tools (as a
user compiles theirs), a client for Ray Serve's own API service built from its
messages' descriptors, and readers for /metrics.

The user proto's modules (``tandemtest_pb2``, ``tandemtest_pb2_grpc``) land in a
folder put on ``sys.path``, so replicas in other processes import them too (they
take the driver's path when they start).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc

USER_PROTO = """
syntax = "proto3";
package tandemtest;

message Ask {
  string name = 1;
  int64 num = 2;
  double sleep_s = 3;
  bytes blob = 4;
}

message Answer {
  string greeting = 1;
  int64 num = 2;
}

service Greeter {
  rpc __call__(Ask) returns (Answer);
  rpc Streaming(Ask) returns (stream Answer);
  rpc Fail(Ask) returns (Answer);
  rpc FailStreaming(Ask) returns (stream Answer);
  rpc Slow(Ask) returns (Answer);
  rpc Wrong(Ask) returns (Answer);
  rpc Whoami(Ask) returns (Answer);
  rpc Upload(stream Ask) returns (Answer);
  rpc Chat(stream Ask) returns (stream Answer);
  rpc Status(Ask) returns (Answer);
  rpc StatusStreaming(Ask) returns (stream Answer);
  rpc FailWithStatus(Ask) returns (Answer);
}
"""

SERVICER = "tandemtest_pb2_grpc.add_GreeterServicer_to_server"

# Ray Serve's serve.proto, the part its gRPC proxy serves: package, service, methods
# and messages as Ray defines them.
RAY_SERVE_API_PROTO = """
syntax = "proto3";
package ray.serve;

message ListApplicationsRequest {}
message ListApplicationsResponse { repeated string application_names = 1; }
message HealthzRequest {}
message HealthzResponse { string message = 1; }

service RayServeAPIService {
  rpc ListApplications(ListApplicationsRequest) returns (ListApplicationsResponse);
  rpc Healthz(HealthzRequest) returns (HealthzResponse);
}
"""

_compiled: Path | None = None


def compile_user_proto(folder: Path) -> Path:
    """Compile USER_PROTO into ``folder`` (once per process) and put it on sys.path."""
    global _compiled
    if _compiled is None:
        write_user_proto(folder)
        sys.path.insert(0, str(folder))
        _compiled = folder
    return _compiled


def write_user_proto(folder: Path) -> None:
    """Compile USER_PROTO into ``folder``, as a user runs grpc_tools.protoc."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tandemtest.proto").write_text(USER_PROTO)
    _protoc(folder, "tandemtest.proto", "--python_out", "--grpc_python_out")


def _protoc(folder: Path, proto: str, *outputs: str, extra: tuple[str, ...] = ()) -> None:
    args = ["grpc_tools.protoc", f"-I{folder}", *(f"{o}={folder}" for o in outputs), *extra]
    code = protoc.main([*args, str(folder / proto)])
    assert code == 0, f"protoc failed on {proto}"


def pb() -> Any:
    import tandemtest_pb2

    return tandemtest_pb2


def greeter_stub(address: str) -> tuple[grpc.Channel, Any]:
    import tandemtest_pb2_grpc

    channel = grpc.insecure_channel(address)
    return channel, tandemtest_pb2_grpc.GreeterStub(channel)


class RayServeAPIClient:
    """A client of ``ray.serve.RayServeAPIService`` built from RAY_SERVE_API_PROTO's
    descriptors, in a pool of its own (no clash with Ray's generated module)."""

    def __init__(self, channel: grpc.Channel, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "serve_api.proto").write_text(RAY_SERVE_API_PROTO)
        out = folder / "serve_api.desc"
        _protoc(folder, "serve_api.proto", extra=(f"--descriptor_set_out={out}",))
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
        pool = descriptor_pool.DescriptorPool()
        for file in files.file:
            pool.Add(file)
        self.messages = {
            name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"ray.serve.{name}"))
            for name in ("ListApplicationsRequest", "ListApplicationsResponse")
            + ("HealthzRequest", "HealthzResponse")
        }
        service = "/ray.serve.RayServeAPIService/"
        self.list_applications = channel.unary_unary(
            service + "ListApplications",
            request_serializer=self.messages["ListApplicationsRequest"].SerializeToString,
            response_deserializer=self.messages["ListApplicationsResponse"].FromString,
        )
        self.healthz = channel.unary_unary(
            service + "Healthz",
            request_serializer=self.messages["HealthzRequest"].SerializeToString,
            response_deserializer=self.messages["HealthzResponse"].FromString,
        )


def trailing(error_or_call: Any) -> dict[str, str]:
    """The trailing metadata of a call (or of the RpcError it raised), as a dict."""
    return dict(error_or_call.trailing_metadata() or ())
