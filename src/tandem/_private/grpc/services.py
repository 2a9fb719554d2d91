"""The users' services a gRPC server serves, read from their servicer functions.

A generated ``add_XServicer_to_server(servicer, server)`` registers, for each
method of service X, a handler that reads the request, calls the servicer's
method of that name and writes the reply. tandem runs it with a stand-in for
the server (:class:`_Recorder`) and a servicer that has every method, and keeps
what the proxy needs of each method: its names, whether it streams either way,
and how its request messages are read. The proxy serves the methods itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    """One RPC method of a user's service."""

    name: str
    service: str
    server_streaming: bool = False
    client_streaming: bool = False
    request_deserializer: Callable[[bytes], Any] | None = None

    @property
    def path(self) -> str:
        """The method's full name on the wire: ``/package.Service/Method``."""
        return f"/{self.service}/{self.name}"


def read_services(functions: Iterable[Callable[..., Any]]) -> dict[str, list[Method]]:
    """Each service's methods, by full service name, as the servicer functions register
    them; ValueError if one registers something else than generated code does."""
    recorder = _Recorder()
    for function in functions:
        name = getattr(function, "__qualname__", repr(function))
        try:
            function(_AnyServicer(), recorder)
        except Exception as exc:
            raise ValueError(
                f"grpc_servicer_functions: {name} failed when tandem registered its service "
                f"({type(exc).__name__}: {exc}); name a generated add_XServicer_to_server "
                "function."
            ) from exc
        if not recorder.took_any:
            raise ValueError(
                f"grpc_servicer_functions: {name} registered no service; name a generated "
                "add_XServicer_to_server function."
            )
        recorder.took_any = False
    return {service: list(methods.values()) for service, methods in recorder.services.items()}


def _unused(*args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called
    raise RuntimeError("tandem serves this method itself")


class _AnyServicer:
    """A servicer with every method: the generated function only looks them up."""

    def __getattr__(self, name: str) -> Any:
        return _unused


class _Recorder:
    """Stands in for a grpc server while a servicer function registers its handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Method]] = {}
        self.took_any = False

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self._add(service, name, handler)

    def add_generic_rpc_handlers(self, generic_handlers: Iterable[Any]) -> None:
        for generic in generic_handlers:
            # grpc's own generic handler (what generated code makes) keeps its methods by
            # full path; a handler of another kind cannot be listed.
            methods = getattr(generic, "_method_handlers", None)
            if not isinstance(methods, dict):
                raise TypeError(
                    f"it registered a {type(generic).__name__}, whose methods tandem cannot list"
                )
            for path, handler in methods.items():
                service, _, name = str(path).lstrip("/").partition("/")
                self._add(service, name, handler)

    def _add(self, service: str, name: str, handler: Any) -> None:
        self.took_any = True
        self.services.setdefault(service, {})[name] = Method(
            name=name,
            service=service,
            server_streaming=bool(handler.response_streaming),
            client_streaming=bool(handler.request_streaming),
            request_deserializer=handler.request_deserializer,
        )
