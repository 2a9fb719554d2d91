"""An exception's traceback text, carried from a replica actor to its caller.

Ray keeps only its own rendering of a remote traceback; the actor attaches the
full text to the exception (:func:`with_traceback`, :func:`attach_traceback`)
and the caller takes it off again (:func:`take_traceback`), to show it as the
process backend does. Both sides import this module, and it imports neither.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

# The attribute that carries an exception's traceback text to the caller.
TRACEBACK_ATTRIBUTE = "_tandem_traceback"

T = TypeVar("T")


def attach_traceback(exc: BaseException) -> None:
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        setattr(exc, TRACEBACK_ATTRIBUTE, text)
    except Exception:  # an exception type that takes no attributes: Ray's text will do
        pass


def take_traceback(exc: BaseException) -> str | None:
    """The traceback text the actor attached to ``exc`` (removed from it), if any."""
    text = exc.__dict__.pop(TRACEBACK_ATTRIBUTE, None) if hasattr(exc, "__dict__") else None
    return text if isinstance(text, str) else None


def with_traceback(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An actor method whose exceptions leave with their traceback text attached."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await method(*args, **kwargs)
        except Exception as exc:
            attach_traceback(exc)
            raise

    return wrapper
