"""What the driver's runtime holds of the controller: the operations others call on it.

The runtime only keeps the controller (in the driver, for the API, the CLI's
serving session and the HTTP side to find); it calls none of this itself. As a
Protocol here, it lets the calls layer name the controller without importing
it: the controller depends on calls, never the other way round.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from tandem._private.app.options import DeploymentOptions
from tandem._private.app.spec import ApplicationSpec
from tandem._private.controller.status import Status

# (application, deployment, reason) -> how often it happened, for /metrics.
EventCounts = dict[tuple[str, str, str], int]


class ControlPlane(Protocol):
    """Deploys, deletes and reports on applications (see the controller)."""

    @property
    def replica_restarts(self) -> EventCounts: ...

    @property
    def start_failures(self) -> EventCounts: ...

    async def deploy(self, spec: ApplicationSpec) -> None: ...

    async def delete(self, name: str) -> bool: ...

    async def scale(self, app_name: str, deployment: str, target: int) -> None: ...

    async def close(self) -> None: ...

    async def refresh_reports(self, timeout_s: float = 0.5) -> None: ...

    def status(self) -> Status: ...

    def overview(self) -> dict[str, Any]: ...  # what the dashboard draws

    async def recent_logs(
        self,
        app: str | None = None,
        deployment: str | None = None,
        replica: str | None = None,
        request_id: str | None = None,
        limit: int = 100,
        after: dict[str, int] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, int]]: ...  # (lines, cursors)

    def app_names(self) -> list[str]: ...

    def ingress(self, app_name: str) -> str | None: ...

    def routes(self) -> tuple[tuple[str, str, str], ...]: ...

    def route_prefixes(self) -> dict[str, str]: ...

    def deployment_options(self, app_name: str, deployment: str) -> DeploymentOptions | None: ...

    def deployment_series(self) -> list[tuple[str, str, str, Any]]: ...

    def replica_rows(self) -> list[Any]: ...  # stats.ReplicaRow

    def queued_requests(self) -> dict[tuple[str, str], int]: ...

    def user_metrics(self) -> list[tuple[str, Any]]: ...

    # Called after every change of the route table.
    routes_changed: list[Callable[[], None]]

    def proxy_counts(self) -> dict[str, Any]: ...

    def serve_direct(self, plan: Any, metrics: Callable[[], Awaitable[bytes]] | None) -> None: ...
