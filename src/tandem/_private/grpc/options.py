"""gRPC options (Ray Serve's ``grpc_options``), validated once at the edge.

Ray Serve's fields keep their meaning: the port, the import paths of the
``add_XServicer_to_server`` functions of the services to serve (none: no gRPC
server, as in Ray Serve), the request timeout and server reflection. tandem's
own limits have safe defaults, named below: the size of a request message and
the number of RPCs in flight. The gRPC server listens on the interface HTTP
listens on (``http_options.host``), where Ray Serve's listens on every one.

This module imports without grpcio: options can be read and checked anywhere;
:meth:`gRPCOptions.load_servicers` says what to install when grpcio is missing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tandem._private.app.importing import import_attribute
from tandem._private.http.options import known_names

DEFAULT_GRPC_PORT = 9000
# As HTTP's body limit: a request message past it gets RESOURCE_EXHAUSTED before it
# is buffered whole (grpcio's own default, 4 MiB, refuses ordinary tensors).
DEFAULT_MAX_MESSAGE_BYTES = 100 * 1024 * 1024
# RPCs in flight past this get RESOURCE_EXHAUSTED at once (each holds its request and
# a task; HTTP's equivalent is its connection cap).
DEFAULT_MAX_CONCURRENT_RPCS = 10_000
INSTALL_HINT = "pip install 'tandem-serve[grpc]'"


class gRPCOptions(BaseModel):
    """Where the gRPC proxy listens, which services it serves, and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(default=DEFAULT_GRPC_PORT, ge=0, le=65535)
    """Port of the gRPC server (0 picks a free one)."""
    grpc_servicer_functions: list[str] = Field(default_factory=list)
    """Import paths of the generated ``add_XServicer_to_server`` functions of the services
    to serve (e.g. ``"user_pb2_grpc.add_UserServiceServicer_to_server"``); none: no gRPC
    server is started."""
    request_timeout_s: float | None = Field(default=None, gt=0)
    """An RPC still running after this many seconds gets DEADLINE_EXCEEDED and is
    cancelled wherever it reached (None: only the client's deadline, if it set one)."""
    enable_reflection: bool = True
    """Serve the gRPC server reflection protocol (for grpcurl, grpcui) for the services."""
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1)
    """A request message larger than this gets RESOURCE_EXHAUSTED (tandem's own limit)."""
    max_concurrent_rpcs: int | None = Field(default=DEFAULT_MAX_CONCURRENT_RPCS, ge=1)
    """RPCs in flight past this get RESOURCE_EXHAUSTED (tandem's own limit; None: none)."""

    @property
    def serves(self) -> bool:
        """Whether these options start a gRPC server (Ray Serve's rule: servicer functions)."""
        return bool(self.grpc_servicer_functions)

    @property
    def grpc_servicer_func_callable(self) -> list[Callable[..., Any]]:
        """The servicer functions, imported (Ray Serve's property)."""
        return self.load_servicers()

    def load_servicers(self) -> list[Callable[..., Any]]:
        """Import the servicer functions; ValueError (or ImportError naming the extra to
        install) says what is wrong."""
        if not self.serves:
            return []
        require_grpc(self.enable_reflection)
        functions = []
        for path in self.grpc_servicer_functions:
            try:
                function = import_attribute(path)
            except ValueError as exc:
                raise ValueError(f"grpc_servicer_functions: {exc}") from None
            if not callable(function):
                raise ValueError(
                    f"grpc_servicer_functions: {path!r} is a {type(function).__name__}, not a "
                    "function; name the generated add_XServicer_to_server function."
                )
            functions.append(function)
        return functions

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, data: Any) -> Any:
        return known_names(data, cls.model_fields, "gRPC")


def require_grpc(reflection: bool = False) -> None:
    """ImportError naming the extra to install, if what serving gRPC needs is missing."""
    needed = ["grpc", "google.protobuf", *(["grpc_reflection"] if reflection else [])]
    missing = [name for name in needed if not _importable(name)]
    if missing:
        without = " (or set enable_reflection to False)" if missing == ["grpc_reflection"] else ""
        raise ImportError(
            f"Serving gRPC needs {', '.join(_DISTRIBUTIONS[m] for m in missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}{without}."
        )


_DISTRIBUTIONS = {
    "grpc": "grpcio",
    "google.protobuf": "protobuf",
    "grpc_reflection": "grpcio-reflection",
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a blocked import
        return False
