"""``@ingress(app)``: a deployment class that serves an ASGI app (FastAPI, Starlette...).

Routes declared with the class's own methods as endpoints
(``@app.get("/") def root(self): ...``, and ``@app.websocket`` ones) are
rewritten once, when the class is decorated: ``self`` becomes a dependency that
resolves to the instance of the replica serving the request. One app object
thus serves every replica, in any process, without copying it.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from tandem._private.calls.context import current_replica_context
from tandem._private.replica.running import takes_an_argument

C = TypeVar("C", bound=type)

INGRESS_APP_ATTR = "__tandem_ingress_app__"
# On an ingress class whose app comes from a builder: the builder, and the app it
# built in this process.
BUILDER_ATTR = "__tandem_ingress_builder__"
BUILT_APP_ATTR = "__tandem_ingress_built_app__"


def ingress(app: Any) -> Callable[[C], C]:
    """Class decorator: the deployment serves ``app``'s routes under its route_prefix.

    ``app`` is an ASGI app (e.g. a FastAPI app), or a function of no arguments
    that builds one (as in Ray Serve): it is then called where the replica runs,
    on its first request, so the app itself never has to travel.
    """
    if not callable(app):
        raise TypeError(
            f"@ingress takes an ASGI app (e.g. a FastAPI app) or a function that builds one, "
            f"got {type(app).__name__}."
        )

    def decorate(cls: C) -> C:
        if not inspect.isclass(cls):
            raise TypeError("@ingress decorates a class; put it under @deployment, on the class.")
        if _is_builder(app):
            setattr(cls, BUILDER_ATTR, app)
        else:
            _bind_method_routes(app, cls)
        setattr(cls, INGRESS_APP_ATTR, app)
        return cls

    return decorate


def asgi_app_for(instance: Any) -> Any | None:
    """The ASGI app an instance serves, or None if its class is not an ingress."""
    cls = type(instance)
    builder = getattr(cls, BUILDER_ATTR, None)
    if builder is None:
        return getattr(cls, INGRESS_APP_ATTR, None)
    built = cls.__dict__.get(BUILT_APP_ATTR)
    if built is None:
        built = builder()
        if not callable(built):
            raise TypeError(
                f"The @ingress builder {getattr(builder, '__qualname__', builder)!r} returned a "
                f"{type(built).__name__}; it must return an ASGI app (e.g. a FastAPI app)."
            )
        _bind_method_routes(built, cls)
        setattr(cls, BUILT_APP_ATTR, built)
    return built


def _is_builder(app: Any) -> bool:
    """A plain function that takes no argument builds the app (an ASGI app takes three)."""
    return inspect.isfunction(app) and not takes_an_argument(app)


async def _serving_instance() -> Any:
    context = current_replica_context()
    if context is None or context.servable_object is None:
        raise RuntimeError("This route runs only inside a tandem replica.")
    return context.servable_object


def _bind_method_routes(app: Any, cls: type) -> None:
    if "fastapi" not in sys.modules:
        # Not a FastAPI app (nothing imported FastAPI); importing it to find out
        # would cost time, and recent FastAPI imports OpenTelemetry.
        return
    try:
        from fastapi import Depends, FastAPI
        from fastapi.routing import APIRoute, APIWebSocketRoute
    except ImportError:  # without FastAPI there are no method routes to bind
        return
    if not isinstance(app, FastAPI):
        return
    functions = {value for value in vars(cls).values() if inspect.isfunction(value)}
    params = {
        kind: [
            p
            for p in inspect.signature(kind.__init__).parameters
            if p not in ("self", "path", "endpoint")
        ]
        for kind in (APIRoute, APIWebSocketRoute)
    }
    routes = app.router.routes
    changed = False
    for index, route in enumerate(routes):
        kind = type(route)
        if kind in params and getattr(route, "endpoint", None) in functions:
            assert isinstance(route, APIRoute | APIWebSocketRoute)
            endpoint = _with_instance(route.endpoint, Depends(_serving_instance))
            kwargs = {p: getattr(route, p) for p in params[kind] if hasattr(route, p)}
            routes[index] = kind(route.path, endpoint, **kwargs)
            changed = True
    if changed and hasattr(app.router, "_routes_version"):
        app.router._routes_version += 1  # FastAPI caches derived route lists by version


def _with_instance(method: Callable[..., Any], dependency: Any) -> Callable[..., Any]:
    """``method(self, ...)`` as an endpoint whose ``self`` comes from ``dependency``."""
    # Resolve string annotations (``from __future__ import annotations``) here, in
    # the method's own module: FastAPI would look them up in this one.
    signature = inspect.signature(method, eval_str=True)
    parameters = list(signature.parameters.values())
    if not parameters:
        raise TypeError(f"Route method {method.__qualname__} must take self.")
    first, rest = parameters[0], parameters[1:]
    keyword_only = [
        inspect.Parameter(first.name, inspect.Parameter.KEYWORD_ONLY, default=dependency),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in rest),
    ]
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def endpoint(**kwargs: Any) -> Any:
            return await method(kwargs.pop(first.name), **kwargs)

    else:

        @functools.wraps(method)
        def endpoint(**kwargs: Any) -> Any:
            return method(kwargs.pop(first.name), **kwargs)

    del endpoint.__wrapped__  # FastAPI must read the signature below, not the method's
    endpoint.__signature__ = signature.replace(parameters=keyword_only)  # type: ignore[attr-defined]
    return endpoint
