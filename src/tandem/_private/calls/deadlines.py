"""Deadlines that follow a request through the graph.

A request's deadline (``RequestMetadata.deadline``, a ``time.time()``) comes from
``handle.options(timeout_s=...)``, the proxy's ``request_timeout_s`` or the
client (``X-Request-Deadline-Ms``, a gRPC deadline), whichever is first; every
call made while serving it inherits it (``handle.remote``). Wall-clock time, so
it means the same in every process of the machine (and, NTP willing, of a Ray
cluster).

Two places keep it. The caller (``Runtime``) runs the whole call under a
:class:`DeadlineScope`: a call still queued for a replica when the deadline
passes is dropped, and one running is cancelled, which cancels it in every
deployment it reached. The replica drops a request that arrives past its
deadline, or whose deadline passes while it waits for a slot, before it runs,
and counts it (``tandem_deployment_deadline_exceeded``).
"""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any

from tandem.exceptions import DeadlineExceededError


def deadline_in(timeout_s: float | None, inherited: float | None) -> float | None:
    """The deadline of a call made now with ``timeout_s``, within an ``inherited`` one."""
    if timeout_s is None:
        return inherited
    own = time.time() + timeout_s
    return own if inherited is None or own < inherited else inherited


# The loop's timers run on the monotonic clock and deadlines on the wall clock: a
# request cancelled at its deadline may see the wall clock a little short of it.
CLOCK_SLACK_S = 0.05


def passed(deadline: float | None) -> bool:
    """Whether ``deadline`` has passed (give or take the clocks' slack)."""
    return deadline is not None and time.time() >= deadline - CLOCK_SLACK_S


def exceeded(what: str) -> DeadlineExceededError:
    return DeadlineExceededError(f"The deadline of the request passed {what}.")


class DeadlineScope:
    """``with DeadlineScope(deadline):`` around awaits in a task: cancels the task when
    ``deadline`` passes, and turns that cancellation into DeadlineExceededError.

    (``asyncio.timeout`` does this from Python 3.11; tandem supports 3.10.)
    """

    __slots__ = ("_deadline", "_handle", "_task", "_what", "expired")

    def __init__(self, deadline: float, what: str) -> None:
        self._deadline = deadline
        self._what = what
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.expired = False

    def __enter__(self) -> DeadlineScope:
        remaining = self._deadline - time.time()
        if remaining <= 0:
            self.expired = True
            raise exceeded(self._what)
        self._task = asyncio.current_task()
        self._handle = asyncio.get_running_loop().call_later(remaining, self._expire)
        return self

    def _expire(self) -> None:
        if self._task is not None and not self._task.done():
            self.expired = True
            self._task.cancel()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self.expired and kind is not None and issubclass(kind, asyncio.CancelledError):
            undo = getattr(self._task, "uncancel", None)  # Python 3.11+: count it off
            if undo is not None:
                undo()
            raise exceeded(self._what) from None
