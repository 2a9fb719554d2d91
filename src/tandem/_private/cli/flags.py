"""Groups of ``tandem run``'s flags, kept apart so the command reads as a whole."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

# The data address of the server the control commands (status, deploy, ...) talk to.
DEFAULT_ADDRESS = "http://127.0.0.1:8000"

_GRPC = [
    click.option(
        "--grpc-port",
        type=click.IntRange(0, 65535),
        default=None,
        help="Port of the gRPC proxy, when there are servicer functions [default: 9000].",
    ),
    click.option(
        "--grpc-servicer-functions",
        multiple=True,
        help="Import path of a generated add_XServicer_to_server function whose service the gRPC "
        "proxy serves (repeat for several); none: no gRPC server.",
    ),
    click.option(
        "--grpc-request-timeout-s",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Answer DEADLINE_EXCEEDED to an RPC still running after this long.",
    ),
    click.option(
        "--grpc-enable-reflection/--grpc-disable-reflection",
        default=None,
        help="Serve gRPC server reflection for the services [default: enabled].",
    ),
]


def grpc_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """The gRPC proxy's flags (``--grpc-*``)."""
    for option in reversed(_GRPC):
        command = option(command)
    return command


def control_options(command: Any) -> Any:
    """--address, --control and --token-file: how the CLI reaches a server's control endpoint."""
    command = click.option(
        "--token-file",
        default=None,
        help="File holding the token of a server's TCP control port "
        "[default: $TANDEM_CONTROL_TOKEN].",
    )(command)
    command = click.option(
        "--control",
        default=None,
        help="The control endpoint of a server on another machine: http://HOST:PORT (its "
        "control port, or one forwarded to its control socket) or unix:PATH.",
    )(command)
    return click.option(
        "--address",
        default=DEFAULT_ADDRESS,
        show_default=True,
        help="The server's HTTP address; its control socket is found from the port.",
    )(command)
