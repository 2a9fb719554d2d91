"""Requests their callers gave up on but that still run (a sync method cannot be
interrupted; an async one may swallow its cancellation) must not wedge a replica
for good: they keep their slots, and once older than ``health_check_timeout_s``
the replica's health check fails, so the controller replaces it.

The replica-level tests drive a :class:`Replica` directly with a clock of their
own, so the grace period is exact; the others run a deployment on every
backend and abandon its requests by cancelling them or by HTTP's
``request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request

import tandem as serve
from helpers import wait_for
from tandem._private.api import http_url
from tandem._private.app.options import DeploymentOptions
from tandem._private.calls.context import DeploymentID, RequestMetadata
from tandem._private.replica.replica import AbandonedRequestsError, Replica, ReplicaSpec
from tandem.exceptions import ReplicaUnavailableError, RequestCancelledError

GRACE_S = 30.0

# -- a replica on its own, with a clock of the test's --------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Blocking:
    """Sync methods that block until the test lets them go."""

    def __init__(self) -> None:
        self.entered = 0
        self.blocked = threading.Event()
        self.release = threading.Event()

    def hang(self) -> None:
        self.entered += 1
        self.blocked.set()
        self.release.wait(30)

    def numbers(self) -> Iterator[int]:
        yield 1
        self.blocked.set()
        self.release.wait(30)
        yield 2


class Defiant:
    """Async methods that swallow their cancellation and go on until finished."""

    def __init__(self) -> None:
        self.cancels = 0
        self.finish = False

    async def _go_on(self) -> None:
        while not self.finish:
            try:
                await asyncio.sleep(0.005)
            except asyncio.CancelledError:
                self.cancels += 1

    async def defy(self) -> str:
        await self._go_on()
        return "done"

    async def ticks(self) -> AsyncIterator[int]:
        yield 1
        await self._go_on()
        yield 2


def _replica(target: type, clock: Clock) -> Replica:
    spec = ReplicaSpec(
        replica_id="Wedge#r1",
        deployment_id=DeploymentID(app_name="app", name="Wedge"),
        target=target,
        init_args=(),
        init_kwargs={},
        options=DeploymentOptions(max_ongoing_requests=2, health_check_timeout_s=GRACE_S),
    )
    return Replica(spec, clock=clock)


def _meta(method: str, stream: bool = False) -> RequestMetadata:
    return RequestMetadata(
        RequestMetadata.new_request_id(), "app", "Wedge", method_name=method, stream=stream
    )


async def _until(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def _cancelled(task: Awaitable[Any]) -> None:
    with pytest.raises(asyncio.CancelledError):
        await task


def _abandoned_message(count: int, method: str) -> str:
    what = (
        "1 request abandoned by its caller still holds a slot"
        if count == 1
        else f"{count} requests abandoned by their callers still hold slots"
    )
    return re.escape(f"{what} after {GRACE_S:g} s (method '{method}'); replacing the replica")


def test_abandoned_requests_younger_than_the_grace_period_leave_the_replica_healthy() -> None:
    async def main() -> None:
        clock = Clock()
        replica = _replica(Blocking, clock)
        await replica.start()
        obj = replica.servable
        calls = [asyncio.ensure_future(replica.call(_meta("hang"), (), {})) for _ in range(2)]
        await _until(lambda: obj.entered == 2)
        for call in calls:
            call.cancel()
            await _cancelled(call)
        # Both threads still run: their slots stay taken, and count as abandoned.
        assert (replica.in_flight, replica.abandoned) == (2, 2)

        clock.now += GRACE_S - 0.1
        await replica.check_health()  # younger than the grace period: healthy

        clock.now += 0.1
        with pytest.raises(AbandonedRequestsError, match=_abandoned_message(2, "hang")):
            await replica.check_health()

        obj.release.set()  # the threads end: their slots come back
        await _until(lambda: replica.in_flight == 0)
        assert replica.abandoned == 0
        await replica.check_health()
        assert await asyncio.wait_for(replica.call(_meta("hang"), (), {}), 5) is None
        await replica.stop(0)

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="needs Task.cancelling()")
def test_an_async_method_that_swallows_its_cancellation_counts_as_abandoned() -> None:
    async def main() -> None:
        clock = Clock()
        replica = _replica(Defiant, clock)
        await replica.start()
        obj = replica.servable
        call = asyncio.ensure_future(replica.call(_meta("defy"), (), {}))
        await _until(lambda: replica.in_flight == 1)
        call.cancel()
        await _until(lambda: obj.cancels == 1)

        await replica.check_health()  # seen abandoned from now on
        assert (replica.in_flight, replica.abandoned) == (1, 1)
        clock.now += GRACE_S
        with pytest.raises(AbandonedRequestsError, match=_abandoned_message(1, "defy")):
            await replica.check_health()

        obj.finish = True
        await asyncio.wait_for(call, 5)
        assert (replica.in_flight, replica.abandoned) == (0, 0)
        await replica.check_health()
        await replica.stop(0)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("target", "method"),
    [(Blocking, "numbers"), (Defiant, "ticks")],
    ids=["sync-generator-in-a-thread", "async-generator-swallowing"],
)
def test_a_stream_abandoned_mid_item_counts_as_abandoned(target: type, method: str) -> None:
    if target is Defiant and sys.version_info < (3, 11):
        pytest.skip("needs Task.cancelling()")

    async def main() -> None:
        clock = Clock()
        replica = _replica(target, clock)
        await replica.start()
        obj = replica.servable
        items: list[int] = []

        async def consume() -> None:
            async for item in replica.stream(_meta(method, stream=True), (), {}):
                items.append(item)

        consumer = asyncio.ensure_future(consume())
        await _until(lambda: items == [1])
        if target is Blocking:
            await _until(obj.blocked.is_set)
            consumer.cancel()
            await _cancelled(consumer)
        else:
            consumer.cancel()
            await _until(lambda: obj.cancels == 1)

        await replica.check_health()
        assert (replica.in_flight, replica.abandoned) == (1, 1)
        clock.now += GRACE_S
        with pytest.raises(AbandonedRequestsError, match=_abandoned_message(1, method)):
            await replica.check_health()

        if target is Blocking:
            obj.release.set()
        else:
            obj.finish = True
            await asyncio.wait_for(consumer, 5)
        await _until(lambda: replica.in_flight == 0)
        assert replica.abandoned == 0
        await replica.check_health()
        await replica.stop(0)

    asyncio.run(main())


# -- a deployment on every backend ---------------------------------------------------


class _Gate:
    """What a wedging call waits for: set at the end of each test, so that threads
    left behind on the local backend end (elsewhere their process is gone)."""

    event = threading.Event()


@pytest.fixture
def gate() -> Iterator[None]:
    _Gate.event = threading.Event()
    try:
        yield
    finally:
        _Gate.event.set()


@serve.deployment(
    max_ongoing_requests=2,
    health_check_period_s=0.2,
    health_check_timeout_s=1,
    graceful_shutdown_timeout_s=0.5,
)
class Wedgeable:
    def __init__(self) -> None:
        self._pair = threading.Barrier(2)

    def hang(self) -> None:
        _Gate.event.wait(300)

    def __call__(self, request: Request) -> str:
        if "hang" in request.query_params:
            _Gate.event.wait(300)
        return self.whoami()

    def whoami(self) -> str:
        return f"{serve.get_replica_context().replica_id} {os.getpid()}"

    def meet(self) -> str:
        """Returns once two calls run at once: the replica has both of its threads."""
        self._pair.wait(timeout=10)
        return self.whoami()


def _replicas() -> list[tuple[str, str, int, int | None]]:
    status = serve.status().applications["wedged"].deployments["Wedgeable"]
    return [(r.replica_id, r.state, r.in_flight, r.pid) for r in status.replicas]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _until_ok(fn: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    """``fn()``, again while a replica being replaced refuses it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except ReplicaUnavailableError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def request_timeout() -> Iterator[None]:
    serve.start(http_options={"port": 0, "request_timeout_s": 0.5})
    yield  # shutdown() after the test forgets it


def _abandon_by_cancelling(handle: Any) -> str:
    responses = [handle.hang.remote() for _ in range(2)]
    # Both hold their slots (process and ray replicas report at each health check).
    assert wait_for(lambda: [r[2] for r in _replicas()] == [2], 15), _replicas()
    for response in responses:
        response.cancel()
    for response in responses:
        with pytest.raises(RequestCancelledError):
            response.result(timeout_s=5)
    return "hang"


def _abandon_by_http_timeout(handle: Any) -> str:
    base = http_url()
    assert base is not None
    with httpx.Client(timeout=10) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: client.get(base + "/?hang=1"), range(2)))
    assert [a.status_code for a in answers] == [408, 408], [a.text for a in answers]
    return "__call__"


@pytest.mark.parametrize("abandon", ["cancel", "http_timeout"])
def test_a_replica_wedged_by_abandoned_requests_is_replaced(
    backend: str, abandon: str, gate: None, caplog: pytest.LogCaptureFixture, request: Any
) -> None:
    caplog.set_level(logging.WARNING, logger="tandem")
    if abandon == "http_timeout":
        request.getfixturevalue("request_timeout")
    handle = serve.run(Wedgeable.bind(), name="wedged", route_prefix="/", backend=backend)
    old_id, old_pid = handle.whoami.remote().result(timeout_s=10).split()
    method = (_abandon_by_cancelling if abandon == "cancel" else _abandon_by_http_timeout)(handle)

    def replaced() -> str | None:
        replicas = _replicas()
        ids = [r[0] for r in replicas if r[1] == "RUNNING"]
        return ids[0] if len(replicas) == 1 and ids and ids[0] != old_id else None

    new_id = wait_for(replaced, 15)
    assert new_id, f"the wedged replica was not replaced: {_replicas()}"
    # Both, or the first one: the health check may fall between their callers' timeouts.
    expected = re.compile(
        "(2 requests abandoned by their callers still hold slots|1 request abandoned by its "
        f"caller still holds a slot) after 1 s \\(method '{method}'\\); replacing the replica"
    )
    messages = [r.getMessage() for r in caplog.records]
    assert any(old_id in m and expected.search(m) for m in messages), messages

    # The new replica serves, with both of its slots (and threads on the local backend).
    def meet_twice() -> set[str]:
        pair = [handle.meet.remote(), handle.meet.remote()]
        return {r.result(timeout_s=15).split()[0] for r in pair}

    assert _until_ok(meet_twice) == {new_id}
    if abandon == "http_timeout":
        base = http_url()
        assert base is not None
        answer = httpx.get(base + "/", timeout=10)
        assert (answer.status_code, answer.text.split()[0]) == (200, new_id)

    if backend == "local":
        warning = (
            f"2 threads of replica {old_id} are still running method '{method}' after "
            "their callers gave up; they are abandoned."
        )
        assert wait_for(lambda: [r.getMessage() for r in caplog.records].count(warning), 10), [
            r.getMessage() for r in caplog.records
        ]
        started = time.monotonic()
        serve.shutdown()  # the stuck threads still run: they must not hold it up
        assert time.monotonic() - started < 5
    else:
        assert wait_for(lambda: not _alive(int(old_pid)), 15), "the wedged replica still runs"


def test_stopping_a_replica_does_not_wait_for_abandoned_requests(
    backend: str, gate: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tandem")
    app = Wedgeable.options(health_check_timeout_s=30, graceful_shutdown_timeout_s=30).bind()
    handle = serve.run(app, name="wedged", route_prefix=None, backend=backend)
    old_id, old_pid = handle.whoami.remote().result(timeout_s=10).split()
    _abandon_by_cancelling(handle)

    started = time.monotonic()
    serve.shutdown()  # nobody waits for the abandoned requests: no graceful wait for them
    assert time.monotonic() - started < 10

    messages = [r.getMessage() for r in caplog.records]
    if backend == "local":  # the threads go on: said once
        warning = (
            f"2 threads of replica {old_id} are still running method 'hang' after "
            "their callers gave up; they are abandoned."
        )
        assert messages.count(warning) == 1, messages
    else:
        assert wait_for(lambda: not _alive(int(old_pid)), 15), "the replica still runs"
