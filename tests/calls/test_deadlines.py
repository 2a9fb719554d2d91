"""Deadlines that follow a request: ``handle.options(timeout_s=...)``, the proxy's
``request_timeout_s`` and ``X-Request-Deadline-Ms``, inherited by every call made
while serving the request, on every backend.

A call still waiting when its deadline passes is dropped before it runs; one
running is cancelled, in every deployment it reached; the caller gets
DeadlineExceededError (HTTP 408), and /metrics counts them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

import tandem as serve
from helpers import eventually, parse_prometheus
from tandem._private.api import http_url
from tandem.exceptions import DeadlineExceededError
from tandem.handle import DeploymentHandle


@serve.deployment(max_ongoing_requests=1, graceful_shutdown_timeout_s=0.2)
class Slow:
    def __init__(self) -> None:
        self.events: list[str] = []

    async def wait(self, seconds: float, tag: str = "") -> str:
        self.events.append(f"started {tag}".strip())
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.events.append(f"cancelled {tag}".strip())
            raise
        self.events.append(f"finished {tag}".strip())
        return "done"

    def seen(self) -> list[str]:
        return list(self.events)


@serve.deployment
class Front:
    """Calls Slow; its own calls inherit the deadline of the request it serves."""

    def __init__(self, slow: DeploymentHandle) -> None:
        self.slow = slow

    async def __call__(self, request: Any = None) -> str:
        return await self.slow.wait.remote(5, "inner")

    async def with_fallback(self, seconds: float) -> str:
        try:
            return await self.slow.options(timeout_s=0.2).wait.remote(seconds, "fallback")
        except DeadlineExceededError:
            return "fallback"


def _events(slow: DeploymentHandle, until: str) -> list[str]:
    return eventually(lambda: slow.seen.remote().result(timeout_s=10), lambda e: until in e)


def test_a_call_past_its_timeout_is_cancelled_in_the_replica(backend: str) -> None:
    slow = serve.run(Slow.bind(), backend=backend, route_prefix=None)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="deadline"):
        slow.options(timeout_s=0.3).wait.remote(5).result(timeout_s=10)
    assert time.monotonic() - started < 3
    assert _events(slow, "cancelled") == ["started", "cancelled"]
    # A TimeoutError, for code that catches those.
    with pytest.raises(TimeoutError):
        slow.options(timeout_s=0.2).wait.remote(5).result(timeout_s=10)


def test_a_call_queued_past_its_deadline_never_runs(backend: str) -> None:
    slow = serve.run(Slow.bind(), backend=backend, route_prefix=None)
    busy = slow.wait.remote(1.0, "first")  # the only slot, for a second
    time.sleep(0.3)  # (asking the replica would wait for that slot too)
    with pytest.raises(DeadlineExceededError):
        slow.options(timeout_s=0.2).wait.remote(0, "second").result(timeout_s=10)
    assert busy.result(timeout_s=10) == "done"
    assert slow.wait.remote(0, "third").result(timeout_s=10) == "done"
    assert "started second" not in slow.seen.remote().result(timeout_s=10)


def test_calls_made_while_serving_inherit_the_deadline(backend: str) -> None:
    slow = Slow.bind()
    front = serve.run(Front.bind(slow), backend=backend, route_prefix=None)
    slow_handle = serve.get_deployment_handle("Slow", "default")
    with pytest.raises(DeadlineExceededError):
        front.options(timeout_s=0.4).remote().result(timeout_s=10)
    # The inner call had no timeout of its own: the outer deadline cancelled it too.
    assert _events(slow_handle, "cancelled inner") == ["started inner", "cancelled inner"]
    # A deployment may set a shorter one and handle it itself.
    assert front.with_fallback.remote(5).result(timeout_s=10) == "fallback"


def test_timeout_s_must_be_a_positive_number() -> None:
    handle = DeploymentHandle("Slow")
    for bad, error in ((0, ValueError), (-1, ValueError), (float("nan"), ValueError)):
        with pytest.raises(error, match="timeout_s"):
            handle.options(timeout_s=bad)
    for bad_type in ("1", True, [1]):
        with pytest.raises(TypeError, match="timeout_s"):
            handle.options(timeout_s=bad_type)
    kept = handle.options(timeout_s=1.5)
    assert kept.other_method._timeout_s == 1.5  # method handles keep it
    assert kept.options(timeout_s=None)._timeout_s is None
    assert kept != handle


def _metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    base = http_url()
    assert base is not None
    return parse_prometheus(httpx.get(base + "/metrics", timeout=10).text)


def _front_over_http(backend: str) -> tuple[DeploymentHandle, str]:
    """Front (calling Slow) at /front: Slow's handle, and the server's base URL."""
    serve.run(Front.bind(Slow.bind()), backend=backend, route_prefix="/front")
    base = http_url()
    assert base is not None
    return serve.get_deployment_handle("Slow", "default"), base


def test_the_client_sets_a_deadline_over_http(backend: str) -> None:
    slow_handle, base = _front_over_http(backend)
    with httpx.Client(timeout=10) as client:
        started = time.monotonic()
        answer = client.get(base + "/front", headers={"X-Request-Deadline-Ms": "300"})
        assert answer.status_code == 408, answer.text
        assert "timed out after 0.3 s" in answer.text
        assert time.monotonic() - started < 3
        for bad in ("soon", "-5", "0", "inf"):
            refused = client.get(base + "/front", headers={"X-Request-Deadline-Ms": bad})
            assert refused.status_code == 400
            assert "X-Request-Deadline-Ms must be a positive number" in refused.text
    # The call the ingress made inherited the client's deadline and was cancelled.
    assert "cancelled inner" in _events(slow_handle, "cancelled inner")

    def counted(stats: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
        return sum(
            value
            for (name, labels), value in stats.items()
            if name == "tandem_deployment_deadline_exceeded_total"
            and ("deployment", "Slow") in labels
            and ("stage", "running") in labels
        )

    assert eventually(lambda: counted(_metrics()), lambda n: n >= 1) >= 1


@pytest.fixture
def request_timeout_half_a_second() -> Any:
    serve.start(http_options={"port": 0, "request_timeout_s": 0.5})
    yield


@pytest.mark.usefixtures("request_timeout_half_a_second")
def test_request_timeout_s_is_a_deadline_the_calls_inherit(backend: str) -> None:
    slow_handle, base = _front_over_http(backend)
    answer = httpx.get(base + "/front", timeout=10)
    assert answer.status_code == 408, answer.text
    assert "cancelled inner" in _events(slow_handle, "cancelled inner")


@serve.deployment(num_replicas=2, max_ongoing_requests=8)
class Uneven:
    """Replica 0 answers in 0.4 s, replica 1 at once."""

    def __init__(self) -> None:
        self.rank = serve.get_replica_context().rank.rank

    async def __call__(self) -> int:
        await asyncio.sleep(0.4 if self.rank == 0 else 0.01)
        return self.rank


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)  # nothing of Ray's own
def test_a_call_with_a_deadline_goes_to_a_replica_likely_to_answer_in_time(
    backend: str,
) -> None:
    uneven = serve.run(Uneven.bind(), backend=backend, route_prefix=None)
    # Without a deadline, calls spread over both replicas; the router learns how
    # long each takes to answer.
    spread = [uneven.remote() for _ in range(8)]
    assert {r.result(timeout_s=10) for r in spread} == {0, 1}
    # With 0.2 s left, only replica 1's answers come in time: every call goes there.
    for _ in range(10):
        assert uneven.options(timeout_s=0.2).remote().result(timeout_s=10) == 1
    # Calls without a deadline still use both.
    assert {r.result(timeout_s=10) for r in [uneven.remote() for _ in range(8)]} == {0, 1}


def test_calls_dropped_in_a_callers_queue_are_counted(backend: str) -> None:
    slow_handle, base = _front_over_http(backend)
    busy = slow_handle.wait.remote(1.5, "busy")  # Slow's only slot
    time.sleep(0.2)
    # Dropped while waiting in the driver's queue for Slow...
    with pytest.raises(DeadlineExceededError):
        slow_handle.options(timeout_s=0.2).wait.remote(0, "second").result(timeout_s=10)
    # ...and in the queue of Front's replica (its own process on remote backends).
    answer = httpx.get(base + "/front", headers={"X-Request-Deadline-Ms": "300"}, timeout=10)
    assert answer.status_code == 408, answer.text
    assert busy.result(timeout_s=10) == "done"
    assert "started second" not in slow_handle.seen.remote().result(timeout_s=10)

    def queued(stats: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
        return sum(
            value
            for (name, labels), value in stats.items()
            if name == "tandem_deployment_deadline_exceeded_total"
            and ("deployment", "Slow") in labels
            and ("method", "wait") in labels
            and ("stage", "queued") in labels
        )

    assert eventually(lambda: queued(_metrics()), lambda n: n >= 2) == 2


@serve.deployment(graceful_shutdown_timeout_s=0.2)
class Counter:
    async def count(self, n: int) -> Any:
        for i in range(n):
            yield i
            await asyncio.sleep(0)


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)  # nothing of Ray's own
def test_a_stream_past_its_deadline_ends_with_deadline_exceeded(backend: str) -> None:
    counter = serve.run(Counter.bind(), backend=backend, route_prefix=None)
    stream = counter.options(stream=True, timeout_s=0.3).count.remote(10**9)
    items = iter(stream)
    assert next(items) == 0
    time.sleep(0.6)  # buffers fill up; the deadline passes while the stream waits for room
    with pytest.raises(DeadlineExceededError):
        for _ in items:
            pass
