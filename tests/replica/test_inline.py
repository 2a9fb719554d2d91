"""Sync methods that always return at once run on the replica's loop; all others in threads.

See replica/inline.py for the rule. The observable promise: a sync method that
is slow, or that waits on other deployments, never runs on the loop (so it
never stops the replica from taking other requests), and a fast one stops
paying the thread hop after its trial.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import pytest

import tandem as serve
from conftest import BACKENDS
from tandem._private.calls.responses import BlocksTheLoopError
from tandem._private.replica.inline import (
    FAST_S,
    SLOW_S,
    STRIKES,
    TRIAL_RUNS,
    InlineTrial,
    names_blocking_call,
)
from tandem._private.replica.running import run_inline
from tandem._private.replica.threads import UserCodeExit
from tandem.handle import DeploymentHandle


@pytest.fixture(params=[b for b in BACKENDS if b != "ray"])
def backend(request: pytest.FixtureRequest) -> str:
    """The rule lives in the replica, which every backend hosts the same way
    (replica/host.py): the local and process backends prove it; ray adds only time."""
    return str(request.param)


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@serve.deployment
class Where:
    """Each method answers whether it ran on the replica's event loop."""

    def __init__(self) -> None:
        self.slow_from: int | None = None
        self.calls = 0

    def fast(self) -> bool:
        return _on_loop()

    def slow(self) -> bool:
        time.sleep(SLOW_S * 3)
        return _on_loop()

    def sometimes_slow(self) -> bool:
        self.calls += 1
        if self.slow_from is not None and self.calls >= self.slow_from:
            time.sleep(SLOW_S * 3)
        return _on_loop()

    def slow_from_call(self, n: int) -> None:
        self.slow_from = self.calls + n

    def holds(self, seconds: float) -> str:
        time.sleep(seconds)
        return "held"

    async def quick(self) -> str:
        return "quick"


def _calls(handle: DeploymentHandle, method: str, n: int) -> list[bool]:
    return [getattr(handle, method).remote().result(timeout_s=10) for _ in range(n)]


def _until_on_loop(handle: DeploymentHandle, method: str) -> list[bool]:
    """Calls ``method`` until one runs on the loop (a preempted thread can restart the
    trial's count on a busy machine, so this allows a few trials)."""
    seen: list[bool] = []
    while not seen or not seen[-1]:
        assert len(seen) < TRIAL_RUNS * 4, f"{method} never moved to the loop: {seen}"
        seen.append(getattr(handle, method).remote().result(timeout_s=10))
    return seen


def test_a_fast_sync_method_moves_to_the_loop_after_its_trial(backend: str) -> None:
    handle = serve.run(Where.bind(), backend=backend, route_prefix=None)
    on_loop = _until_on_loop(handle, "fast")
    # On trial in threads (the first calls, maybe more if the machine is busy), then on the loop.
    assert on_loop[:TRIAL_RUNS] == [False] * TRIAL_RUNS
    assert _calls(handle, "fast", 3) == [True] * 3


def test_a_slow_sync_method_never_runs_on_the_loop(backend: str) -> None:
    handle = serve.run(Where.bind(), backend=backend, route_prefix=None)
    assert _calls(handle, "slow", TRIAL_RUNS + 4) == [False] * (TRIAL_RUNS + 4)


def test_a_method_slow_on_the_loop_goes_back_to_threads_for_good(backend: str) -> None:
    handle = serve.run(Where.bind(), backend=backend, route_prefix=None)
    _until_on_loop(handle, "sometimes_slow")
    handle.slow_from_call.remote(1).result(timeout_s=10)
    # At most the first STRIKES slow calls still ran on the loop (fewer if a fast call
    # there was preempted, which counts as a strike); every call after them in a thread.
    on_loop = _calls(handle, "sometimes_slow", 6)
    assert on_loop[0] is True and on_loop.count(True) <= STRIKES
    assert on_loop == [True] * on_loop.count(True) + [False] * on_loop.count(False)


def test_a_slow_sync_method_does_not_stop_a_promoted_one(backend: str) -> None:
    """While a slow sync call holds its thread, fast calls (now on the loop) still answer."""
    handle = serve.run(
        Where.options(max_ongoing_requests=4).bind(), backend=backend, route_prefix=None
    )
    _until_on_loop(handle, "fast")
    held = handle.holds.remote(1.0)
    time.sleep(0.1)
    start = time.perf_counter()
    assert _calls(handle, "fast", 3) == [True] * 3
    assert handle.quick.remote().result(timeout_s=5) == "quick"
    assert time.perf_counter() - start < 0.8  # the held call alone takes 1 s
    assert held.result(timeout_s=5) == "held"


@serve.deployment
class Callee:
    def __call__(self) -> str:
        return "callee"


@serve.deployment
class Caller:
    def __init__(self, callee: DeploymentHandle) -> None:
        self.callee = callee

    def __call__(self) -> tuple[str, bool]:
        return self.callee.remote().result(timeout_s=10), _on_loop()


def test_a_sync_method_that_waits_on_a_handle_stays_in_threads(backend: str) -> None:
    handle = serve.run(Caller.bind(Callee.bind()), backend=backend, route_prefix=None)
    answers = [handle.remote().result(timeout_s=10) for _ in range(TRIAL_RUNS + 4)]
    assert answers == [("callee", False)] * (TRIAL_RUNS + 4)


# -- the rule itself ----------------------------------------------------------


def test_trial_promotes_after_enough_fast_runs_in_a_row() -> None:
    def fn() -> None:
        pass

    trial = InlineTrial(fn)
    for _ in range(TRIAL_RUNS - 1):
        trial.ran_in_thread(FAST_S / 10)
    trial.ran_in_thread(FAST_S * 2)  # one slow call (a preempted thread?): count again
    for _ in range(TRIAL_RUNS - 1):
        trial.ran_in_thread(FAST_S / 10)
    assert not trial.inline
    trial.ran_in_thread(FAST_S / 10)
    assert trial.inline and not trial.retired
    # The trial's slow call does not count on the loop: STRIKES slow calls there still.
    for _ in range(STRIKES - 1):
        trial.ran_inline(SLOW_S * 2)
    assert trial.inline


def test_slow_calls_on_trial_or_on_the_loop_retire_the_method() -> None:
    def fn() -> None:
        pass

    on_trial = InlineTrial(fn)
    for _ in range(STRIKES):
        on_trial.ran_in_thread(FAST_S * 2)
    for _ in range(TRIAL_RUNS * 2):
        on_trial.ran_in_thread(0)
    assert on_trial.retired and not on_trial.inline

    on_loop = InlineTrial(fn)
    for _ in range(TRIAL_RUNS):
        on_loop.ran_in_thread(0)
    assert on_loop.inline
    on_loop.ran_inline(SLOW_S / 2)
    for _ in range(STRIKES - 1):
        on_loop.ran_inline(SLOW_S * 2)
    assert on_loop.inline
    on_loop.ran_inline(SLOW_S * 2)
    assert on_loop.retired and not on_loop.inline


def _waits(response: Any) -> Any:
    return response.result()


def _fires(handle: Any) -> None:
    handle.remote()


def _uses_asyncio_run() -> None:
    asyncio.run(asyncio.sleep(0))


def _in_a_nested_function() -> Callable[[], Any]:
    def inner(response: Any) -> Any:
        return response.result()

    return inner


def _plain(x: int) -> int:
    return sum(i for i in range(x))


@functools.wraps(_waits)
def _decorated(*args: Any) -> Any:
    return _waits(*args)


@pytest.mark.parametrize(
    ("fn", "blocks"),
    [
        (_waits, True),
        (_fires, True),
        (_uses_asyncio_run, True),
        (_in_a_nested_function, True),
        (_plain, False),
    ],
)
def test_code_that_names_a_blocking_call_is_never_tried(fn: Any, blocks: bool) -> None:
    assert names_blocking_call(fn.__code__) is blocks
    assert InlineTrial(fn).retired is blocks


def test_the_wrapped_function_of_a_decorator_is_read_too() -> None:
    assert not names_blocking_call(_decorated.__code__)
    assert InlineTrial(_decorated).retired


def test_a_callable_without_code_is_never_tried() -> None:
    assert InlineTrial(len).retired


def test_a_blocking_wait_met_on_the_loop_sends_the_method_to_threads() -> None:
    """A blocking call hidden where the code scan cannot see it fails that one call
    (as it would on Ray Serve, which runs every sync method on the loop), then never again."""

    def hidden() -> None:
        raise BlocksTheLoopError("blocks")

    trial = InlineTrial(hidden)
    for _ in range(TRIAL_RUNS):
        trial.ran_in_thread(0)
    assert trial.inline
    with pytest.raises(BlocksTheLoopError):
        run_inline(trial, hidden, (), {})
    assert trial.retired and not trial.inline


def test_user_code_exit_on_the_loop_is_contained() -> None:
    def exits() -> None:
        raise SystemExit(3)

    trial = InlineTrial(exits)
    # A plain error of the request, not a SystemExit that would stop the loop.
    with pytest.raises(UserCodeExit, match="SystemExit") as raised:
        run_inline(trial, exits, (), {})
    assert isinstance(raised.value.__cause__, SystemExit)
