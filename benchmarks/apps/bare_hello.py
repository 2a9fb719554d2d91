"""The hello app's HTTP work without tandem: a bare Starlette app (the baseline)."""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def hello(request: Request) -> PlainTextResponse:
    body = await request.json()
    language, name = body["language"], body["name"]
    if language == "spanish":
        return PlainTextResponse(f"Hola {name}")
    if language == "french":
        return PlainTextResponse(f"Bonjour {name}")
    return PlainTextResponse("Please try again.")


app = Starlette(routes=[Route("/", hello, methods=["POST"])])
