"""Load shedding over HTTP: a request that finds the ingress's replicas busy and
its callers' queue full (``max_queued_requests``) is answered at once, as Ray
Serve answers it: 503 and no ``Retry-After`` by default, or what the
deployment's ``backpressure_config`` says (429, and ``Retry-After`` in whole
seconds, rounded up). The proxy learns the config from the deployment, so every
backend is checked.

Each test holds the only slot with a request that waits for a file, and knows
the slot is taken when the request has written its own file: no timing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

import tandem as serve
from helpers import wait_for
from tandem._private.api import http_url
from tandem._private.app.backpressure import BackpressureConfig
from tandem._private.app.config_file import validate_config


@serve.deployment(max_ongoing_requests=1, max_queued_requests=0)
class OneSlot:
    async def __call__(self, request: Request) -> str:
        started = request.query_params.get("started")
        if started:
            Path(started).touch()
            release = Path(request.query_params["release"])
            while not release.exists():
                await asyncio.sleep(0.01)
        return "done"


def shed_while_busy(tmp_path: Path) -> httpx.Response:
    """A request sent while another holds the only slot (which then finishes normally)."""
    url = http_url()
    assert url is not None
    started, release = tmp_path / "started", tmp_path / "release"
    held: list[httpx.Response] = []
    holder = threading.Thread(
        target=lambda: held.append(
            httpx.get(url, params={"started": str(started), "release": str(release)}, timeout=30)
        )
    )
    holder.start()
    try:
        assert wait_for(started.exists, timeout_s=20)
        shed = httpx.get(url, timeout=10)
    finally:
        release.touch()
        holder.join(timeout=30)
    assert held and held[0].status_code == 200 and held[0].text == "done"
    assert httpx.get(url, timeout=10).text == "done"  # the slot is free again
    return shed


def test_shed_request_gets_503_without_retry_after_by_default(backend: str, tmp_path: Path) -> None:
    serve.run(OneSlot.bind(), backend=backend)
    shed = shed_while_busy(tmp_path)
    assert shed.status_code == 503
    assert "retry-after" not in shed.headers
    request_id = shed.headers["x-request-id"]
    assert shed.text == (
        f"Service Unavailable: too many requests are waiting; retry later "
        f"(request id {request_id}).\n"
    )


def test_backpressure_config_sets_the_status_and_retry_after(backend: str, tmp_path: Path) -> None:
    shedding = OneSlot.options(
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=2.5)
    )
    serve.run(shedding.bind(), backend=backend)
    shed = shed_while_busy(tmp_path)
    assert shed.status_code == 429
    assert shed.headers["retry-after"] == "3"  # whole seconds, never sooner than asked
    assert shed.text.startswith("Too Many Requests: too many requests are waiting")


@pytest.mark.parametrize(
    ("config", "status", "retry_after"),
    [({"status_code": 503, "retry_after_s": 0}, 503, "0"), ({"status_code": 429}, 429, None)],
)
def test_backpressure_config_as_a_dict(
    tmp_path: Path, config: dict[str, Any], status: int, retry_after: str | None
) -> None:
    serve.run(OneSlot.options(backpressure_config=config).bind(), backend="local")
    shed = shed_while_busy(tmp_path)
    assert shed.status_code == status
    assert shed.headers.get("retry-after") == retry_after


def test_bad_backpressure_configs_are_refused() -> None:
    for bad in (
        {"status_code": 500},
        {"retry_after_s": -1},
        {"retry_after": 5},
        {"retry_after_s": float("inf")},
    ):
        with pytest.raises(ValueError, match="backpressure_config"):
            OneSlot.options(backpressure_config=bad)


def test_a_config_file_sets_backpressure_config() -> None:
    config = validate_config(
        {
            "applications": [
                {
                    "name": "a",
                    "import_path": "x:y",
                    "deployments": [
                        {"name": "OneSlot", "backpressure_config": {"status_code": 429}}
                    ],
                }
            ]
        }
    )
    options = config.applications[0].deployments[0].options()
    assert options["backpressure_config"] == BackpressureConfig(status_code=429)


def test_a_flood_of_shed_requests_logs_a_line_per_period_not_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tandem._private.http import failures

    now = [0.0]
    log = failures.SheddingLog("requests", clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="tandem.proxy"):
        assert log.note("app")  # the first is logged in full
        assert not any(log.note("app") for _ in range(50))
        assert log.note("other")  # each application has its own
        now[0] = failures.SHED_LOG_PERIOD_S + 1
        assert log.note("app")
    assert "shed 50 more requests" in caplog.text
