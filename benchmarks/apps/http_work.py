"""The HTTP benchmark's other work, bare (Starlette) and on tandem: a streaming
response of 100 chunks, and a 1 MB JSON request body parsed and summarised.

(The hello work is the seed's app, ``examples/hello.py``, and ``bare_hello.py``.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import tandem as serve

CHUNKS = 100
CHUNK = b"x" * 100 + b"\n"


async def chunks() -> AsyncIterator[bytes]:
    for _ in range(CHUNKS):
        yield CHUNK


async def summary(request: Request) -> dict[str, int]:
    body = json.loads(await request.body())
    return {"items": len(body["items"])}


async def bare_stream(request: Request) -> Response:
    return StreamingResponse(chunks(), media_type="text/plain")


async def bare_json(request: Request) -> Response:
    return JSONResponse(await summary(request))


bare = Starlette(
    routes=[
        Route("/stream", bare_stream, methods=["GET"]),
        Route("/json", bare_json, methods=["POST"]),
    ]
)


@serve.deployment
class Work:
    async def __call__(self, request: Request) -> Response | dict[str, int]:
        if request.url.path.endswith("/stream"):
            return StreamingResponse(chunks(), media_type="text/plain")
        return await summary(request)


app = Work.bind()
