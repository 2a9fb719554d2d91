"""COMPATIBILITY.md stays true: every item of Ray Serve's API reference has a row,
every name marked supported or partly imports from tandem, and every public name
tandem exports has a row."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "COMPATIBILITY.md"

# Ray Serve 2.60's API reference (docs.ray.io/en/latest/serve/api/), Python part.
RAY_REFERENCE = """
serve.Deployment serve.Application serve.deployment serve.ingress serve.batch
serve.multiplexed serve.handle.DeploymentHandle serve.handle.DeploymentResponse
serve.handle.DeploymentResponseGenerator serve.start serve.run serve.delete serve.status
serve.shutdown serve.shutdown_async serve.run_many serve.RunTarget
serve.config.ProxyLocation serve.config.AutoscalingContext
serve.autoscaling_policy.replica_queue_length_autoscaling_policy
serve.config.AggregationFunction serve.config.GangPlacementStrategy
serve.config.GangRuntimeFailurePolicy serve.config.gRPCOptions serve.config.HTTPOptions
serve.config.AutoscalingConfig serve.config.AutoscalingPolicy serve.config.RequestRouterConfig
serve.config.GangSchedulingConfig serve.config.DeploymentActorConfig
serve.config.BackpressureConfig serve.config.ControllerOptions
serve.schema.ServeActorDetails serve.schema.ProxyDetails serve.schema.ApplicationStatusOverview
serve.schema.ServeStatus serve.schema.DeploymentStatusOverview serve.schema.EncodingType
serve.schema.AutoscalingMetricsHealth serve.schema.AutoscalingStatus
serve.schema.ScalingDecision serve.schema.DeploymentAutoscalingDetail serve.schema.ReplicaRank
serve.schema.TaskProcessorAdapter serve.request_router.ReplicaID
serve.request_router.PendingRequest serve.request_router.RunningReplica
serve.request_router.FIFOMixin serve.request_router.LocalityMixin
serve.request_router.MultiplexMixin serve.request_router.RequestRouter
serve.get_replica_context serve.get_trace_context serve.get_deployment_actor
serve.context.ReplicaContext serve.context.GangContext serve.get_multiplexed_model_id
serve.get_app_handle serve.get_deployment_handle serve.grpc_util.RayServegRPCContext
serve.grpc_util.gRPCInputStream serve.exceptions.BackPressureError
serve.exceptions.RayServeException serve.exceptions.RequestCancelledError
serve.exceptions.gRPCStatusError serve.exceptions.DeploymentUnavailableError
serve.exceptions.ReplicaUnavailableError serve.schema.ServeDeploySchema
serve.schema.gRPCOptionsSchema serve.schema.HTTPOptionsSchema
serve.schema.ServeApplicationSchema serve.schema.DeploymentSchema
serve.schema.RayActorOptionsSchema serve.schema.CeleryAdapterConfig
serve.schema.TaskProcessorConfig serve.schema.TaskResult serve.schema.ScaleDeploymentRequest
serve.schema.ServeInstanceDetails serve.schema.ApplicationDetails
serve.schema.DeploymentDetails serve.schema.ReplicaDetails serve.schema.TargetGroup
serve.schema.Target serve.schema.DeploymentNode serve.schema.DeploymentTopology
serve.schema.APIType serve.schema.ApplicationStatus serve.schema.ProxyStatus
serve.metrics.Counter serve.metrics.Histogram serve.metrics.Gauge serve.schema.LoggingConfig
""".split()

# tandem's public modules: each name they export needs a row.
PUBLIC_MODULES = [
    "tandem",
    "tandem.handle",
    "tandem.config",
    "tandem.context",
    "tandem.schema",
    "tandem.exceptions",
    "tandem.metrics",
    "tandem.request_router",
    "tandem.autoscaling_policy",
    "tandem.grpc_util",
]


def _rows() -> list[tuple[list[str], str]]:
    """(names in the first cell, status) for each row of the Python API tables."""
    text = TABLE.read_text()
    python_part = text.split("## Command line")[0]
    rows = []
    for line in python_part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        rows.append((names, cells[1]))
    return rows


def _resolve(name: str) -> object:
    """``serve.a.b.C`` as tandem's ``tandem.a.b.C`` (module path, then attributes)."""
    parts = ["tandem", *name.split(".")[1:]]
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def _python_names(rows: list[tuple[list[str], str]]) -> dict[str, str]:
    return {
        name: status
        for names, status in rows
        for name in names
        if name.startswith("serve.") and "*" not in name
    }


def test_every_status_is_one_of_three() -> None:
    statuses = {status for _, status in _rows()}
    assert statuses <= {"supported", "partly", "not"}, statuses


def test_every_item_of_rays_reference_has_a_row() -> None:
    listed = _python_names(_rows())
    missing = [name for name in RAY_REFERENCE if name not in listed]
    assert not missing, f"add rows to COMPATIBILITY.md for: {missing}"


@pytest.mark.parametrize(
    "name",
    sorted(n for n, s in _python_names(_rows()).items() if s in ("supported", "partly")),
)
def test_supported_names_import_from_tandem(name: str) -> None:
    _resolve(name)


@pytest.mark.parametrize("name", sorted(n for n, s in _python_names(_rows()).items() if s == "not"))
def test_names_marked_not_are_absent(name: str) -> None:
    # A name tandem gained belongs in a supported or partly row.
    with pytest.raises((AttributeError, ModuleNotFoundError)):
        _resolve(name)


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_has_a_row(module: str) -> None:
    listed = _python_names(_rows())
    prefix = "serve" + module.removeprefix("tandem")
    exported = importlib.import_module(module).__all__
    missing = [n for n in exported if f"{prefix}.{n}" not in listed and not n.startswith("_")]
    assert not missing, f"add rows to COMPATIBILITY.md for {module}: {missing}"
