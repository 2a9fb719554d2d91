"""Handle calls and DeploymentResponse behaviour (unary calls).

Covers: ``.remote()`` never blocking, method access and ``options``, awaiting
and ``.result()`` from every kind of caller, chaining responses as arguments,
exception types across hops, cancellation (here and downstream), concurrency
and admission limits, several replicas, function deployments, backpressure and
handle pickling.

Applications run with ``route_prefix=None``: these tests are about handles,
and no HTTP traffic from elsewhere should reach their replicas.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
import threading
import time
import traceback
from typing import Any

import cloudpickle
import pytest

import tandem as serve
from helpers import eventually, wait_for
from tandem.exceptions import BackPressureError, RequestCancelledError
from tandem.handle import DeploymentHandle, DeploymentResponse


class CustomError(Exception):
    """A user-defined exception class that must survive hops as itself."""

    def __init__(self, code: int) -> None:
        super().__init__(f"custom failure {code}")
        self.code = code


# --------------------------------------------------------------------------
# .remote() returns at once
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_remote_returns_before_slow_method_ends(backend: str, kind: str) -> None:
    @serve.deployment
    class Slow:
        async def slow_async(self, x: int) -> int:
            await asyncio.sleep(0.5)
            return x + 1

        def slow_sync(self, x: int) -> int:
            time.sleep(0.5)
            return x + 1

    handle = serve.run(Slow.bind(), backend=backend, route_prefix=None)
    method = getattr(handle, f"slow_{kind}")

    start = time.perf_counter()
    response = method.remote(41)
    returned_after = time.perf_counter() - start
    assert isinstance(response, DeploymentResponse)
    assert returned_after < 0.1, f"remote() blocked for {returned_after:.3f}s"

    assert response.result() == 42
    finished_after = time.perf_counter() - start
    assert finished_after >= 0.45  # the method really was slow: remote() did not wait for it


# --------------------------------------------------------------------------
# method access and options()
# --------------------------------------------------------------------------


def test_method_access_and_call(backend: str) -> None:
    @serve.deployment
    class Greeter:
        def __call__(self, name: str) -> str:
            return f"call:{name}"

        def hello(self, name: str, *, punct: str = "!") -> str:
            return f"hello {name}{punct}"

        async def shout(self, name: str) -> str:
            return name.upper()

    handle = serve.run(Greeter.bind(), backend=backend, route_prefix=None)
    assert handle.remote("a").result() == "call:a"
    assert handle.hello.remote("bob").result() == "hello bob!"
    assert handle.hello.remote("bob", punct="?").result() == "hello bob?"
    assert handle.shout.remote("quiet").result() == "QUIET"


def test_options_method_name_returns_new_handle_and_leaves_old(backend: str) -> None:
    @serve.deployment
    class TwoMethods:
        def __call__(self) -> str:
            return "default"

        def other(self) -> str:
            return "other"

    handle = serve.run(TwoMethods.bind(), backend=backend, route_prefix=None)
    other = handle.options(method_name="other")

    assert isinstance(other, DeploymentHandle)
    assert other is not handle
    assert other != handle
    assert other.remote().result() == "other"
    # The original handle still calls __call__.
    assert handle.remote().result() == "default"
    assert handle == serve.get_app_handle("default")
    # And options() on the derived handle can go back.
    assert other.options(method_name="__call__").remote().result() == "default"


# --------------------------------------------------------------------------
# awaiting responses
# --------------------------------------------------------------------------


def test_await_response_inside_async_deployment(backend: str) -> None:
    @serve.deployment
    class Doubler:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0.01)
            return 2 * x

    @serve.deployment
    class AwaitingIngress:
        def __init__(self, doubler: DeploymentHandle) -> None:
            self.doubler = doubler

        async def __call__(self, x: int) -> list[int]:
            one = await self.doubler.remote(x)
            many = await asyncio.gather(*(self.doubler.remote(i) for i in range(3)))
            return [one, *many]

    handle = serve.run(AwaitingIngress.bind(Doubler.bind()), backend=backend, route_prefix=None)
    assert handle.remote(10).result() == [20, 0, 2, 4]


def test_await_response_from_driver_asyncio_loop(backend: str) -> None:
    @serve.deployment
    class Adder:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0.2)
            return x + 100

        def sync_add(self, x: int) -> int:
            return x + 1000

    handle = serve.run(Adder.bind(), backend=backend, route_prefix=None)

    async def main() -> tuple[int, int, list[int], float]:
        single = await handle.remote(1)
        sync_one = await handle.sync_add.remote(2)
        start = time.perf_counter()
        # Concurrent awaits on the user's loop overlap (5 x 0.2 s would be 1 s serially).
        many = await asyncio.gather(*(handle.remote(i) for i in range(5)))
        return single, sync_one, list(many), time.perf_counter() - start

    single, sync_one, many, elapsed = asyncio.run(main())
    assert single == 101
    assert sync_one == 1002
    assert many == [100, 101, 102, 103, 104]
    assert elapsed < 0.7


# --------------------------------------------------------------------------
# .result()
# --------------------------------------------------------------------------


def test_result_timeout_raises_timeout_error(backend: str) -> None:
    @serve.deployment
    class Sleepy:
        async def __call__(self) -> str:
            await asyncio.sleep(0.6)
            return "done"

    handle = serve.run(Sleepy.bind(), backend=backend, route_prefix=None)
    response = handle.remote()
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        response.result(timeout_s=0.1)
    waited = time.perf_counter() - start
    assert 0.05 <= waited < 0.4
    # The request was not abandoned by the timeout: the result still arrives.
    assert response.result(timeout_s=5) == "done"


def test_result_on_running_event_loop_raises_runtime_error(backend: str) -> None:
    @serve.deployment
    class Echo:
        def __call__(self, x: int) -> int:
            return x

    handle = serve.run(Echo.bind(), backend=backend, route_prefix=None)

    async def main() -> None:
        response = handle.remote(1)
        with pytest.raises(RuntimeError, match="await"):
            response.result()
        # The advice works: awaiting the same response gives its value.
        assert await response == 1

    asyncio.run(main())


def test_result_inside_async_deployment_raises_runtime_error(backend: str) -> None:
    @serve.deployment
    class Leaf:
        def __call__(self) -> str:
            return "leaf"

    @serve.deployment
    class BlockingIngress:
        def __init__(self, leaf: DeploymentHandle) -> None:
            self.leaf = leaf

        async def __call__(self) -> str:
            response = self.leaf.remote()
            try:
                response.result()
            except RuntimeError as exc:
                value = await response
                return f"refused ({'await' in str(exc)}) then {value}"
            return "result() did not refuse"

    handle = serve.run(BlockingIngress.bind(Leaf.bind()), backend=backend, route_prefix=None)
    assert handle.remote().result(timeout_s=5) == "refused (True) then leaf"


def test_result_from_sync_method_inside_replica(backend: str) -> None:
    @serve.deployment
    class Squarer:
        def __call__(self, x: int) -> int:
            return x * x

    @serve.deployment
    class SyncIngress:
        def __init__(self, squarer: DeploymentHandle) -> None:
            self.squarer = squarer

        def __call__(self, x: int) -> int:
            first = self.squarer.remote(x).result(timeout_s=5)
            return self.squarer.remote(first).result(timeout_s=5)

    handle = serve.run(SyncIngress.bind(Squarer.bind()), backend=backend, route_prefix=None)
    assert handle.remote(3).result(timeout_s=5) == 81


# --------------------------------------------------------------------------
# chaining
# --------------------------------------------------------------------------


def test_chained_responses_are_resolved_as_positional_and_keyword_args(backend: str) -> None:
    @serve.deployment
    class Producer:
        def __init__(self) -> None:
            self.finished: list[int] = []

        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0.1)
            self.finished.append(x)
            return x * 10

        def finished_list(self) -> list[int]:
            return list(self.finished)

    @serve.deployment
    class Consumer:
        def __call__(self, a: Any, *, b: Any) -> dict[str, Any]:
            return {
                "a": a,
                "b": b,
                "types": [type(a).__name__, type(b).__name__],
            }

    @serve.deployment
    class ChainIngress:
        def __init__(self, producer: DeploymentHandle, consumer: DeploymentHandle) -> None:
            self.producer = producer
            self.consumer = consumer

        async def __call__(self) -> Any:
            return await self.consumer.remote(self.producer.remote(1), b=self.producer.remote(2))

        def sync_chain(self) -> Any:
            return self.consumer.remote(self.producer.remote(3), b=self.producer.remote(4)).result(
                timeout_s=5
            )

    handle = serve.run(
        ChainIngress.bind(Producer.bind(), Consumer.bind()), backend=backend, route_prefix=None
    )
    assert handle.remote().result(timeout_s=5) == {"a": 10, "b": 20, "types": ["int", "int"]}
    assert handle.sync_chain.remote().result(timeout_s=5) == {
        "a": 30,
        "b": 40,
        "types": ["int", "int"],
    }


def test_chaining_from_driver(backend: str) -> None:
    @serve.deployment
    class Inc:
        def __call__(self, x: int) -> int:
            return x + 1

    handle = serve.run(Inc.bind(), backend=backend, route_prefix=None)
    response = handle.remote(handle.remote(handle.remote(0)))
    assert response.result(timeout_s=5) == 3
    assert handle.remote(x=handle.remote(x=10)).result(timeout_s=5) == 12


def test_chaining_error_in_first_call_reaches_caller_of_last(backend: str) -> None:
    @serve.deployment
    class Failing:
        def __call__(self, x: int) -> int:
            raise ValueError(f"bad input {x}")

    @serve.deployment
    class Downstream:
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, value: Any) -> Any:
            self.calls += 1
            return value

        def call_count(self) -> int:
            return self.calls

    @serve.deployment
    class FailChainIngress:
        def __init__(self, failing: DeploymentHandle, down: DeploymentHandle) -> None:
            self.failing = failing
            self.down = down

        async def __call__(self, kw: bool) -> Any:
            first = self.failing.remote(7)
            if kw:
                return await self.down.remote(value=first)
            return await self.down.remote(first)

        async def downstream_calls(self) -> int:
            return await self.down.call_count.remote()

    handle = serve.run(
        FailChainIngress.bind(Failing.bind(), Downstream.bind()), backend=backend, route_prefix=None
    )
    for kw in (False, True):
        with pytest.raises(ValueError, match="bad input 7"):
            handle.remote(kw).result(timeout_s=5)
    # The downstream method never ran with an unresolved or failed argument.
    assert handle.downstream_calls.remote().result(timeout_s=5) == 0


# --------------------------------------------------------------------------
# exceptions across hops
# --------------------------------------------------------------------------


def test_exception_types_preserved_across_two_hops(backend: str) -> None:
    @serve.deployment
    class Bottom:
        def explode_deep_down(self) -> None:
            raise ValueError("deep value error")

        async def custom(self, code: int) -> None:
            raise CustomError(code)

    @serve.deployment
    class Middle:
        def __init__(self, bottom: DeploymentHandle) -> None:
            self.bottom = bottom

        async def value_error(self) -> None:
            await self.bottom.explode_deep_down.remote()

        def custom(self, code: int) -> None:
            self.bottom.custom.remote(code).result(timeout_s=5)

    @serve.deployment
    class Top:
        def __init__(self, middle: DeploymentHandle) -> None:
            self.middle = middle

        async def value_error(self) -> None:
            await self.middle.value_error.remote()

        async def custom(self, code: int) -> None:
            await self.middle.custom.remote(code)

        async def catches_value_error(self) -> str:
            try:
                await self.middle.value_error.remote()
            except ValueError as exc:
                return f"caught {type(exc).__name__}"
            return "not caught"

    handle = serve.run(Top.bind(Middle.bind(Bottom.bind())), backend=backend, route_prefix=None)

    with pytest.raises(ValueError, match="deep value error") as value_info:
        handle.value_error.remote().result(timeout_s=5)
    # The remote traceback travels with it (in the traceback, message or __cause__).
    text = "".join(traceback.format_exception(value_info.value))
    assert "explode_deep_down" in text

    with pytest.raises(CustomError) as info:
        handle.custom.remote(17).result(timeout_s=5)
    assert info.value.code == 17
    assert "custom failure 17" in str(info.value)

    async def from_driver_loop() -> None:
        with pytest.raises(ValueError, match="deep value error"):
            await handle.value_error.remote()

    asyncio.run(from_driver_loop())

    # A deployment in the middle can catch the error as its own type, too.
    assert handle.catches_value_error.remote().result(timeout_s=5) == "caught ValueError"


def test_missing_method_raises_attribute_error_naming_deployment_and_method(
    backend: str,
) -> None:
    @serve.deployment(name="Holder")
    class HasOneMethod:
        def present(self) -> str:
            return "here"

    handle = serve.run(HasOneMethod.bind(), backend=backend, route_prefix=None)
    with pytest.raises(AttributeError) as info:
        handle.absent_method.remote().result(timeout_s=5)
    message = str(info.value)
    assert "Holder" in message
    assert "absent_method" in message
    with pytest.raises(AttributeError, match="absent_method"):
        handle.options(method_name="absent_method").remote().result(timeout_s=5)
    # The replica still serves its real methods afterwards.
    assert handle.present.remote().result(timeout_s=5) == "here"


# --------------------------------------------------------------------------
# cancellation
# --------------------------------------------------------------------------


def test_cancel_raises_request_cancelled_and_method_sees_cancelled_error(backend: str) -> None:
    @serve.deployment
    class Cancellable:
        def __init__(self) -> None:
            self.started = 0
            self.cancelled = 0
            self.completed = 0

        async def __call__(self) -> str:
            self.started += 1
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            self.completed += 1
            return "finished"

        def counts(self) -> tuple[int, int, int]:
            return self.started, self.cancelled, self.completed

    handle = serve.run(Cancellable.bind(), backend=backend, route_prefix=None)
    response = handle.remote()
    counts = eventually(lambda: handle.counts.remote().result(timeout_s=5), lambda c: c[0])
    assert counts == (1, 0, 0)

    start = time.perf_counter()
    response.cancel()
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=5)
    assert time.perf_counter() - start < 1
    counts = eventually(lambda: handle.counts.remote().result(timeout_s=5), lambda c: c[1])
    assert counts == (1, 1, 0)


def test_cancel_from_driver_loop(backend: str) -> None:
    @serve.deployment
    class CancelledOnLoop:
        def __init__(self) -> None:
            self.cancelled = False

        async def __call__(self) -> None:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                self.cancelled = True
                raise

        def was_cancelled(self) -> bool:
            return self.cancelled

    handle = serve.run(CancelledOnLoop.bind(), backend=backend, route_prefix=None)

    async def main() -> None:
        response = handle.remote()
        await asyncio.sleep(0.2)
        response.cancel()
        with pytest.raises(RequestCancelledError):
            await response

    asyncio.run(main())
    assert wait_for(lambda: handle.was_cancelled.remote().result(timeout_s=5)) is True


def test_cancel_before_method_starts(backend: str) -> None:
    @serve.deployment
    class NeverStarted:
        def __init__(self) -> None:
            self.started = 0

        async def __call__(self) -> None:
            self.started += 1
            await asyncio.sleep(0.3)

        def started_count(self) -> int:
            return self.started

    handle = serve.run(NeverStarted.bind(), backend=backend, route_prefix=None)
    response = handle.remote()
    response.cancel()  # at once, probably before the request reached the replica
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=5)
    time.sleep(0.1)
    assert handle.started_count.remote().result(timeout_s=5) == 0


def test_cancel_outer_request_cancels_awaited_downstream_call(backend: str) -> None:
    @serve.deployment
    class Inner:
        def __init__(self) -> None:
            self.events: list[str] = []

        async def __call__(self) -> str:
            self.events.append("started")
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                self.events.append("cancelled")
                raise
            self.events.append("completed")
            return "inner done"

        def get_events(self) -> list[str]:
            return list(self.events)

    @serve.deployment
    class Outer:
        def __init__(self, inner: DeploymentHandle) -> None:
            self.inner = inner
            self.outer_cancelled = False

        async def __call__(self) -> str:
            try:
                return await self.inner.remote()
            except asyncio.CancelledError:
                self.outer_cancelled = True
                raise

        async def report(self) -> tuple[bool, list[str]]:
            return self.outer_cancelled, await self.inner.get_events.remote()

    handle = serve.run(Outer.bind(Inner.bind()), backend=backend, route_prefix=None)
    response = handle.remote()
    report = eventually(lambda: handle.report.remote().result(timeout_s=5), lambda r: r[1])
    assert report == (False, ["started"])
    response.cancel()
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=5)
    # The outer's cancel and the inner's arrive separately (on ray, as two messages).
    report = eventually(
        lambda: handle.report.remote().result(timeout_s=5), lambda r: r[0] and len(r[1]) > 1
    )
    assert report == (True, ["started", "cancelled"])


def test_cancel_reaches_only_the_calls_the_cancelled_code_awaits(backend: str) -> None:
    """Cancellation follows the caller's own awaits: a downstream call the replica
    shields from it runs on, and the replica can still wait for it while cleaning up."""

    @serve.deployment
    class Child:
        async def __call__(self) -> str:
            await asyncio.sleep(0.5)
            return "child finished"

    @serve.deployment
    class Shielding:
        def __init__(self, child: DeploymentHandle) -> None:
            self.child = child
            self.events: list[str] = []

        async def __call__(self) -> str:
            self.events.append("started")
            pending = asyncio.ensure_future(self._ask_child())
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                self.events.append("cancelled")
                try:
                    self.events.append(await pending)
                except Exception as error:
                    self.events.append(type(error).__name__)
                raise

        async def _ask_child(self) -> str:
            return await self.child.remote()

        def seen(self) -> list[str]:
            return list(self.events)

    handle = serve.run(Shielding.bind(Child.bind()), backend=backend, route_prefix=None)
    response = handle.remote()
    assert eventually(lambda: handle.seen.remote().result(timeout_s=5), bool) == ["started"]
    response.cancel()
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=5)
    events = eventually(lambda: handle.seen.remote().result(timeout_s=5), lambda e: len(e) >= 3)
    assert events == ["started", "cancelled", "child finished"]


def test_cancel_sync_method_call(backend: str) -> None:
    @serve.deployment
    class SyncWork:
        def __init__(self) -> None:
            self.finished = 0

        def __call__(self) -> str:
            time.sleep(0.3)
            self.finished += 1
            return "done"

        def finished_count(self) -> int:
            return self.finished

    handle = serve.run(SyncWork.bind(), backend=backend, route_prefix=None)
    response = handle.remote()
    time.sleep(0.1)
    start = time.perf_counter()
    response.cancel()
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=5)
    # The caller is released at once; the thread itself cannot be interrupted.
    assert time.perf_counter() - start < 0.15
    # Cancelling a finished response changes nothing.
    done = handle.remote()
    assert done.result(timeout_s=5) == "done"
    done.cancel()
    assert done.result(timeout_s=5) == "done"


def test_cancelled_sync_call_keeps_its_slot_until_thread_ends(backend: str) -> None:
    @serve.deployment(max_ongoing_requests=1)
    class OneAtATime:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.current = 0
            self.peak = 0

        def __call__(self) -> None:
            with self.lock:
                self.current += 1
                self.peak = max(self.peak, self.current)
            time.sleep(0.3)
            with self.lock:
                self.current -= 1

        def peak_seen(self) -> int:
            return self.peak

    handle = serve.run(OneAtATime.bind(), backend=backend, route_prefix=None)
    first = handle.remote()
    time.sleep(0.1)
    first.cancel()
    handle.remote().result(timeout_s=5)
    assert handle.peak_seen.remote().result(timeout_s=5) == 1


def test_cancelled_queued_request_frees_its_queue_place(backend: str) -> None:
    @serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
    class Narrow:
        def __init__(self) -> None:
            self.seen: list[int] = []

        async def __call__(self, i: int) -> int:
            self.seen.append(i)
            await asyncio.sleep(0.3)
            return i

        def seen_list(self) -> list[int]:
            return list(self.seen)

    handle = serve.run(Narrow.bind(), backend=backend, route_prefix=None)
    running = handle.remote(1)
    queued = handle.remote(2)
    time.sleep(0.05)
    queued.cancel()
    with pytest.raises(RequestCancelledError):
        queued.result(timeout_s=5)
    # The cancelled request left the queue: another one fits, and the cancelled one never ran.
    replacement = handle.remote(3)
    assert running.result(timeout_s=5) == 1
    assert replacement.result(timeout_s=5) == 3
    assert handle.seen_list.remote().result(timeout_s=5) == [1, 3]


# --------------------------------------------------------------------------
# concurrency inside a replica
# --------------------------------------------------------------------------


def test_slow_sync_methods_run_concurrently_in_threads(backend: str) -> None:
    @serve.deployment(max_ongoing_requests=2)
    class Blocking:
        def __call__(self) -> str:
            time.sleep(0.5)
            return threading.current_thread().name

    handle = serve.run(Blocking.bind(), backend=backend, route_prefix=None)
    handle.remote().result(timeout_s=5)  # warm up
    start = time.perf_counter()
    responses = [handle.remote() for _ in range(2)]
    threads = [r.result(timeout_s=5) for r in responses]
    elapsed = time.perf_counter() - start
    assert elapsed < 0.85, f"two 0.5 s sync calls took {elapsed:.2f}s: they ran one after another"
    assert threads[0] != threads[1]


def test_slow_sync_method_does_not_block_other_requests(backend: str) -> None:
    @serve.deployment(max_ongoing_requests=3)
    class MixedWork:
        def block(self) -> str:
            time.sleep(0.6)
            return "blocked"

        async def quick(self) -> str:
            return "quick"

        def quick_sync(self) -> str:
            return "quick sync"

    handle = serve.run(MixedWork.bind(), backend=backend, route_prefix=None)
    slow = handle.block.remote()
    time.sleep(0.05)
    start = time.perf_counter()
    assert handle.quick.remote().result(timeout_s=5) == "quick"
    assert handle.quick_sync.remote().result(timeout_s=5) == "quick sync"
    assert time.perf_counter() - start < 0.3
    assert slow.result(timeout_s=5) == "blocked"


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_max_ongoing_requests_is_enforced(backend: str, kind: str) -> None:
    @serve.deployment(max_ongoing_requests=2)
    class Counted:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.current = 0
            self.peak = 0
            self.total = 0

        def _enter(self) -> None:
            with self.lock:
                self.current += 1
                self.total += 1
                self.peak = max(self.peak, self.current)

        def _leave(self) -> None:
            with self.lock:
                self.current -= 1

        async def work_async(self) -> None:
            self._enter()
            try:
                await asyncio.sleep(0.1)
            finally:
                self._leave()

        def work_sync(self) -> None:
            self._enter()
            try:
                time.sleep(0.1)
            finally:
                self._leave()

        def stats(self) -> tuple[int, int]:
            return self.peak, self.total

    handle = serve.run(Counted.bind(), backend=backend, route_prefix=None)
    method = getattr(handle, f"work_{kind}")
    start = time.perf_counter()
    responses = [method.remote() for _ in range(6)]
    for response in responses:
        response.result(timeout_s=5)
    elapsed = time.perf_counter() - start
    peak, total = handle.stats.remote().result(timeout_s=5)
    assert total == 6
    assert peak == 2  # never above the limit, and the limit was actually reached
    assert elapsed >= 0.28  # 6 calls of 0.1 s, 2 at a time: at least 3 rounds


def test_num_replicas_three_distinct_replicas_all_receive_requests(backend: str) -> None:
    @serve.deployment(num_replicas=3, max_ongoing_requests=1)
    class Replicated:
        async def __call__(self) -> str:
            await asyncio.sleep(0.2)
            return serve.get_replica_context().replica_id

        def whoami(self) -> str:
            return serve.get_replica_context().replica_id

    handle = serve.run(Replicated.bind(), backend=backend, route_prefix=None)
    # Three concurrent calls with room for one each: every replica must take one.
    ids = [r.result(timeout_s=5) for r in [handle.remote() for _ in range(3)]]
    assert len(set(ids)) == 3

    seen = {handle.whoami.remote().result(timeout_s=5) for _ in range(60)}
    assert seen == set(ids)


# --------------------------------------------------------------------------
# function deployments
# --------------------------------------------------------------------------


def test_function_deployment(backend: str) -> None:
    @serve.deployment
    def triple(x: int) -> int:
        return 3 * x

    @serve.deployment
    async def add_async(x: int, y: int = 0) -> int:
        await asyncio.sleep(0.01)
        return x + y

    handle = serve.run(triple.bind(), backend=backend, name="fn_sync", route_prefix=None)
    assert handle.remote(5).result(timeout_s=5) == 15
    async_handle = serve.run(add_async.bind(), backend=backend, name="fn_async", route_prefix=None)
    assert async_handle.remote(1, y=2).result(timeout_s=5) == 3


def test_function_deployment_named_method_fails_clearly(backend: str) -> None:
    @serve.deployment
    def plain_fn(x: int) -> int:
        return x

    handle = serve.run(plain_fn.bind(), backend=backend, route_prefix=None)
    with pytest.raises(AttributeError) as info:
        handle.some_method.remote(1).result(timeout_s=5)
    assert "plain_fn" in str(info.value)
    assert "some_method" in str(info.value)
    assert handle.remote(9).result(timeout_s=5) == 9


# --------------------------------------------------------------------------
# backpressure
# --------------------------------------------------------------------------


def test_max_queued_requests_back_pressure(backend: str) -> None:
    @serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
    class Bottleneck:
        def __init__(self) -> None:
            self.calls = 0

        async def __call__(self, i: int) -> int:
            self.calls += 1
            await asyncio.sleep(0.3)
            return i

        def call_count(self) -> int:
            return self.calls

    handle = serve.run(Bottleneck.bind(), backend=backend, route_prefix=None)
    responses = [handle.remote(i) for i in range(4)]
    outcomes: list[Any] = []
    for response in responses:
        try:
            outcomes.append(response.result(timeout_s=5))
        except BackPressureError as exc:
            outcomes.append(exc)
    # One runs, one waits in the queue, the rest are refused.
    assert outcomes[:2] == [0, 1]
    assert all(isinstance(o, BackPressureError) for o in outcomes[2:])
    assert "max_queued_requests" in str(outcomes[2])
    assert handle.call_count.remote().result(timeout_s=5) == 2
    # Once the queue is empty again, calls are accepted.
    assert handle.remote(9).result(timeout_s=5) == 9


# --------------------------------------------------------------------------
# pickling and handle lookups
# --------------------------------------------------------------------------


def test_handles_pickle_round_trip_and_get_app_handle(backend: str) -> None:
    @serve.deployment
    class Picklable:
        def __call__(self) -> str:
            return "call"

        def named(self) -> str:
            return "named"

    handle = serve.run(Picklable.bind(), backend=backend, name="pickled", route_prefix=None)
    named = handle.options(method_name="named")

    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, pickle.loads)):
        copy = loads(dumps(handle))
        assert isinstance(copy, DeploymentHandle)
        assert copy == handle
        assert hash(copy) == hash(handle)
        assert copy.remote().result(timeout_s=5) == "call"
        named_copy = loads(dumps(named))
        assert named_copy == named
        assert named_copy != handle
        assert named_copy.remote().result(timeout_s=5) == "named"

    by_name = serve.get_app_handle("pickled")
    assert by_name == handle
    assert by_name.remote().result(timeout_s=5) == "call"


def test_handle_passed_into_deployment_is_usable(backend: str) -> None:
    @serve.deployment
    class Target:
        def __call__(self, x: int) -> int:
            return -x

    @serve.deployment
    class Relay:
        async def __call__(self, h: DeploymentHandle, x: int) -> Any:
            return type(h).__name__, await h.remote(x)

    target = serve.run(Target.bind(), backend=backend, name="target", route_prefix=None)
    relay = serve.run(Relay.bind(), backend=backend, name="relay", route_prefix=None)
    assert tuple(relay.remote(target, 4).result(timeout_s=5)) == ("DeploymentHandle", -4)


def test_to_object_ref_without_ray_says_what_to_install(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "ray":
        pytest.skip("the ray backend runs only where Ray is installed")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed

    @serve.deployment
    class Hi:
        def __call__(self) -> str:
            return "hi"

    handle = serve.run(Hi.bind(), name="objref", route_prefix=None, backend=backend)
    with pytest.raises(ImportError, match=r"tandem-serve\[ray\]"):
        handle.remote()._to_object_ref_sync()
