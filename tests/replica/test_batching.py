"""@serve.batch: calls that arrive together run as one call on lists."""

from __future__ import annotations

import time

import pytest

import tandem as serve
from helpers import wait_for
from tandem.handle import DeploymentHandle


@serve.deployment(max_ongoing_requests=64)
class Doubler:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def double(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        return [x * 2 for x in xs]

    async def __call__(self, x: int) -> int:
        return await self.double(x)

    def batch_sizes(self) -> list[int]:
        return self.sizes


def _calls(handle: DeploymentHandle, values: list[object]) -> list[object]:
    responses = [handle.remote(v) for v in values]
    return [r.result(timeout_s=10) for r in responses]


def test_concurrent_calls_are_batched_and_each_gets_its_own_result(backend: str) -> None:
    handle = serve.run(Doubler.bind(), backend=backend, route_prefix=None)
    assert _calls(handle, list(range(20))) == [x * 2 for x in range(20)]
    sizes = handle.batch_sizes.remote().result()
    assert sum(sizes) == 20
    assert max(sizes) <= 8
    assert max(sizes) > 1, f"nothing was batched: {sizes}"


def test_a_lone_call_waits_at_most_the_batch_timeout(backend: str) -> None:
    handle = serve.run(Doubler.bind(), backend=backend, route_prefix=None)
    handle.remote(0).result(timeout_s=10)  # warm up
    start = time.perf_counter()
    assert handle.remote(21).result(timeout_s=5) == 42
    assert time.perf_counter() - start < 1.0


@serve.deployment(max_ongoing_requests=64)
class Pairs:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def combine(self, words: list[str], counts: list[int], *, sep: list[str]) -> list[str]:
        assert len(words) == len(counts) == len(sep)
        return [s.join([w] * c) for w, c, s in zip(words, counts, sep)]

    async def __call__(self, word: str, count: int) -> str:
        return await self.combine(word, count, sep="-")


def test_several_arguments_are_batched_per_argument(backend: str) -> None:
    handle = serve.run(Pairs.bind(), backend=backend, route_prefix=None)
    responses = [handle.remote(w, n) for w, n in [("a", 1), ("b", 2), ("c", 3)]]
    assert [r.result(timeout_s=10) for r in responses] == ["a", "b-b", "c-c-c"]


class BatchFailed(Exception):
    pass


@serve.deployment(max_ongoing_requests=64)
class Faulty:
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def run(self, xs: list[int]) -> list[int]:
        if any(x < 0 for x in xs):
            raise BatchFailed(f"negative input in {sorted(xs)}")
        if any(x == 99 for x in xs):
            return xs[:-1]  # one result short
        return xs

    async def __call__(self, x: int) -> int:
        return await self.run(x)


def test_an_exception_fails_every_caller_of_that_batch(backend: str) -> None:
    handle = serve.run(Faulty.bind(), backend=backend, route_prefix=None)
    responses = [handle.remote(x) for x in (1, -1, 2)]
    for response in responses:
        with pytest.raises(BatchFailed, match="negative input"):
            response.result(timeout_s=10)
    assert handle.remote(5).result(timeout_s=10) == 5, "the replica keeps serving"


def test_a_wrong_length_return_is_a_clear_error(backend: str) -> None:
    handle = serve.run(Faulty.bind(), backend=backend, route_prefix=None)
    with pytest.raises(TypeError, match="must return .* list of 1 results"):
        handle.remote(99).result(timeout_s=10)


@serve.deployment(max_ongoing_requests=64)
class Tokens:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate(self, prompts: list[str]):  # type: ignore[no-untyped-def]
        for step in range(3):
            # The prompt "short" stops after its first token.
            yield [StopIteration if (p == "short" and step > 0) else f"{p}{step}" for p in prompts]

    async def stream(self, prompt: str):  # type: ignore[no-untyped-def]
        async for token in self.generate(prompt):
            yield token


def test_streaming_batches_give_each_caller_its_own_stream(backend: str) -> None:
    handle = serve.run(Tokens.bind(), backend=backend, route_prefix=None)
    streamer = handle.options(method_name="stream", stream=True)
    long_stream, short_stream = streamer.remote("long"), streamer.remote("short")
    assert list(long_stream) == ["long0", "long1", "long2"]
    assert list(short_stream) == ["short0"]


@serve.deployment(max_ongoing_requests=64, user_config={"size": 2})
class Tunable:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def reconfigure(self, config: dict[str, int]) -> None:
        self.handle_batch.set_max_batch_size(config["size"])
        self.handle_batch.set_batch_wait_timeout_s(0.1)

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=0.01)
    async def handle_batch(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        return xs

    async def __call__(self, x: int) -> int:
        return await self.handle_batch(x)

    def batch_sizes(self) -> list[int]:
        return self.sizes


def test_batch_size_can_change_at_run_time(backend: str) -> None:
    handle = serve.run(Tunable.bind(), backend=backend, route_prefix=None)
    assert _calls(handle, list(range(6))) == list(range(6))
    assert max(handle.batch_sizes.remote().result()) <= 2


@serve.deployment(max_ongoing_requests=64)
class Sized:
    def __init__(self) -> None:
        self.totals: list[int] = []

    # As in Ray Serve, batch_size_fn gets the batch's items and says how big it is.
    @serve.batch(
        max_batch_size=6,
        batch_wait_timeout_s=0.1,
        batch_size_fn=lambda texts: sum(len(t) for t in texts),
    )
    async def handle_batch(self, texts: list[str]) -> list[int]:
        self.totals.append(sum(len(t) for t in texts))
        return [len(t) for t in texts]

    async def __call__(self, text: str) -> int:
        return await self.handle_batch(text)

    def batch_totals(self) -> list[int]:
        return self.totals


def test_batch_size_fn_counts_items_by_size(backend: str) -> None:
    handle = serve.run(Sized.bind(), backend=backend, route_prefix=None)
    assert _calls(handle, ["aaa", "bbb", "cc", "d", "eeee"]) == [3, 3, 2, 1, 4]
    assert max(handle.batch_totals.remote().result()) <= 6
    with pytest.raises(ValueError, match="more than max_batch_size=6"):
        handle.remote("x" * 7).result()
    assert handle.remote("ok").result() == 2  # the replica serves on


def test_bad_batch_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        serve.batch(max_batch_size=0)
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        serve.batch(batch_wait_timeout_s=-1)
    with pytest.raises(ValueError, match="max_concurrent_batches"):
        serve.batch(max_concurrent_batches=0)
    with pytest.raises(TypeError, match="async"):

        @serve.batch
        def not_async(xs: list[int]) -> list[int]:
            return xs


@serve.deployment(num_replicas=2, max_ongoing_requests=64)
class PerReplica:
    def __init__(self) -> None:
        self.rank = serve.get_replica_context().rank.rank
        self.handle_batch.set_max_batch_size(1 if self.rank == 0 else 5)

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=0.1)
    async def handle_batch(self, xs: list[int]) -> list[int]:
        return xs

    async def __call__(self, x: int) -> int:
        return await self.handle_batch(x)

    def max_batch_size(self) -> tuple[int, int]:
        return self.rank, self.handle_batch._get_max_batch_size()


def test_each_replica_keeps_its_own_batch_settings(backend: str) -> None:
    # On the local backend both replicas are objects of one class in one process.
    handle = serve.run(PerReplica.bind(), backend=backend, route_prefix=None)
    assert _calls(handle, [1, 2, 3]) == [1, 2, 3]  # each replica uses its own queue
    seen: dict[int, int] = {}
    wait_for(lambda: seen.update([handle.max_batch_size.remote().result()]) or len(seen) == 2)
    assert seen == {0: 1, 1: 5}


@serve.deployment(max_ongoing_requests=64)
class PatientBatcher:
    """Waits up to 10 s to fill a batch; each batch takes 50 ms to run."""

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=10.0)
    async def handle_batch(self, items: list[int]) -> list[int]:
        import asyncio

        await asyncio.sleep(0.05)
        return [2 * item for item in items]

    async def __call__(self, item: int) -> int:
        return await self.handle_batch(item)


def test_a_batch_closes_in_time_for_the_earliest_deadline_in_it(backend: str) -> None:
    handle = serve.run(PatientBatcher.bind(), backend=backend, route_prefix=None)
    # A full batch runs at once, and shows how long a batch takes to run.
    assert [r.result(timeout_s=10) for r in [handle.remote(1) for _ in range(32)]] == [2] * 32
    hurried = handle.options(timeout_s=2.0)
    started = time.monotonic()
    # Without a deadline this lone call would wait 10 s for company; it has 2 s.
    assert hurried.remote(21).result(timeout_s=20) == 42
    assert time.monotonic() - started < 2.0
