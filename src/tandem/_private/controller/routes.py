"""The route table: which application, by its ingress deployment, serves each route prefix.

The controller rebuilds it whenever an application comes, goes or changes, and
the HTTP proxy reads it on every request, so it is an immutable tuple that is
replaced, never changed in place. What makes a prefix valid, and that two
applications never share one, is :mod:`tandem._private.app.routes`.
"""

from __future__ import annotations

from collections.abc import Mapping

from tandem._private.app.routes import prefix_owner
from tandem._private.app.spec import ApplicationSpec
from tandem._private.controller.records import ApplicationRecord
from tandem._private.controller.status import ApplicationState

# (route prefix, application, ingress deployment)
Route = tuple[str, str, str]


class RouteTable:
    """Route prefix → application and ingress of every running application."""

    def __init__(self) -> None:
        self._routes: tuple[Route, ...] = ()

    def routes(self) -> tuple[Route, ...]:
        """(prefix, application, ingress) of every running application, longest prefix first."""
        return self._routes

    def prefixes(self) -> dict[str, str]:
        """Route prefix → application."""
        return {prefix: app for prefix, app, _ in self._routes}

    def rebuild(self, apps: Mapping[str, ApplicationRecord]) -> None:
        """The table for ``apps``; an application being deleted takes no more requests."""
        table = [
            (app.spec.route_prefix, name, app.spec.ingress)
            for name, app in apps.items()
            if app.spec.route_prefix is not None and app.status != ApplicationState.DELETING
        ]
        # The longest prefix first: the proxy takes the first that matches.
        table.sort(key=lambda route: len(route[0]), reverse=True)
        self._routes = tuple(table)


def check_prefix_free(spec: ApplicationSpec, apps: Mapping[str, ApplicationRecord]) -> None:
    """Raise ValueError if another application in ``apps`` has the prefix ``spec`` asks for."""
    owner = prefix_owner(
        spec.route_prefix, spec.name, ((name, app.spec.route_prefix) for name, app in apps.items())
    )
    if owner is not None:
        raise ValueError(
            f"Route prefix {spec.route_prefix!r} is already used by application "
            f"{owner!r}; choose another route_prefix or delete that application first."
        )
