"""Route prefixes: which are valid, their one spelling, and that no two applications share one.

``tandem.run()``, config files and the controller all apply these rules, so a
prefix is accepted, spelled and refused the same way wherever it comes from.
"""

from __future__ import annotations

from collections.abc import Iterable

# Characters that would make a prefix a pattern, a query or a fragment rather than a path.
_NOT_IN_A_PREFIX = "{}?# "


def normalize_route_prefix(route_prefix: object) -> str | None:
    """The prefix in its one spelling (no trailing slash but "/" itself); None: no HTTP.

    Raises ValueError, saying what is wrong, for anything that is not a plain path.
    """
    if route_prefix is None:
        return None
    if not isinstance(route_prefix, str) or not route_prefix.startswith("/"):
        raise ValueError(f"route_prefix must start with '/', got {route_prefix!r}.")
    if any(c in route_prefix for c in _NOT_IN_A_PREFIX):
        raise ValueError(
            f"route_prefix must be a plain path without '{{', '}}', '?', '#' or spaces, "
            f"got {route_prefix!r}."
        )
    return route_prefix.rstrip("/") or "/"


def prefix_owner(
    route_prefix: str | None, app_name: str, claims: Iterable[tuple[str, str | None]]
) -> str | None:
    """The application other than ``app_name`` that already has ``route_prefix``, if any.

    ``claims`` are (application, route prefix) pairs; two applications never share
    a prefix, since a request could not tell which one it is for.
    """
    if route_prefix is None:
        return None
    for name, prefix in claims:
        if name != app_name and prefix == route_prefix:
            return name
    return None
