"""tandem: serve compositions of ML models and business logic as one application.

The API is Ray Serve's composition API: code written for Ray Serve runs on
tandem after ``from ray import serve`` becomes ``import tandem as serve``.
"""

# Importing Ray Serve imports starlette.requests, and Ray Serve code relies on it:
# ``import starlette`` then ``starlette.requests.Request`` in a type hint. Keep that
# working (it costs about 20 ms of import time).
import starlette.requests  # noqa: F401

# Submodules Ray Serve code reaches as attributes (``serve.metrics.Counter`` after
# ``import tandem as serve``), outside ``__all__`` as in Ray Serve.
from tandem import config as config
from tandem import exceptions as exceptions
from tandem import handle as handle
from tandem import metrics as metrics
from tandem import schema as schema
from tandem._private.api import (
    RunTarget,
    delete,
    get_app_handle,
    get_deployment_handle,
    get_trace_context,
    run,
    run_many,
    shutdown,
    shutdown_async,
    start,
    status,
)
from tandem._private.app.autoscaling_config import AutoscalingConfig
from tandem._private.app.deployment import Application, Deployment, deployment
from tandem._private.app.logging_config import LoggingConfig
from tandem._private.calls.context import (
    ReplicaContext,
    get_multiplexed_model_id,
    get_replica_context,
)
from tandem._private.controller.status import Status
from tandem._private.replica.batching import batch
from tandem._private.replica.ingress import ingress
from tandem._private.replica.multiplex import multiplexed
from tandem.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

__version__ = "0.1.0"

__all__ = [
    "Application",
    "AutoscalingConfig",
    "Deployment",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "LoggingConfig",
    "ReplicaContext",
    "RunTarget",
    "Status",
    "batch",
    "delete",
    "deployment",
    "get_app_handle",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "get_trace_context",
    "ingress",
    "multiplexed",
    "run",
    "run_many",
    "shutdown",
    "shutdown_async",
    "start",
    "status",
]
