"""Admission: at most ``max_ongoing_requests`` requests run in a replica at once.

A request takes a :class:`Slot` before it runs and gives it back when it ends;
others wait their turn, by priority (``RequestMetadata.priority``), then in
arrival order: an ending request hands its slot to the first waiter, so one that
arrives meanwhile cannot barge in (on one loop, local callers that arrive all the
time would otherwise starve waiters from elsewhere).
Stopping closes the door (waiters and later arrivals are refused) and waits for
the requests inside to end, except those whose caller gave up while a worker
thread still runs them (their slot is "held by a thread" until the thread ends):
nobody wants their results.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Callable

from tandem._private.queues import Waiter


class Slot:
    """One of ``max_ongoing_requests`` places; released once, maybe after its thread ends."""

    __slots__ = ("_admission", "_released", "held_by_thread")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False
        self.held_by_thread = False

    def hand_to_thread(self) -> None:
        """The caller gave up, but a worker thread goes on: the thread releases the slot."""
        self.held_by_thread = True
        self._admission._handed_to_thread()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self.held_by_thread)


class Admission:
    """The slots of one replica (see the module docstring)."""

    def __init__(self, capacity: int, refusal: Callable[[], Exception]) -> None:
        self.capacity = capacity
        self._refusal = refusal  # the error for requests that arrive while closed
        self.in_flight = 0
        self.in_threads = 0  # slots held by threads whose callers gave up
        self.open = False
        self._waiters: list[Waiter[None]] = []  # in the order they are served
        self._arrivals = itertools.count()
        # Set by drain() while requests are in flight; done when the last one ends.
        self._drained: asyncio.Future[None] | None = None

    async def acquire(self, priority: int = 0) -> Slot:
        if not self.open:
            raise self._refusal()
        if self.in_flight < self.capacity and not self._waiters:
            self.in_flight += 1
            return Slot(self)
        waiter: Waiter[None] = Waiter(priority, next(self._arrivals))
        bisect.insort(self._waiters, waiter)
        future = waiter.future
        try:
            await future  # its result: a slot handed over by a request that ended
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(False)  # handed a slot, but leaving: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        if not self.open:  # closed while it waited: refused, like the others
            self._release(False)
            raise self._refusal()
        return Slot(self)

    @property
    def busy(self) -> bool:
        """Requests are running here besides those left to threads."""
        return self.in_flight > self.in_threads

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests; wait (up to ``timeout_s``) for those inside to end."""
        self.open = False
        if self.busy:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout_s)
            except asyncio.TimeoutError:
                pass

    def refuse_waiters(self) -> None:
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(self._refusal())
        self._waiters.clear()

    def _handed_to_thread(self) -> None:
        self.in_threads += 1
        self._check_drained()

    def _release(self, held_by_thread: bool) -> None:
        if held_by_thread:
            self.in_threads -= 1
        # The slot goes straight to the first waiter (it stays counted in in_flight), so
        # a request that arrives meanwhile cannot take it first: turns go by priority,
        # then in arrival order.
        while self._waiters:
            waiter = self._waiters.pop(0).future
            if not waiter.done():
                waiter.set_result(None)
                if self._drained is not None:
                    self._check_drained()
                return
        self.in_flight -= 1
        if self._drained is not None:
            self._check_drained()

    def _check_drained(self) -> None:
        drained = self._drained
        if drained is not None and not self.busy and not drained.done():
            drained.set_result(None)
