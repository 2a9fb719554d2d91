"""Priority: which of the calls waiting for a replica goes first, in a caller's
router queue and in the replica's own queue for a slot.

A call's priority (``RequestMetadata.priority``, an int, 0 unless set; higher is
sent first) comes from ``handle.options(priority=...)``, or from the client
(``X-Request-Priority`` over HTTP, ``x-request-priority`` in gRPC metadata).
Calls made while serving a request inherit its priority unless their handle sets
one. Calls of equal priority are sent in the order they came.
"""

from __future__ import annotations

PRIORITY_MIN = -(2**31)
PRIORITY_MAX = 2**31 - 1


def checked(value: object) -> int:
    """``value`` as a priority; TypeError or ValueError if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"priority must be an int (higher is sent first), got {value!r}.")
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise ValueError(
            f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}, got {value}."
        )
    return value


def parsed(text: str, source: str) -> int:
    """The priority a client sent as ``text`` in ``source`` (a header's name); ValueError
    that says what was wrong if it is not one."""
    try:
        return checked(int(text.strip()))
    except (TypeError, ValueError):
        raise ValueError(
            f"{source} must be a whole number between {PRIORITY_MIN} and {PRIORITY_MAX} "
            f"(higher is served first), got {text[:40]!r}"
        ) from None
