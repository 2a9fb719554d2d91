"""The replica's side of a gRPC request: Ray Serve's ``grpc_context`` argument.

The gRPC proxy sends each RPC's context (``tandem.grpc_util.RayServegRPCContext``,
plain data) among the call's keyword arguments, under CONTEXT_KEY. The replica
takes it out and passes it as ``grpc_context`` to a method that has a parameter
of that name. What the method set on it (status code, details, trailing
metadata) goes back with the reply, as a :class:`WithContext` (a stream's last
item is one, with no reply), since in another process the method changed a copy.
An exception raised after the method set a status code travels as a
``gRPCStatusError`` carrying that code, as on Ray Serve.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tandem.exceptions import gRPCStatusError

CONTEXT_KEY = "__tandem_grpc_context__"
ARGUMENT = "grpc_context"  # Ray Serve's name for the parameter


@dataclass
class WithContext:
    """A gRPC reply (None for a stream's end) and the context as the method left it."""

    context: Any
    reply: Any = None


def take_context(
    fn: Callable[..., Any], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], Any | None]:
    """The keyword arguments for ``fn``, and the RPC's context if the proxy sent one."""
    if CONTEXT_KEY not in kwargs:
        return kwargs, None
    kwargs = dict(kwargs)
    context = kwargs.pop(CONTEXT_KEY)
    if _takes_context(getattr(fn, "__func__", fn)):
        kwargs[ARGUMENT] = context
    return kwargs, context


def failure(context: Any, exc: BaseException) -> BaseException:
    """What a method's exception becomes: a gRPCStatusError if it set a status code."""
    code = context.code()
    if not code or isinstance(exc, gRPCStatusError):
        return exc
    return gRPCStatusError(exc, code, context.details() or None)


@functools.lru_cache(maxsize=1024)
def _takes_context(fn: Callable[..., Any]) -> bool:
    try:
        return ARGUMENT in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin, say)
        return False
