"""Schemas users import by name: ``from ray.serve.schema import LoggingConfig``
becomes ``from tandem.schema import LoggingConfig``.

The config-file models keep Ray Serve's names (``ServeDeploySchema`` is the whole
file, ``ServeApplicationSchema`` one application, ``DeploymentSchema`` one
deployment's overrides), and so do the states ``tandem.status()`` reports.
"""

from tandem._private.app.autoscaling_config import AutoscalingConfig, AutoscalingPolicy
from tandem._private.app.backpressure import BackpressureConfig
from tandem._private.app.config_file import ApplicationConfig as ServeApplicationSchema
from tandem._private.app.config_file import DeploymentOverride as DeploymentSchema
from tandem._private.app.config_file import ServeConfig as ServeDeploySchema
from tandem._private.app.external_scaler import ScaleDeploymentRequest
from tandem._private.app.logging_config import LoggingConfig
from tandem._private.app.request_router_config import RequestRouterConfig
from tandem._private.calls.context import ReplicaRank
from tandem._private.controller.status import ApplicationState as ApplicationStatus
from tandem._private.controller.status import ApplicationStatus as ApplicationStatusOverview
from tandem._private.controller.status import DeploymentState as DeploymentStatus
from tandem._private.controller.status import DeploymentStatus as DeploymentStatusOverview
from tandem._private.controller.status import ProxyStatus, ReplicaState
from tandem._private.controller.status import Status as ServeStatus
from tandem._private.grpc.options import gRPCOptions as gRPCOptionsSchema
from tandem._private.http.options import HTTPOptions as HTTPOptionsSchema

__all__ = [
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "AutoscalingConfig",
    "AutoscalingPolicy",
    "BackpressureConfig",
    "DeploymentSchema",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "HTTPOptionsSchema",
    "LoggingConfig",
    "ProxyStatus",
    "ReplicaRank",
    "ReplicaState",
    "RequestRouterConfig",
    "ScaleDeploymentRequest",
    "ServeApplicationSchema",
    "ServeDeploySchema",
    "ServeStatus",
    "gRPCOptionsSchema",
]
