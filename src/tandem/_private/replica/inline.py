"""Which sync methods may run on the replica's event loop instead of a worker thread.

Handing a call to a worker thread and back costs two thread switches and a
wake-up of the loop; for a method that returns in a microsecond (formatting a
greeting, a dictionary lookup) that hop is most of the request. Ray Serve runs
every sync method on the loop; tandem keeps the promise that a slow sync method
never stops the replica from taking other requests, and runs on the loop only
the methods that have shown they cannot stop it:

- A method starts in worker threads, on trial. It runs on the loop once
  ``TRIAL_RUNS`` calls in a row each returned within ``FAST_S`` (wall time,
  measured in the thread); a slower call starts the count again, and the
  ``STRIKES``-th slower one ends the trial: threads for good.
- A method whose code names a call that would block or fail on a running loop
  (``.result()``, ``.remote()``, ``asyncio.run``, ``run_until_complete``) is
  never tried: it waits for, or talks to, other deployments.
- On the loop, a call that takes longer than ``SLOW_S`` is a strike; the
  ``STRIKES``-th sends the method back to threads for good.

Strikes rather than one slow call, because a thread can be preempted by the
operating system in the middle of even the shortest call on a busy machine.
So a method that is slow only now and then can hold the loop at most
``STRIKES`` times, for the length of one call each, before it stops being run
there.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

TRIAL_RUNS = 16
FAST_S = 200e-6
SLOW_S = 1e-3
STRIKES = 2

# Attribute and global names whose call would block, or fail, on a running loop.
BLOCKING_NAMES = frozenset(
    {"result", "remote", "run", "run_until_complete", "run_coroutine_threadsafe"}
)


def _codes_of(fn: Callable[..., Any]) -> list[types.CodeType] | None:
    """The code of ``fn`` and of what it wraps (``functools.wraps``); None if unreadable."""
    codes = []
    seen: set[int] = set()
    target: Any = fn
    while target is not None and id(target) not in seen:
        seen.add(id(target))
        code = getattr(getattr(target, "__func__", target), "__code__", None)
        if not isinstance(code, types.CodeType):
            return None
        codes.append(code)
        target = getattr(target, "__wrapped__", None)
    return codes


def names_blocking_call(code: types.CodeType) -> bool:
    """Whether ``code`` (or a function or comprehension nested in it) names a blocking call."""
    if BLOCKING_NAMES.intersection(code.co_names):
        return True
    return any(
        names_blocking_call(const) for const in code.co_consts if isinstance(const, types.CodeType)
    )


class InlineTrial:
    """Where one sync method runs: worker threads (on trial, or for good) or the loop."""

    __slots__ = ("fast_runs", "inline", "retired", "strikes")

    def __init__(self, fn: Callable[..., Any]) -> None:
        codes = _codes_of(fn)
        self.inline = False
        self.fast_runs = 0
        self.strikes = 0
        # Never to run on the loop: code we cannot read, or code that blocks by name.
        self.retired = codes is None or any(names_blocking_call(code) for code in codes)

    def ran_in_thread(self, seconds: float) -> None:
        """A call on trial took ``seconds`` in its worker thread."""
        if self.retired or self.inline:
            return
        if seconds > FAST_S:
            self.fast_runs = 0
            self._strike()
            return
        self.fast_runs += 1
        if self.fast_runs >= TRIAL_RUNS:
            self.inline = True
            self.strikes = 0  # those of the trial were noise: STRIKES slow calls on the loop

    def ran_inline(self, seconds: float) -> None:
        """A call on the loop took ``seconds``; slow ones send the method to threads for good."""
        if seconds > SLOW_S:
            self._strike()

    def retire(self) -> None:
        """Threads for good, now."""
        self.inline = False
        self.retired = True

    def _strike(self) -> None:
        self.strikes += 1
        if self.strikes >= STRIKES:
            self.retire()
