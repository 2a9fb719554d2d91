"""An ingress replica's HTTP side: from an HTTP request's data to the user's answer.

``http.bridge`` does the ASGI work. It is imported on the first request, so a
replica that serves no HTTP never loads Starlette.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NamedTuple

from tandem._private.calls.flow import Last
from tandem._private.replica.admission import Slot
from tandem._private.replica.running import UserCode, takes_an_argument


class HTTPSide:
    """How one replica answers HTTP: through its class's ASGI app (``@ingress``), or
    by calling its ``__call__`` with a ``starlette.requests.Request``."""

    __slots__ = ("_is_ingress", "_takes_request", "_unavailable", "_user")

    def __init__(
        self, user: UserCode, is_ingress: bool, unavailable: Callable[[], Exception]
    ) -> None:
        self._user = user
        self._is_ingress = is_ingress
        self._unavailable = unavailable
        self._takes_request: bool | None = None  # known at the first request

    async def answer(self, args: tuple[Any, ...], slot: Slot) -> Last | AsyncGenerator[Any, None]:
        """Answer request data ``args[0]``: the whole response, or its stream (not begun)."""
        bridge, asgi_app = self._parts()
        if asgi_app is not None:
            return bridge.serve_http(args[0], None, asgi_app)
        return await bridge.answer(args[0], self._call(slot))

    def stream(self, args: tuple[Any, ...], slot: Slot) -> AsyncGenerator[Any, None]:
        """The ASGI messages of request data ``args[0]`` (with ``args[1]``, a WebSocket
        session's client messages)."""
        bridge, asgi_app = self._parts()
        data, inbound = args[0], (args[1] if len(args) > 1 else None)
        if asgi_app is not None:
            return bridge.serve_http(data, None, asgi_app, inbound)
        return bridge.serve_http(data, self._call(slot), None)

    def _parts(self) -> tuple[_Bridge, Any | None]:
        obj = self._user.obj
        if obj is None:
            raise self._unavailable()
        bridge = load_bridge()
        return bridge, bridge.asgi_app_for(obj) if self._is_ingress else None

    def _call(self, slot: Slot) -> Callable[[Any], Awaitable[Any]]:
        """The user's ``__call__``, as the bridge calls it with a request."""
        user = self._user
        method = user.method("__call__")
        if self._takes_request is None:
            self._takes_request = takes_an_argument(method.fn)
        with_request = self._takes_request

        async def call(request: Any) -> Any:
            args = (request,) if with_request else ()  # as Ray: `__call__(self)` gets none
            if method.is_generator:
                from starlette.responses import StreamingResponse

                return StreamingResponse(user.iterate(method, args, {}, slot))
            return await user.run(method, args, {}, slot)

        return call


class _Bridge(NamedTuple):
    answer: Callable[..., Awaitable[Last | AsyncGenerator[Any, None]]]  # http.bridge's
    serve_http: Callable[..., AsyncGenerator[Any, None]]  # http.bridge's
    asgi_app_for: Callable[[Any], Any | None]  # replica.ingress's


@functools.cache
def load_bridge() -> _Bridge:
    """Import the HTTP side (at a replica's start when it serves HTTP, else on first use)."""
    from tandem._private.http.bridge import answer, serve_http
    from tandem._private.replica.ingress import asgi_app_for

    return _Bridge(answer, serve_http, asgi_app_for)
