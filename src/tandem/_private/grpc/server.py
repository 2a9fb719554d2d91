"""A grpc.aio server on tandem's event loop, serving the gRPC proxy within its limits.

It runs on the runtime's loop (as uvicorn does for HTTP): an RPC's handler
awaits the call to the ingress directly, with no thread between them. Limits:
a request message over ``max_message_bytes`` and RPCs past
``max_concurrent_rpcs`` get RESOURCE_EXHAUSTED from grpc itself, and a new
connection must finish its HTTP/2 handshake within HANDSHAKE_TIMEOUT_S (as
HTTP's header timeout). Replies are not size-capped, as HTTP responses are not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from tandem._private.calls.runtime import Runtime
from tandem._private.grpc import api_service
from tandem._private.grpc.metrics import GRPCMetrics
from tandem._private.grpc.options import gRPCOptions
from tandem._private.grpc.proxy import GRPCProxy
from tandem._private.grpc.services import Method, read_services
from tandem._private.http.server import bind_socket

logger = logging.getLogger("tandem.proxy")

HANDSHAKE_TIMEOUT_S = 30.0


class GRPCServer:
    """Start with :meth:`start` (on the loop), stop with :meth:`stop`."""

    def __init__(self, proxy: GRPCProxy, options: gRPCOptions, host: str) -> None:
        self._proxy = proxy
        self._options = options
        self._host = host
        self._server: grpc.aio.Server | None = None
        self._port = 0

    @property
    def address(self) -> str:
        """``host:port`` as a client dials it."""
        return f"{_bracketed(self._host)}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        """Listen and serve; raises ValueError for servicer functions, OSError for the port."""
        options = self._options
        services = read_services(options.load_servicers())
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),  # else a second server could share a taken port
                ("grpc.max_receive_message_length", options.max_message_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT_S * 1000)),
            ],
            maximum_concurrent_rpcs=options.max_concurrent_rpcs,
        )
        for service, methods in services.items():
            _add(server, service, {m.name: self._handler(m) for m in methods})
        proxy = self._proxy
        _add(
            server,
            api_service.SERVICE,
            api_service.method_handlers(proxy.list_applications, proxy.healthz),
        )
        if options.enable_reflection:
            from grpc_reflection.v1alpha import reflection

            names = [*sorted(services), reflection.SERVICE_NAME]
            reflection.enable_server_reflection(names, server)
        self._port = _bind(server, self._host, options.port)
        await server.start()
        self._server = server

    def _handler(self, method: Method) -> grpc.RpcMethodHandler[Any, Any]:
        serve: Callable[..., Any] = self._proxy.handler(method)
        read = method.request_deserializer
        if method.client_streaming:
            make = (
                grpc.stream_stream_rpc_method_handler
                if method.server_streaming
                else grpc.stream_unary_rpc_method_handler
            )
            return make(serve, request_deserializer=read)
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(serve, request_deserializer=read)
        # No response_serializer: the proxy hands grpc the reply's bytes.
        return grpc.unary_unary_rpc_method_handler(serve, request_deserializer=read)

    async def stop(self, timeout_s: float = 20.0) -> None:
        """Stop taking RPCs; let those in flight finish (up to ``timeout_s``), then cancel them."""
        server, self._server = self._server, None
        if server is None:
            return
        self._proxy.draining = True
        await server.stop(timeout_s)


def _add(server: grpc.aio.Server, service: str, handlers: dict[str, Any]) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    # grpcio >= 1.62 finds registered methods without a lookup per RPC.
    register = getattr(server, "add_registered_method_handlers", None)
    if register is not None:
        register(service, handlers)


def _bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Listen on host:port; OSError naming the port and what to do if it is taken."""
    advice = "tandem run --grpc-port N, or grpc_options={'port': N}"
    if port:  # a clear error before grpc's (which also writes a line to stderr)
        bind_socket(host, port, what="gRPC", advice=advice).close()
    try:
        bound = server.add_insecure_port(f"{_bracketed(host)}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"Cannot serve gRPC on {host}:{port}. Choose another port ({advice}).")
    return bound


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def open_grpc(
    runtime: Runtime, options: gRPCOptions, host: str, metrics: GRPCMetrics
) -> GRPCServer:
    """Serve the runtime's applications over gRPC; runs on the runtime's loop."""
    controller = runtime.controller
    assert controller is not None
    server = GRPCServer(GRPCProxy(runtime, controller.routes, options, metrics), options, host)
    await server.start()
    return server
