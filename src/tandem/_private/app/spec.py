"""What an application is to the controller: its deployments, each with its code,
arguments and options, in the order they must start.

Plain records, built by :mod:`tandem._private.app.graph`; nothing here imports
user code or starts anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tandem._private.app.autoscaling_config import AutoscalingPolicy
from tandem._private.app.options import DeploymentOptions

_AT_START = (
    "logging_config",
    "placement_group_bundles",
    "placement_group_strategy",
    "max_replicas_per_node",
)


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of an application, ready for the controller."""

    name: str
    target: Any
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    options: DeploymentOptions
    dependencies: tuple[str, ...]
    code_version: tuple[str, ...] | None = None

    def same_code(self, other: DeploymentSpec) -> bool:
        """Whether ``other`` can keep this one's replicas (only lightweight options differ)."""
        if self.target is not other.target and (
            self.code_version is None or self.code_version != other.code_version
        ):
            return False
        if self.options.ray_actor_options != other.options.ray_actor_options:
            return False
        if self.options.max_ongoing_requests != other.options.max_ongoing_requests:
            return False
        # Taken by a replica (or its placement) when it starts: a change needs new replicas.
        if any(getattr(self.options, name) != getattr(other.options, name) for name in _AT_START):
            return False
        try:
            return bool(self.init_args == other.init_args and self.init_kwargs == other.init_kwargs)
        except Exception:
            return False


@dataclass(frozen=True)
class ApplicationSpec:
    name: str
    route_prefix: str | None
    ingress: str
    deployments: tuple[DeploymentSpec, ...]  # dependencies before dependents
    # A config file's application-level policy: it decides for every autoscaled deployment.
    autoscaling_policy: AutoscalingPolicy | None = None
    # Ray Serve's external scaler: replica counts are set from outside (the control
    # endpoint), so no deployment of the application may autoscale.
    external_scaler_enabled: bool = False
