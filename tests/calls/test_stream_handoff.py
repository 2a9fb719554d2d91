"""A stream passed on, inside a deployment, before it began is handed off: the
replica that reads it makes the call itself, so items flow from one replica to the
next directly (``calls.inbound.StreamCall``). Same behaviour as a stream passed
through its caller: items, errors of their own type, a reader that stops or a call
cancelled stops the producer; and the caller can no longer read it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tandem as serve
from helpers import eventually
from tandem.handle import DeploymentHandle


class Broke(Exception):
    pass


@serve.deployment(graceful_shutdown_timeout_s=0.2)
class Source:
    def __init__(self) -> None:
        self.made = 0
        self.ended: list[str] = []

    async def numbers(self, n: int, fail_at: int = -1, every_s: float = 0.0) -> AsyncIterator[int]:
        try:
            for i in range(n):
                if i == fail_at:
                    raise Broke(f"broke at {i}")
                self.made += 1
                yield i
                await asyncio.sleep(every_s)
        except (asyncio.CancelledError, GeneratorExit):
            self.ended.append("stopped")
            raise
        self.ended.append("finished")

    def state(self) -> dict[str, Any]:
        return {"made": self.made, "ended": list(self.ended)}


@serve.deployment
class Stage:
    async def doubled(self, items: AsyncIterator[int]) -> AsyncIterator[int]:
        async for item in items:
            yield 2 * item

    async def total(self, items: AsyncIterator[int]) -> dict[str, Any]:
        seen = []
        try:
            async for item in items:
                seen.append(item)
        except Broke as exc:
            return {"seen": seen, "error": str(exc), "at": time.time()}
        return {"seen": seen, "error": None, "at": time.time()}

    async def first(self, items: AsyncIterator[int], count: int) -> list[int]:
        taken = []
        async for item in items:
            taken.append(item)
            if len(taken) == count:
                break
        return taken


@serve.deployment
class Composer:
    def __init__(self, source: DeploymentHandle, stage: DeploymentHandle) -> None:
        self.source = source
        self.stage = stage

    def _numbers(self, n: int, **kwargs: Any) -> Any:
        return self.source.options(stream=True).numbers.remote(n, **kwargs)

    async def chain(self, n: int, fail_at: int = -1) -> dict[str, Any]:
        # Two hand-offs: Source -> Stage.doubled -> Stage.total.
        doubled = self.stage.options(stream=True).doubled.remote(self._numbers(n, fail_at=fail_at))
        return await self.stage.total.remote(doubled)

    async def busy_while_passed_on(self, n: int) -> dict[str, Any]:
        """Blocks its own loop while the stream it passed on is read: its items
        cannot pass through here meanwhile."""
        result = self.stage.total.remote(self._numbers(n, every_s=0.001))
        await asyncio.sleep(0.05)  # the call goes out
        time.sleep(1.5)
        unblocked = time.time()
        answer = await result
        return {**answer, "unblocked": unblocked}

    async def read_after_passing(self) -> str:
        numbers = self._numbers(3)
        passed = self.stage.total.remote(numbers)
        try:
            async for _ in numbers:
                pass
        except RuntimeError as exc:
            await passed
            return str(exc)
        return "read"

    async def first_of_many(self, count: int) -> list[int]:
        return await self.stage.first.remote(self._numbers(10**9), count)

    async def cancelled_while_read(self) -> None:
        result = self.stage.total.remote(self._numbers(10**9, every_s=0.001))
        await asyncio.sleep(0.3)
        result.cancel()


def _app(backend: str) -> tuple[DeploymentHandle, DeploymentHandle]:
    composer = serve.run(
        Composer.bind(Source.bind(), Stage.bind()), backend=backend, route_prefix=None
    )
    return composer, serve.get_deployment_handle("Source", "default")


def _ended(source: DeploymentHandle) -> dict[str, Any]:
    return eventually(
        lambda: source.state.remote().result(timeout_s=10), lambda s: s["ended"], timeout_s=20
    )


def test_items_pass_from_replica_to_replica_through_two_hand_offs(backend: str) -> None:
    composer, source = _app(backend)
    answer = composer.chain.remote(100).result(timeout_s=30)
    assert answer["seen"] == [2 * i for i in range(100)] and answer["error"] is None
    assert _ended(source)["ended"] == ["finished"]


def test_an_upstream_error_reaches_the_last_reader_as_its_own_type(backend: str) -> None:
    composer, _ = _app(backend)
    answer = composer.chain.remote(10, fail_at=4).result(timeout_s=30)
    assert answer == {**answer, "seen": [0, 2, 4, 6], "error": "broke at 4"}


def test_the_items_do_not_pass_through_the_caller(remote_backend: str) -> None:
    composer, _ = _app(remote_backend)
    answer = composer.busy_while_passed_on.remote(100).result(timeout_s=30)
    assert answer["seen"] == list(range(100))
    # The reader had every item while the caller's loop was blocked.
    assert answer["at"] < answer["unblocked"]


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)  # nothing of Ray's own
def test_the_caller_cannot_read_a_stream_it_passed_on(backend: str) -> None:
    composer, _ = _app(backend)
    message = composer.read_after_passing.remote().result(timeout_s=30)
    assert "passed to another call" in message


def test_a_reader_that_stops_stops_the_producer(backend: str) -> None:
    composer, source = _app(backend)
    assert composer.first_of_many.remote(5).result(timeout_s=30) == [0, 1, 2, 3, 4]
    assert _ended(source)["ended"] == ["stopped"]


def test_cancelling_the_reading_call_stops_the_producer(backend: str) -> None:
    composer, source = _app(backend)
    composer.cancelled_while_read.remote().result(timeout_s=30)
    assert _ended(source)["ended"] == ["stopped"]


@pytest.mark.parametrize("backend", ["local", "process"], indirect=True)  # nothing of Ray's own
def test_a_stream_made_outside_a_deployment_still_passes_through_its_caller(
    backend: str,
) -> None:
    _, source = _app(backend)
    stage = serve.get_deployment_handle("Stage", "default")
    numbers = source.options(stream=True).numbers.remote(5)
    assert stage.total.remote(numbers).result(timeout_s=30)["seen"] == [0, 1, 2, 3, 4]
    assert list(numbers) == []  # the call read it all
