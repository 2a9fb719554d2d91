"""Shared fixtures: every test that runs applications gets a clean tandem and a backend.

Tests that must behave the same on every backend take the ``backend`` fixture
and pass it to ``tandem.run(..., backend=backend)``; they run once per backend.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import tandem

# Backends the shared suite runs on; later backends join this list.
BACKENDS = [b for b in os.environ.get("TANDEM_TEST_BACKENDS", "local,process").split(",") if b]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True, scope="session")
def _http_on_a_free_port() -> None:
    """Applications with a route prefix serve HTTP; tests take a free port, never 8000."""
    tandem.start(http_options={"port": 0})


@pytest.fixture(autouse=True)
def _clean_tandem() -> Iterator[None]:
    """No test sees applications from another, and none leaks a runtime."""
    yield
    tandem.shutdown()
