"""``handle.options(stream=True, stream_chunk_ms=...)``: a stream's items may wait
that long to cross from a replica in another process together; the reader gets the
same items, one by one, with errors, cancellation and backpressure as without."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import tandem as serve
from helpers import eventually
from tandem.handle import DeploymentHandle


class Broken(Exception):
    pass


@serve.deployment(max_ongoing_requests=10)
class Ticker:
    def __init__(self) -> None:
        self.made = 0

    async def tick(self, count: int, every_s: float = 0.0, fail_after: int = -1) -> Any:
        self.made = 0
        for i in range(count):
            if i == fail_after:
                raise Broken(f"broke after {i}")
            self.made += 1
            yield i
            await asyncio.sleep(every_s)

    def made_so_far(self) -> int:
        return self.made


def test_chunked_items_reach_the_reader_one_by_one_in_order(backend: str) -> None:
    ticker = serve.run(Ticker.bind(), backend=backend, route_prefix=None)
    chunked = ticker.options(stream=True, stream_chunk_ms=20).tick
    assert list(chunked.remote(500)) == list(range(500))
    assert list(chunked.remote(0)) == []
    # Spread out in time: several chunks.
    assert list(chunked.remote(10, 0.005)) == list(range(10))


def test_an_error_arrives_after_the_items_before_it(backend: str) -> None:
    ticker = serve.run(Ticker.bind(), backend=backend, route_prefix=None)
    got = []
    with pytest.raises(Broken, match="broke after 3"):
        for item in ticker.options(stream=True, stream_chunk_ms=50).tick.remote(10, 0, 3):
            got.append(item)
    assert got == [0, 1, 2]


def test_items_made_within_the_window_cross_together(remote_backend: str) -> None:
    ticker = serve.run(Ticker.bind(), backend=remote_backend, route_prefix=None)
    # Five items 20 ms apart, in a window of a second: the first arrives with the rest.
    stream = ticker.options(stream=True, stream_chunk_ms=1000).tick.remote(5, 0.02)
    assert next(iter(stream)) == 0
    assert ticker.made_so_far.remote().result(timeout_s=10) == 5
    assert list(stream) == [1, 2, 3, 4]
    # Without a window, the first leaves at once.
    stream = ticker.options(stream=True).tick.remote(5, 0.5)
    assert next(iter(stream)) == 0
    assert ticker.made_so_far.remote().result(timeout_s=10) < 5
    stream.cancel()


def test_a_reader_that_stops_stops_a_chunked_stream(remote_backend: str) -> None:
    ticker = serve.run(Ticker.bind(), backend=remote_backend, route_prefix=None)
    stream = ticker.options(stream=True, stream_chunk_ms=5).tick.remote(10_000_000, 0.001)
    for item in stream:
        if item == 20:
            break
    stream.cancel()

    def made() -> int:
        return int(ticker.made_so_far.remote().result(timeout_s=10))

    def settled() -> bool:
        before = made()
        time.sleep(0.2)
        return made() == before

    assert eventually(settled, bool)  # the generator stopped...
    assert made() < 1000  # ...a bounded number of items after the reader


def test_stream_chunk_ms_is_checked() -> None:
    handle = DeploymentHandle("Ticker")
    with pytest.raises(ValueError, match="stream_chunk_ms applies to streaming calls"):
        handle.options(stream_chunk_ms=5)
    for bad in (-1, 1001, float("nan")):
        with pytest.raises(ValueError, match="stream_chunk_ms must be between"):
            handle.options(stream=True, stream_chunk_ms=bad)
    for bad_type in ("5", True):
        with pytest.raises(TypeError, match="stream_chunk_ms must be a number"):
            handle.options(stream=True, stream_chunk_ms=bad_type)
    chunked = handle.options(stream=True, stream_chunk_ms=5)
    assert chunked.other._stream_chunk_s == 0.005
    assert chunked.options(stream_chunk_ms=None)._stream_chunk_s == 0
    assert chunked != handle.options(stream=True)
