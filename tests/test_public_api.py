"""Pins tandem's public surface: adding or removing a public name is a deliberate change."""

from __future__ import annotations

import inspect

import pytest

import tandem
import tandem.exceptions
import tandem.handle
import tandem.schema

TANDEM_ALL = [
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

HANDLE_ALL = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"]

SCHEMA_ALL = [
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

EXCEPTIONS_ALL = [
    "BackPressureError",
    "DeadlineExceededError",
    "DeploymentFailedError",
    "DeploymentUnavailableError",
    "RayServeException",
    "ReplicaUnavailableError",
    "RequestCancelledError",
    "TandemError",
    "gRPCStatusError",
]


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        pytest.param(tandem, TANDEM_ALL, id="tandem"),
        pytest.param(tandem.handle, HANDLE_ALL, id="tandem.handle"),
        pytest.param(tandem.schema, SCHEMA_ALL, id="tandem.schema"),
        pytest.param(tandem.exceptions, EXCEPTIONS_ALL, id="tandem.exceptions"),
    ],
)
def test_all_is_pinned_and_every_name_exists(module: object, expected: list[str]) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    assert sorted(names) == expected
    assert len(set(names)) == len(names)
    for name in names:
        assert hasattr(module, name), name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from tandem import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == TANDEM_ALL


def test_handle_types_are_the_same_objects_at_top_level() -> None:
    assert tandem.DeploymentHandle is tandem.handle.DeploymentHandle
    assert tandem.DeploymentResponse is tandem.handle.DeploymentResponse
    assert tandem.DeploymentResponseGenerator is tandem.handle.DeploymentResponseGenerator


def test_every_exception_derives_from_tandem_error() -> None:
    classes = [
        obj
        for _, obj in inspect.getmembers(tandem.exceptions, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == tandem.exceptions.__name__
    ]
    assert sorted({c.__name__ for c in classes}) == [
        name for name in EXCEPTIONS_ALL if name != "RayServeException"
    ]
    assert tandem.exceptions.RayServeException is tandem.exceptions.TandemError
    for cls in classes:
        assert issubclass(cls, tandem.exceptions.TandemError), cls.__name__
    assert issubclass(tandem.exceptions.TandemError, Exception)


def test_ray_import_lines_map_to_tandem() -> None:
    # `from ray.serve.handle import X` -> `from tandem.handle import X`
    from tandem.handle import (  # noqa: F401
        DeploymentHandle,
        DeploymentResponse,
        DeploymentResponseGenerator,
    )

    # `from ray.serve.schema import LoggingConfig` -> `from tandem.schema import LoggingConfig`
    from tandem.schema import LoggingConfig

    assert LoggingConfig is tandem.LoggingConfig
    assert callable(tandem.deployment)
    assert callable(tandem.run)
    assert isinstance(tandem.__version__, str)
