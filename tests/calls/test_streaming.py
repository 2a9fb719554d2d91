"""Streaming calls: ``handle.options(stream=True)`` and DeploymentResponseGenerator.

Covers: sync and async iteration from the driver and inside deployments,
items arriving as they are yielded (sync generators in threads and async
generators), errors mid-stream, closing / cancelling early stopping the
replica's generator, and the TypeErrors for misuse.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import tandem as serve
from helpers import eventually
from tandem.exceptions import RequestCancelledError
from tandem.handle import DeploymentHandle, DeploymentResponseGenerator


# A short graceful shutdown keeps teardown fast even if a stream was left running.
@serve.deployment(graceful_shutdown_timeout_s=0.2)
class Counter:
    """Streams numbers; records how far each generator got and whether it was closed."""

    def __init__(self) -> None:
        self.produced = 0
        self.finally_ran = 0
        self.cancelled = 0

    def count_sync(self, n: int, delay: float = 0.0) -> Iterator[int]:
        try:
            for i in range(n):
                if delay:
                    time.sleep(delay)
                self.produced += 1
                yield i
        finally:
            self.finally_ran += 1

    async def count_async(self, n: int, delay: float = 0.0) -> AsyncIterator[int]:
        try:
            for i in range(n):
                if delay:
                    await asyncio.sleep(delay)
                self.produced += 1
                yield i
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.finally_ran += 1

    def fail_sync(self, good: int) -> Iterator[int]:
        yield from range(good)
        raise ValueError(f"failed after {good}")

    async def fail_async(self, good: int) -> AsyncIterator[int]:
        for i in range(good):
            yield i
        raise KeyError(f"failed after {good}")

    def not_a_generator(self) -> int:
        return 1

    def state(self) -> dict[str, int]:
        return {
            "produced": self.produced,
            "finally_ran": self.finally_ran,
            "cancelled": self.cancelled,
        }


def _stream(handle: DeploymentHandle, method: str) -> DeploymentHandle:
    return handle.options(method_name=method, stream=True)


# --------------------------------------------------------------------------
# basic iteration
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_stream_returns_generator_and_iterates_from_driver(backend: str, kind: str) -> None:
    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)
    gen = _stream(handle, f"count_{kind}").remote(5)
    assert isinstance(gen, DeploymentResponseGenerator)
    assert list(gen) == [0, 1, 2, 3, 4]
    # Exhausted: a further read ends at once, it does not hang.
    assert list(gen) == []
    assert handle.state.remote().result(timeout_s=5) == {
        "produced": 5,
        "finally_ran": 1,
        "cancelled": 0,
    }


def test_stream_option_via_method_access_and_empty_stream(backend: str) -> None:
    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)
    streaming = handle.options(stream=True)
    gen = streaming.count_async.remote(3)
    assert isinstance(gen, DeploymentResponseGenerator)
    assert list(gen) == [0, 1, 2]
    assert list(streaming.count_sync.remote(0)) == []
    # The original handle is still a unary handle.
    assert handle.state.remote().result(timeout_s=5)["produced"] == 3


def test_function_generator_deployment(backend: str) -> None:
    @serve.deployment
    def letters(word: str) -> Iterator[str]:
        yield from word

    handle = serve.run(letters.bind(), backend=backend, route_prefix=None)
    assert list(handle.options(stream=True).remote("abc")) == ["a", "b", "c"]


def test_async_iteration_from_driver_asyncio_loop(backend: str) -> None:
    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)

    async def main() -> tuple[list[int], list[int]]:
        first = [i async for i in _stream(handle, "count_async").remote(4)]
        second = [i async for i in _stream(handle, "count_sync").remote(3)]
        return first, second

    assert asyncio.run(main()) == ([0, 1, 2, 3], [0, 1, 2])


def test_sync_iteration_refused_on_running_loop(backend: str) -> None:
    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)

    async def main() -> list[int]:
        gen = _stream(handle, "count_async").remote(2)
        with pytest.raises(RuntimeError, match="async for"):
            next(gen)
        return [i async for i in gen]

    assert asyncio.run(main()) == [0, 1]


def test_async_iteration_inside_deployment(backend: str) -> None:
    @serve.deployment
    class Collector:
        def __init__(self, source: DeploymentHandle) -> None:
            self.source = source

        async def collect(self, n: int) -> list[int]:
            gen = self.source.options(method_name="count_async", stream=True).remote(n)
            return [i * 10 async for i in gen]

        def collect_sync(self, n: int) -> list[int]:
            gen = self.source.options(method_name="count_sync", stream=True).remote(n)
            return [i * 100 for i in gen]

        async def relay(self, n: int) -> AsyncIterator[str]:
            async for i in self.source.options(method_name="count_sync", stream=True).remote(n):
                yield f"item-{i}"

    handle = serve.run(Collector.bind(Counter.bind()), backend=backend, route_prefix=None)
    assert handle.collect.remote(3).result(timeout_s=5) == [0, 10, 20]
    assert handle.collect_sync.remote(3).result(timeout_s=5) == [0, 100, 200]
    assert list(_stream(handle, "relay").remote(2)) == ["item-0", "item-1"]


# --------------------------------------------------------------------------
# items arrive as they are yielded
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_items_arrive_as_they_are_yielded(backend: str, kind: str) -> None:
    @serve.deployment
    class Ticker:
        def ticks_sync(self) -> Iterator[float]:
            for _ in range(3):
                yield time.perf_counter()
                time.sleep(0.3)

        async def ticks_async(self) -> AsyncIterator[float]:
            for _ in range(3):
                yield time.perf_counter()
                await asyncio.sleep(0.3)

    handle = serve.run(Ticker.bind(), backend=backend, route_prefix=None)
    start = time.perf_counter()
    gen = _stream(handle, f"ticks_{kind}").remote()
    received: list[tuple[float, float]] = []  # (produced at, received at)
    for produced_at in gen:
        received.append((produced_at, time.perf_counter()))
    assert len(received) == 3
    first_received = received[0][1]
    last_produced = received[-1][0]
    assert first_received - start < 0.2, "the first item waited for later ones"
    assert last_produced - first_received > 0.45, "the first item arrived only at the end"
    for produced_at, received_at in received:
        assert received_at - produced_at < 0.2


def test_items_arrive_as_yielded_in_driver_asyncio_loop(backend: str) -> None:
    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)

    async def main() -> list[float]:
        start = time.perf_counter()
        arrivals = []
        async for _ in _stream(handle, "count_async").remote(3, 0.25):
            arrivals.append(time.perf_counter() - start)
        return arrivals

    arrivals = asyncio.run(main())
    assert len(arrivals) == 3
    assert arrivals[0] < 0.45
    assert arrivals[2] - arrivals[0] > 0.4


# --------------------------------------------------------------------------
# errors mid-stream
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "error"), [("sync", ValueError), ("async", KeyError)])
def test_exception_mid_stream_reaches_consumer_after_items(
    backend: str, kind: str, error: type[Exception]
) -> None:
    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)
    gen = _stream(handle, f"fail_{kind}").remote(2)
    items = []
    with pytest.raises(error, match="failed after 2"):
        for item in gen:
            items.append(item)  # noqa: PERF402 - keep the items read before the error
    assert items == [0, 1]


def test_exception_mid_stream_async_consumer_and_across_hop(backend: str) -> None:
    @serve.deployment
    class Forwarder:
        def __init__(self, source: DeploymentHandle) -> None:
            self.source = source

        async def forward(self) -> AsyncIterator[int]:
            async for i in self.source.options(method_name="fail_sync", stream=True).remote(3):
                yield i

        async def catch(self) -> str:
            got = []
            try:
                async for i in self.source.options(method_name="fail_async", stream=True).remote(1):
                    got.append(i)
            except KeyError:
                return f"caught KeyError after {got}"
            return "no error"

    handle = serve.run(Forwarder.bind(Counter.bind()), backend=backend, route_prefix=None)

    async def main() -> list[int]:
        items = []
        with pytest.raises(ValueError, match="failed after 3"):
            async for i in _stream(handle, "forward").remote():
                items.append(i)
        return items

    assert asyncio.run(main()) == [0, 1, 2]
    assert handle.catch.remote().result(timeout_s=5) == "caught KeyError after [0]"


# --------------------------------------------------------------------------
# closing early stops the generator in the replica
# --------------------------------------------------------------------------


STOPPABLE_KINDS = [
    "async",
    "sync",
]


def _wait_stopped(handle: DeploymentHandle) -> dict[str, int]:
    """The replica's state once its generator has stopped (finally ran), else the last seen."""
    return eventually(lambda: handle.state.remote().result(timeout_s=5), lambda s: s["finally_ran"])


@pytest.mark.parametrize("kind", STOPPABLE_KINDS)
def test_sync_close_stops_replica_generator(backend: str, kind: str) -> None:
    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)
    gen = _stream(handle, f"count_{kind}").remote(200, 0.05)
    assert next(gen) == 0
    assert next(gen) == 1
    gen.close()
    state = _wait_stopped(handle)
    assert state["finally_ran"] == 1
    produced = state["produced"]
    assert produced < 30
    time.sleep(0.2)
    assert handle.state.remote().result(timeout_s=5)["produced"] == produced  # no longer producing
    if kind == "async":
        assert state["cancelled"] == 1


@pytest.mark.parametrize("kind", STOPPABLE_KINDS)
def test_async_break_then_aclose_stops_replica_generator(backend: str, kind: str) -> None:
    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)

    async def main() -> list[int]:
        gen = _stream(handle, f"count_{kind}").remote(200, 0.05)
        taken = []
        async for i in gen:
            taken.append(i)
            if len(taken) == 3:
                break
        await gen.aclose()
        return taken

    assert asyncio.run(main()) == [0, 1, 2]
    state = _wait_stopped(handle)
    assert state["finally_ran"] == 1
    produced = state["produced"]
    assert produced < 30
    time.sleep(0.2)
    assert handle.state.remote().result(timeout_s=5)["produced"] == produced


@pytest.mark.parametrize("kind", STOPPABLE_KINDS)
def test_cancel_stops_replica_generator_and_reader_sees_cancelled(backend: str, kind: str) -> None:
    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)
    gen = _stream(handle, f"count_{kind}").remote(200, 0.05)
    assert next(gen) == 0
    gen.cancel()
    state = _wait_stopped(handle)
    assert state["finally_ran"] == 1
    assert state["produced"] < 30
    # Reading on after the cancel ends in RequestCancelledError, not a normal end or a hang.
    with pytest.raises(RequestCancelledError):
        for _ in gen:
            pass


def test_closing_early_inside_deployment_stops_downstream_generator(backend: str) -> None:
    @serve.deployment
    class TakeTwo:
        def __init__(self, source: DeploymentHandle) -> None:
            self.source = source

        async def take_two(self) -> list[int]:
            gen = self.source.options(method_name="count_async", stream=True).remote(200, 0.05)
            taken = []
            async for i in gen:
                taken.append(i)
                if len(taken) == 2:
                    break
            await gen.aclose()
            return taken

        async def state(self) -> dict[str, int]:
            return await self.source.state.remote()

    handle = serve.run(TakeTwo.bind(Counter.bind()), backend=backend, route_prefix=None)
    assert handle.take_two.remote().result(timeout_s=5) == [0, 1]
    state = _wait_stopped(handle)
    assert state["finally_ran"] == 1
    assert state["cancelled"] == 1
    assert state["produced"] < 30


def test_cancelling_outer_stream_stops_downstream_stream(backend: str) -> None:
    @serve.deployment(graceful_shutdown_timeout_s=0.2)
    class Relay:
        def __init__(self, source: DeploymentHandle) -> None:
            self.source = source

        async def relay(self) -> AsyncIterator[int]:
            async for i in self.source.options(method_name="count_async", stream=True).remote(
                200, 0.05
            ):
                yield i

        async def state(self) -> dict[str, int]:
            return await self.source.state.remote()

    handle = serve.run(Relay.bind(Counter.bind()), backend=backend, route_prefix=None)
    gen = _stream(handle, "relay").remote()
    assert next(gen) == 0
    gen.close()
    state = _wait_stopped(handle)
    assert state["finally_ran"] == 1
    assert state["produced"] < 30


# --------------------------------------------------------------------------
# misuse
# --------------------------------------------------------------------------


def test_passing_two_response_generators_to_one_call_raises_type_error(backend: str) -> None:
    @serve.deployment
    class Sink:
        def __call__(self, first: Any, second: Any) -> Any:
            return first

    sink = serve.run(Sink.bind(), backend=backend, name="sink", route_prefix=None)
    source = serve.run(Counter.bind(), backend=backend, name="source", route_prefix=None)
    one, two = _stream(source, "count_sync").remote(3), _stream(source, "count_sync").remote(2)
    with pytest.raises(TypeError, match="at most one DeploymentResponseGenerator"):
        sink.remote(one, two)
    with pytest.raises(TypeError, match="at most one DeploymentResponseGenerator"):
        sink.remote(one, second=two)
    # The streams themselves are unharmed and can still be read.
    assert (list(one), list(two)) == ([0, 1, 2], [0, 1])


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_generator_method_without_stream_raises_type_error(backend: str, kind: str) -> None:
    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)
    with pytest.raises(TypeError, match="stream=True"):
        getattr(handle, f"count_{kind}").remote(3).result(timeout_s=5)
    # Nothing was produced by the refused call.
    assert handle.state.remote().result(timeout_s=5)["produced"] == 0


def test_generator_function_deployment_without_stream_raises_type_error(backend: str) -> None:
    @serve.deployment
    def gen_fn(n: int) -> Iterator[int]:
        yield from range(n)

    handle = serve.run(gen_fn.bind(), backend=backend, route_prefix=None)
    with pytest.raises(TypeError, match="stream=True"):
        handle.remote(2).result(timeout_s=5)


def test_non_generator_with_stream_raises_type_error(backend: str) -> None:
    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)
    gen = _stream(handle, "not_a_generator").remote()
    with pytest.raises(TypeError, match="not a generator"):
        list(gen)

    async def main() -> None:
        with pytest.raises(TypeError):
            async for _ in _stream(handle, "not_a_generator").remote():
                pass

    asyncio.run(main())
