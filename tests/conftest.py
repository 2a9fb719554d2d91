"""Shared fixtures: every test that runs applications gets a clean tandem and a backend.

Tests that must behave the same on every backend take the ``backend`` fixture
and pass it to ``tandem.run(..., backend=backend)``; they run once per backend.
Tests of replicas in other processes (crashes, health checks, redeploys, ...)
take ``remote_backend``: the process backend, and the ray backend when it runs.

The ray backend runs when Ray is installed (``pip install -e .[ray]``; the
test command installs it). Each test process starts one local Ray, at its first
test on Ray, with 16 logical CPUs, so a small machine does not hold back actor
scheduling.
$TANDEM_TEST_BACKENDS (e.g. ``local,process``) picks the backends explicitly.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest

import tandem

RAY_INSTALLED = importlib.util.find_spec("ray") is not None
_DEFAULT_BACKENDS = "local,process,ray" if RAY_INSTALLED else "local,process"
BACKENDS = [b for b in os.environ.get("TANDEM_TEST_BACKENDS", _DEFAULT_BACKENDS).split(",") if b]
REMOTE_BACKENDS = [b for b in BACKENDS if b in ("process", "ray")]
RAY_CPUS = 16


def _start_ray_once() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # a Ray of the tests' own, even if another runs here
            num_cpus=RAY_CPUS,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            resources={"tandem_test_slot": 4},  # for tests of ray_actor_options.resources
        )


@pytest.fixture
def local_ray() -> None:
    """The session's local Ray (started on first use)."""
    _start_ray_once()


def _backend_named(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if name == "ray":
        _start_ray_once()
    return name


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return _backend_named(request)


@pytest.fixture(params=REMOTE_BACKENDS)
def remote_backend(request: pytest.FixtureRequest) -> str:
    return _backend_named(request)


@pytest.fixture(autouse=True, scope="session")
def _ray_stops_last() -> Iterator[None]:
    yield
    if RAY_INSTALLED:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(autouse=True)
def _clean_tandem() -> Iterator[None]:
    """No test sees applications from another, and none leaks a runtime. Applications
    with a route prefix serve HTTP: on a free port, never 8000 (shutdown() forgets it)."""
    tandem.start(http_options={"port": 0})
    yield
    tandem.shutdown()
