"""Ray Serve's external scaler: what an application that enables it may be asked, and may not hold.

An application deployed with ``external_scaler_enabled`` (``run()`` or its config
file) hands its replica counts to a scaler outside tandem, which sets a
deployment's target through the owner's control endpoint
(``POST /api/v1/applications/APP/deployments/NAME/scale`` with a
:class:`ScaleDeploymentRequest`). Such an application may not autoscale too:
two deciders of one count would undo each other's work, so
:func:`check_external_scaler` refuses it before anything starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator

from tandem._private.app.options import DeploymentOptions


class ScaleDeploymentRequest(BaseModel):
    """The body of a scale request (Ray Serve's ``ScaleDeploymentRequest``)."""

    # A misspelt field would otherwise be dropped and the request half-understood.
    model_config = ConfigDict(extra="forbid")

    target_num_replicas: NonNegativeInt = Field(
        description="How many replicas the deployment should run from now on."
    )

    @field_validator("target_num_replicas", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        # pydantic would take true as 1 replica; a scaler that sends it has a bug.
        if isinstance(value, bool):
            raise ValueError(f"must be a whole number of replicas, got {value!r}")
        return value


class ExternalScalerDisabledError(Exception):
    """A scale request for an application deployed without ``external_scaler_enabled``."""


def check_external_scaler(app_name: str, enabled: bool, autoscaled: Iterable[str]) -> None:
    """Refuse an application that enables the external scaler and autoscales a deployment
    (``autoscaled``: the names of those of its deployments that do)."""
    names = ", ".join(repr(name) for name in autoscaled)
    if enabled and names:
        raise ValueError(
            f"Application {app_name!r} sets external_scaler_enabled, but deployment(s) "
            f"{names} autoscale (num_replicas='auto' or autoscaling_config); the external "
            "scaler sets the replica counts of the whole application, so give them a fixed "
            "num_replicas, or set external_scaler_enabled to false."
        )


def autoscaled(deployments: Iterable[tuple[str, DeploymentOptions]]) -> list[str]:
    """The names of the deployments (name, options) that autoscale."""
    return [name for name, options in deployments if options.autoscaling is not None]


def disabled_message(app_name: str, deployment: str) -> str:
    """Why a scale request for a deployment of ``app_name`` was refused, and what to do."""
    return (
        f"Deployment {deployment!r} of application {app_name!r} cannot be scaled from "
        f"outside: the application was deployed without external_scaler_enabled. Deploy "
        "it again with external_scaler_enabled: true in its config (or "
        "run(..., external_scaler_enabled=True))."
    )
