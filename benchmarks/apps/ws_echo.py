"""WebSocket echo, as a bare Starlette app (the baseline) and as a tandem ingress."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import tandem as serve


async def echo(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            await ws.send_text(await ws.receive_text())
    except WebSocketDisconnect:
        pass


bare = Starlette(routes=[WebSocketRoute("/ws", echo)])


@serve.deployment
@serve.ingress(Starlette(routes=[WebSocketRoute("/ws", echo)]))
class Echo:
    pass


app = Echo.bind()
