"""Configuration classes users import by name: ``from ray.serve.config import
AutoscalingConfig`` becomes ``from tandem.config import AutoscalingConfig``."""

from tandem._private.app.autoscaling_config import (
    AggregationFunction,
    AutoscalingConfig,
    AutoscalingPolicy,
)
from tandem._private.app.backpressure import BackpressureConfig
from tandem._private.app.request_router_config import RequestRouterConfig
from tandem._private.calls.context import DeploymentID, ReplicaID
from tandem._private.controller.autoscaling_context import AutoscalingContext
from tandem._private.grpc.options import gRPCOptions
from tandem._private.http.options import HTTPOptions, ProxyLocation

__all__ = [
    "AggregationFunction",
    "AutoscalingConfig",
    "AutoscalingContext",
    "AutoscalingPolicy",
    "BackpressureConfig",
    "DeploymentID",
    "HTTPOptions",
    "ProxyLocation",
    "ReplicaID",
    "RequestRouterConfig",
    "gRPCOptions",
]
