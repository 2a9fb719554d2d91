"""Streams that compose: a DeploymentResponseGenerator passed to ``.remote()`` arrives
in the called method as an iterator of the upstream call's items, on every backend.

An async method gets an async iterator, a sync one a plain iterator (read in its
thread). Items flow as they are produced, a slow reader holds the producer back,
an upstream error reaches the reader as the same exception type, and a reader
that stops (or a call that ends) stops the upstream generator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pytest

import tandem as serve
from helpers import eventually
from tandem._private.calls.flow import STREAM_BUFFER
from tandem.handle import DeploymentHandle

# How far a producer may run ahead of its reader: a STREAM_BUFFER's worth in each
# place items wait on their way (the producer's credit, with reads reported in
# batches; the handle's buffer; the pump's and the batch on the wire; the reading
# replica's queue), and a few items in hand.
AHEAD = 8 * STREAM_BUFFER


class UpstreamBroke(Exception):
    """Raised by the producer; the reader must see this very type."""


@serve.deployment(graceful_shutdown_timeout_s=0.2)
class Producer:
    """Yields numbers; records how many it produced and whether its generator ended."""

    def __init__(self) -> None:
        self.produced = 0
        self.ended: list[str] = []

    async def numbers(self, n: int, fail_after: int | None = None) -> AsyncIterator[int]:
        try:
            for i in range(n):
                if fail_after is not None and i == fail_after:
                    raise UpstreamBroke(f"broke after {i}")
                self.produced += 1
                yield i
                await asyncio.sleep(0)
        except (asyncio.CancelledError, GeneratorExit):
            self.ended.append("stopped")
            raise
        else:
            self.ended.append("finished")

    def words(self, text: str) -> Iterator[str]:
        yield from text.split()

    def state(self) -> dict[str, Any]:
        return {"produced": self.produced, "ended": list(self.ended)}


@serve.deployment
class Consumer:
    async def total(self, items: AsyncIterator[int]) -> int:
        return sum([item async for item in items])

    def total_sync(self, items: Iterable[int]) -> int:
        assert not hasattr(items, "__anext__"), "a sync method gets a plain iterator"
        return sum(items)

    async def first(self, items: AsyncIterator[int], count: int) -> list[int]:
        taken = []
        async for item in items:
            taken.append(item)
            if len(taken) == count:
                break
        return taken

    async def until_error(self, items: AsyncIterator[int]) -> dict[str, Any]:
        seen = []
        try:
            async for item in items:
                seen.append(item)
        except UpstreamBroke as exc:
            return {"seen": seen, "error": type(exc).__name__, "message": str(exc)}
        return {"seen": seen, "error": None}

    async def slowly(self, items: AsyncIterator[int], count: int) -> int:
        async for item in items:
            await asyncio.sleep(0.002)
            if item + 1 == count:
                return count
        return -1

    async def doubled(self, items: AsyncIterator[int]) -> AsyncIterator[int]:
        async for item in items:
            yield 2 * item

    def upper(self, words: Iterable[str]) -> Iterator[str]:
        for word in words:
            yield word.upper()


def _apps(backend: str) -> tuple[DeploymentHandle, DeploymentHandle]:
    producer = serve.run(Producer.bind(), backend=backend, name="producer", route_prefix=None)
    consumer = serve.run(Consumer.bind(), backend=backend, name="consumer", route_prefix=None)
    return producer, consumer


def _numbers(producer: DeploymentHandle, n: int, **kwargs: Any) -> Any:
    return producer.options(stream=True).numbers.remote(n, **kwargs)


def test_an_async_method_reads_another_calls_stream(backend: str) -> None:
    producer, consumer = _apps(backend)
    assert consumer.total.remote(_numbers(producer, 100)).result(timeout_s=30) == 4950
    # As a keyword argument too.
    assert consumer.total.remote(items=_numbers(producer, 10)).result(timeout_s=30) == 45


def test_a_sync_method_reads_it_as_a_plain_iterator(backend: str) -> None:
    producer, consumer = _apps(backend)
    # Enough calls that the method would be trusted to run on the loop if it had no stream.
    for _ in range(20):
        assert consumer.total_sync.remote(_numbers(producer, 20)).result(timeout_s=30) == 190


def test_three_stages_stream_token_by_token(backend: str) -> None:
    producer, consumer = _apps(backend)
    words = producer.options(stream=True).words.remote("one two three")
    upper = consumer.options(stream=True).upper.remote(words)
    assert list(upper) == ["ONE", "TWO", "THREE"]
    numbers = _numbers(producer, 5)
    doubled = consumer.options(stream=True).doubled.remote(numbers)
    assert list(consumer.options(stream=True).doubled.remote(doubled)) == [0, 4, 8, 12, 16]


def test_an_upstream_error_reaches_the_reader_as_its_own_type(backend: str) -> None:
    producer, consumer = _apps(backend)
    outcome = consumer.until_error.remote(_numbers(producer, 10, fail_after=3))
    assert outcome.result(timeout_s=30) == {
        "seen": [0, 1, 2],
        "error": "UpstreamBroke",
        "message": "broke after 3",
    }


def test_an_upstream_error_reaches_a_sync_reader_too(backend: str) -> None:
    producer, consumer = _apps(backend)
    with pytest.raises(UpstreamBroke, match="broke after 2"):
        consumer.total_sync.remote(_numbers(producer, 10, fail_after=2)).result(timeout_s=30)


def test_a_reader_that_stops_stops_the_upstream_generator(backend: str) -> None:
    producer, consumer = _apps(backend)
    endless = _numbers(producer, 10**9)
    assert consumer.first.remote(endless, 5).result(timeout_s=30) == [0, 1, 2, 3, 4]
    state = eventually(
        lambda: producer.state.remote().result(timeout_s=10), lambda s: s["ended"], timeout_s=20
    )
    assert state["ended"] == ["stopped"]
    # Held back while it ran: it got at most the buffers' worth ahead of the reader.
    assert state["produced"] <= 5 + AHEAD


def test_a_slow_reader_holds_the_producer_back(backend: str) -> None:
    producer, consumer = _apps(backend)
    count = 6 * STREAM_BUFFER
    reading = consumer.slowly.remote(_numbers(producer, 10**9), count)
    assert reading.result(timeout_s=60) == count
    state = eventually(
        lambda: producer.state.remote().result(timeout_s=10), lambda s: s["ended"], timeout_s=20
    )
    # Never more than the bounded buffers ahead of what was read.
    assert count <= state["produced"] <= count + AHEAD
    assert state["ended"] == ["stopped"]


def test_cancelling_the_reading_call_stops_the_upstream_generator(backend: str) -> None:
    producer, consumer = _apps(backend)
    reading = consumer.total.remote(_numbers(producer, 10**9))
    time.sleep(0.3)
    reading.cancel()
    state = eventually(
        lambda: producer.state.remote().result(timeout_s=10), lambda s: s["ended"], timeout_s=20
    )
    assert state["ended"] == ["stopped"]


def test_a_stream_passed_from_inside_a_deployment(backend: str) -> None:
    @serve.deployment
    class Pipeline:
        def __init__(self, producer: DeploymentHandle, consumer: DeploymentHandle) -> None:
            self.producer = producer
            self.consumer = consumer

        async def __call__(self, n: int) -> int:
            numbers = self.producer.options(stream=True).numbers.remote(n)
            return await self.consumer.total.remote(numbers)

    app = Pipeline.bind(Producer.bind(), Consumer.bind())
    handle = serve.run(app, backend=backend, route_prefix=None)
    assert handle.remote(50).result(timeout_s=30) == 1225


def test_a_slow_sync_reader_in_the_driver_holds_the_producer_back(backend: str) -> None:
    producer, _ = _apps(backend)
    stream = _numbers(producer, 10**9)
    # The driver's reader takes what is there in one go: still a bounded amount.
    for read, item in enumerate(stream):
        assert item == read
        if read == 3 * STREAM_BUFFER:
            break
        if read % STREAM_BUFFER == 0:
            time.sleep(0.1)  # the producer runs ahead as far as it may meanwhile
    state = producer.state.remote().result(timeout_s=10)
    assert state["produced"] <= 3 * STREAM_BUFFER + AHEAD
    stream.cancel()
    state = eventually(
        lambda: producer.state.remote().result(timeout_s=10), lambda s: s["ended"], timeout_s=20
    )
    assert state["ended"] == ["stopped"]
