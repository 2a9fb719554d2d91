"""The controller's pure parts, exactly: backoff, the route table and the status message.

No replica runs here: records are built from an application spec, and the
clock and random source are passed in, so every number is exact.
"""

from __future__ import annotations

import random

import pytest

import tandem as serve
from tandem._private.app.graph import build_application
from tandem._private.calls.context import DeploymentID
from tandem._private.controller.describe import describe_deployment
from tandem._private.controller.records import ApplicationRecord, DeploymentRecord
from tandem._private.controller.replicas import (
    FIRST_RETRY_S,
    MAX_RETRY_S,
    RETRY_JITTER,
    retry_delay,
)
from tandem._private.controller.routes import RouteTable, check_prefix_free
from tandem._private.controller.status import ApplicationState, DeploymentState


@serve.deployment(num_replicas=3)
def _model() -> str:
    return "ok"


def _app(name: str, prefix: str | None) -> ApplicationRecord:
    spec = build_application(_model.bind(), name, prefix)
    return ApplicationRecord(spec, {}, status=ApplicationState.RUNNING)


def _deployment() -> DeploymentRecord:
    spec = build_application(_model.bind(), "app", None).deployments[0]
    return DeploymentRecord(DeploymentID(app_name="app", name=spec.name), spec)


# -- backoff ------------------------------------------------------------------------


def test_retry_delay_doubles_from_half_a_second_up_to_thirty_with_jitter() -> None:
    class NoJitter(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return 0.0

    delays = [retry_delay(failures, NoJitter()) for failures in range(1, 10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert (FIRST_RETRY_S, MAX_RETRY_S, RETRY_JITTER) == (0.5, 30.0, 0.2)
    rng = random.Random(7)
    for failures in range(1, 10):
        base = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (failures - 1))
        assert base * 0.8 <= retry_delay(failures, rng) <= base * 1.2


# -- routes -------------------------------------------------------------------------


def test_route_table_lists_longest_prefixes_first_and_drops_deleting_apps() -> None:
    apps = {"root": _app("root", "/"), "api": _app("api", "/api/v1"), "none": _app("none", None)}
    apps["gone"] = _app("gone", "/gone")
    apps["gone"].status = ApplicationState.DELETING
    table = RouteTable()
    table.rebuild(apps)
    assert table.routes() == (("/api/v1", "api", "_model"), ("/", "root", "_model"))
    assert table.prefixes() == {"/api/v1": "api", "/": "root"}


def test_an_application_may_keep_its_own_prefix_but_not_take_another() -> None:
    apps = {"a": _app("a", "/a")}
    check_prefix_free(_app("a", "/a").spec, apps)  # a redeploy of the same application
    check_prefix_free(_app("b", "/b").spec, apps)
    with pytest.raises(ValueError, match="already used by application 'a'"):
        check_prefix_free(_app("b", "/a").spec, apps)


# -- state and status message -------------------------------------------------------


def test_a_deployment_is_healthy_only_at_its_target() -> None:
    record = _deployment()
    record.refresh_state()
    assert record.status == DeploymentState.UPDATING
    assert describe_deployment(record, now=0.0) == "0 of 3 replicas running."
    record.start_failures, record.last_error, record.retry_at = 2, "ValueError: no", 5.0
    record.refresh_state()
    assert record.status == DeploymentState.UNHEALTHY
    assert describe_deployment(record, now=3.5) == (
        "0 of 3 replicas running; starting a replica failed 2 time(s) in a row, "
        "last: ValueError: no; next try in 1.5 s."
    )
    assert record.missing_ranks() == [0, 1, 2]
