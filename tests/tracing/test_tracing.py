"""Traces across hops: the proxy's span, each handle call's client span and the replica's
server span share one trace, linked parent to child, across processes; a client's
traceparent is honoured, errors are recorded, get_trace_context() gives the request's
span; and with tracing off, nothing is recorded and opentelemetry is never imported.

Each scenario runs traced_app.py in a process of its own, with OpenTelemetry's standard
variables: OTEL_TRACES_EXPORTER names the exporter of spans_to_files.py, registered as
an entry point in a dist-info folder on PYTHONPATH (as an installed package would be).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from spans_to_files import DIR_ENV, read_spans
from traced_app import CLIENT_SPAN_ID, CLIENT_TRACE_ID, CLIENT_TRACE_STATE, SESSION_TRACE_ID

from conftest import BACKENDS

HERE = Path(__file__).resolve().parent
Span = dict[str, Any]


def _run(tmp_path: Path, backend: str, traced: bool, timeout: float = 90) -> dict[str, Any]:
    """Run traced_app.py on ``backend``; what it printed."""
    site = tmp_path / "site"
    dist = site / "tandem_test_spans-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tandem-test-spans\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[opentelemetry_traces_exporter]\ntest_files = spans_to_files:FileSpanExporter\n"
    )
    spans = tmp_path / "spans"
    spans.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    paths = [str(site), str(HERE), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in paths if p), PYTHONUNBUFFERED="1")
    env[DIR_ENV] = str(spans)
    if traced:
        env.update(OTEL_TRACES_EXPORTER="test_files", OTEL_BSP_SCHEDULE_DELAY="50")
    result = subprocess.run(
        [sys.executable, str(HERE / "traced_app.py"), backend],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.splitlines()[-1]))


def _one(spans: list[Span], name: str, kind: str, trace_id: str) -> Span:
    found = [s for s in spans if s["name"] == name and s["kind"] == kind]
    found = [s for s in found if s["trace_id"] == trace_id]
    assert len(found) == 1, (name, kind, spans)
    return found[0]


def _check_trace(spans: list[Span], backend: str) -> None:
    # The request with the client's traceparent: one trace, the client's.
    trace_id = CLIENT_TRACE_ID
    proxy = _one(spans, "GET /", "SERVER", trace_id)
    assert proxy["parent_id"] == CLIENT_SPAN_ID
    assert proxy["attributes"]["http.response.status_code"] == 200
    assert proxy["attributes"]["tandem.application"] == "default"
    front = _one(spans, "Front.__call__", "SERVER", trace_id)
    assert front["parent_id"] == proxy["span_id"]
    assert front["attributes"]["tandem.replica_id"].startswith("default#Front#")
    assert front["attributes"]["tandem.request_id"] == proxy["attributes"]["tandem.request_id"]
    user_work = _one(spans, "user work", "INTERNAL", trace_id)
    assert user_work["parent_id"] == front["span_id"]
    for method in ("double", "count"):
        call = _one(spans, f"Inner.{method}", "CLIENT", trace_id)
        served = _one(spans, f"Inner.{method}", "SERVER", trace_id)
        assert call["parent_id"] == front["span_id"]
        assert served["parent_id"] == call["span_id"]
        assert served["attributes"]["tandem.method"] == method
        assert served["attributes"]["tandem.deployment"] == "Inner"
        assert served["status"] == "UNSET"
        if backend != "local":  # the caller's span and the replica's in other processes
            assert call["pid"] != served["pid"]
    served = _one(spans, "Inner.double", "SERVER", trace_id)
    assert _one(spans, "user double", "INTERNAL", trace_id)["parent_id"] == served["span_id"]
    assert served["trace_state"] == CLIENT_TRACE_STATE  # the client's, carried every hop
    assert _one(spans, "Inner.count", "CLIENT", trace_id)["attributes"]["tandem.stream"] is True

    # The failing request: its own trace, the error on every span on its way back.
    proxy = next(
        s
        for s in spans
        if s["name"] == "GET /" and s["attributes"]["http.response.status_code"] == 500
    )
    assert proxy["parent_id"] is None and proxy["status"] == "ERROR"
    failing = [s for s in spans if s["trace_id"] == proxy["trace_id"]]
    for name, kind in [("Front.__call__", "SERVER"), ("Inner.double", "CLIENT")]:
        span = _one(failing, name, kind, proxy["trace_id"])
        assert span["status"] == "ERROR" and "exception" in span["events"], span
    inner = _one(failing, "Inner.double", "SERVER", proxy["trace_id"])
    assert inner["status"] == "ERROR" and inner["events"] == ["exception"]

    # A WebSocket session: the proxy's span for it, the replica's for the session.
    session = _one(spans, "GET /ws", "SERVER", SESSION_TRACE_ID)
    assert session["parent_id"] == CLIENT_SPAN_ID
    assert session["attributes"]["http.response.status_code"] == 101
    served = _one(spans, "Sockets.__call__", "SERVER", SESSION_TRACE_ID)
    assert served["parent_id"] == session["span_id"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", [b for b in ("local", "process") if b in BACKENDS])
def test_one_trace_across_the_proxy_and_composed_deployments(tmp_path: Path, backend: str) -> None:
    seen = _run(tmp_path, backend, traced=True)
    assert seen["ok"]["doubled"] == 6 and seen["failed"] == 500 and seen["shouted"] == "HOLA"
    spans = read_spans(tmp_path / "spans")
    _check_trace(spans, backend)
    # get_trace_context() in the replica: the request's own span.
    front = _one(spans, "Front.__call__", "SERVER", CLIENT_TRACE_ID)
    assert seen["ok"]["context_span"] == front["span_id"]
    # A handle call from the driver: a root client span, the replica's span its child.
    call = next(s for s in spans if s["name"] == "Inner.modules" and s["kind"] == "CLIENT")
    served = _one(spans, "Inner.modules", "SERVER", call["trace_id"])
    assert call["parent_id"] is None and served["parent_id"] == call["span_id"]


@pytest.mark.timeout(180)
@pytest.mark.skipif("ray" not in BACKENDS, reason="the ray backend is not tested here")
def test_one_trace_across_ray_actors(tmp_path: Path) -> None:
    seen = _run(tmp_path, "ray", traced=True, timeout=170)
    assert seen["ok"]["doubled"] == 6
    _check_trace(read_spans(tmp_path / "spans"), "ray")


@pytest.mark.timeout(120)
def test_tracing_off_records_nothing_and_imports_no_opentelemetry(tmp_path: Path) -> None:
    seen = _run(tmp_path, "process", traced=False)
    assert seen["ok"] == {"doubled": 6, "items": [0, 1], "context_span": ""}
    assert seen["driver_modules"] == [] and seen["replica_modules"] == []
    assert read_spans(tmp_path / "spans") == []


@pytest.mark.timeout(120)
def test_grpc_spans_honour_traceparent_metadata_in_the_users_own_provider(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    paths = [str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    result = subprocess.run(
        [sys.executable, str(HERE / "traced_grpc.py"), str(tmp_path / "protos")],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    spans: list[Span] = json.loads(result.stdout.splitlines()[-1])
    rpc = _one(spans, "tandemtest.Greeter/__call__", "SERVER", CLIENT_TRACE_ID)
    assert rpc["parent_id"] == CLIENT_SPAN_ID
    assert rpc["attributes"]["rpc.grpc.status_code"] == 0
    served = _one(spans, "Greeter.__call__", "SERVER", CLIENT_TRACE_ID)
    assert served["parent_id"] == rpc["span_id"]
    failed = next(s for s in spans if s["name"] == "tandemtest.Greeter/Fail")
    assert failed["parent_id"] is None and failed["status"] == "ERROR"
    assert failed["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    served = _one(spans, "Greeter.Fail", "SERVER", failed["trace_id"])
    assert served["status"] == "ERROR" and served["parent_id"] == failed["span_id"]


CONFIGURE_TWICE = """
import logging, sys
logging.basicConfig(format="%(levelname)s %(message)s")
if sys.argv[1] == "no-sdk":
    sys.modules["opentelemetry.sdk"] = None  # as if the SDK were not installed
from tandem._private import tracing
tracing.configure()
tracing.configure()
print(tracing.SPANS is not None)
"""


def _configure_twice(case: str, exporter: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_TRACES_EXPORTER"] = exporter
    return subprocess.run(
        [sys.executable, "-c", CONFIGURE_TWICE, case],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_exporter_asked_for_without_the_sdk_says_what_to_install_once() -> None:
    result = _configure_twice("no-sdk", "otlp")
    assert result.stdout.strip() == "False", result.stderr
    assert result.stderr.count("pip install 'tandem-serve[tracing]'") == 1, result.stderr
    assert "OTEL_TRACES_EXPORTER=otlp" in result.stderr


def test_an_exporter_name_nothing_provides_is_named_in_a_warning() -> None:
    result = _configure_twice("sdk", "otlp,no_such_exporter")
    assert result.stdout.strip() == "True", result.stderr
    assert "'no_such_exporter', which no installed package provides" in result.stderr
    assert "'otlp'" not in result.stderr  # the tracing extra's OTLP/HTTP exporter is found
