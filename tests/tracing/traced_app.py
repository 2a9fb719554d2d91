"""The driver the tracing tests run in a subprocess (a process of its own: OpenTelemetry's
global provider is set once per process). ``python traced_app.py BACKEND`` serves
Front -> Inner over HTTP, sends two requests (one with a client's traceparent, one
that fails in Inner) and a handle call, then prints one JSON line of what it saw."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.sync.client import connect

import tandem as serve
from tandem._private.api import http_url
from tandem.handle import DeploymentHandle

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
CLIENT_TRACE_STATE = "tandemtest=t61rcWkgMzE"
SESSION_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def opentelemetry_modules() -> list[str]:
    return sorted(name for name in sys.modules if name.startswith("opentelemetry"))


def user_span(name: str, context: Any = None) -> str:
    """Start and end a span of the user's own (tracing on only); its parent's span id."""
    from opentelemetry import trace

    with trace.get_tracer("user").start_as_current_span(name, context=context) as span:
        parent = span.parent  # type: ignore[attr-defined]
        return f"{parent.span_id:016x}" if parent is not None else ""


@serve.deployment
class Inner:
    def double(self, x: int) -> int:  # sync: runs in a worker thread (or inline)
        if serve.get_trace_context() is not None:
            user_span("user double")
        if x < 0:
            raise ValueError("no negative numbers")
        return 2 * x

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    def modules(self) -> list[str]:
        return opentelemetry_modules()


@serve.deployment
class Front:
    def __init__(self, inner: DeploymentHandle) -> None:
        self._inner = inner

    async def __call__(self, request: Request) -> dict[str, Any]:
        x = int(request.query_params["x"])
        context = serve.get_trace_context()
        context_span = ""
        if context is not None:
            from opentelemetry import trace

            context_span = f"{trace.get_current_span(context).get_span_context().span_id:016x}"
            user_span("user work", context)
        items = [i async for i in self._inner.options(stream=True).count.remote(2)]
        doubled = await self._inner.double.remote(x)
        return {"doubled": doubled, "items": items, "context_span": context_span}


async def shout(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text((await websocket.receive_text()).upper())
    await websocket.close()


@serve.deployment
@serve.ingress(Starlette(routes=[WebSocketRoute("/", shout)]))
class Sockets:
    pass


def main() -> None:
    serve.start(http_options={"port": 0})
    serve.run(Front.bind(Inner.bind()), backend=sys.argv[1])
    serve.run(Sockets.bind(), name="ws", route_prefix="/ws", backend=sys.argv[1])
    url = http_url()
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    headers = {"traceparent": traceparent, "tracestate": CLIENT_TRACE_STATE}
    ok = httpx.get(f"{url}/?x=3", headers=headers, timeout=30)
    failed = httpx.get(f"{url}/?x=-1", timeout=30)
    session = {"traceparent": f"00-{SESSION_TRACE_ID}-{CLIENT_SPAN_ID}-01"}
    with connect(url.replace("http", "ws", 1) + "/ws/", additional_headers=session) as ws:
        ws.send("hola")
        shouted = ws.recv()
    inner = serve.get_deployment_handle("Inner", "default")
    seen = {
        "ok": ok.json(),
        "failed": failed.status_code,
        "shouted": shouted,
        "replica_modules": inner.modules.remote().result(),
        "driver_modules": opentelemetry_modules(),
    }
    serve.shutdown()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
