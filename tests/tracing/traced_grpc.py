"""The driver of the gRPC tracing test, run in a process of its own:
``python traced_grpc.py FOLDER``. Its own code sets the global TracerProvider (spans
kept in memory) before tandem starts, and tandem traces into it; it serves a Greeter
over gRPC, sends one RPC with a client's traceparent and one that fails, then prints
the spans as one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from spans_to_files import record
from traced_app import CLIENT_SPAN_ID, CLIENT_TRACE_ID

import tandem as serve
from grpc_helpers import SERVICER, compile_user_proto, greeter_stub, pb
from tandem._private.api import grpc_address


@serve.deployment
class Greeter:
    def __call__(self, ask: Any) -> Any:
        return pb().Answer(greeting=f"Hello {ask.name}")

    def Fail(self, ask: Any) -> Any:
        raise ValueError(f"no greeting for {ask.name}")


def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    compile_user_proto(Path(sys.argv[1]))
    serve.start(grpc_options={"port": 0, "grpc_servicer_functions": [SERVICER]})
    serve.run(Greeter.bind(), backend="local")
    address = grpc_address()
    assert address is not None
    channel, stub = greeter_stub(address)
    with channel:
        traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
        stub.__call__(pb().Ask(name="Dora"), metadata=(("traceparent", traceparent),))
        try:
            stub.Fail(pb().Ask(name="Dora"))
        except grpc.RpcError:
            pass
    serve.shutdown()
    print(json.dumps([record(span) for span in exporter.get_finished_spans()]))


if __name__ == "__main__":
    main()
