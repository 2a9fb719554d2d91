"""The gRPC unary work of benchmarks/grpc_unary.py, bare and as a tandem ingress.

``bench_pb2`` is compiled by the benchmark into a folder on PYTHONPATH. The bare
server is grpcio's asyncio server on uvloop, the loop tandem runs on.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import bench_pb2
import bench_pb2_grpc

import tandem as serve


def greet(ask: Any) -> Any:
    return bench_pb2.Answer(greeting=f"Hello {ask.name}", num=ask.num * 2)


@serve.deployment(max_ongoing_requests=1000)
class Greeter:
    async def __call__(self, ask: Any) -> Any:
        return greet(ask)


app = Greeter.bind()


class BareGreeter(bench_pb2_grpc.BenchServicer):
    async def __call__(self, ask: Any, context: Any) -> Any:
        return greet(ask)


async def serve_bare(port: int) -> None:
    import grpc

    server = grpc.aio.server()
    bench_pb2_grpc.add_BenchServicer_to_server(BareGreeter(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    try:
        asyncio.run(serve_bare(int(sys.argv[1])))
    except KeyboardInterrupt:
        pass
