"""Requests whose callers gave up but that still run, and when they wedge a replica.

A request whose caller cancelled it may go on: a sync method in a worker
thread cannot be interrupted, and an async one may swallow the CancelledError.
It keeps its slot, since the work really goes on. Once such a request is older
than ``health_check_timeout_s``, :meth:`AbandonedRequests.refuse_if_wedged`
fails the health check, so the controller replaces the replica instead of
leaving it wedged.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import types
from collections.abc import Callable, Collection
from typing import Any

from tandem._private.calls.context import HTTP_METHOD
from tandem._private.replica.admission import Slot
from tandem._private.replica.threads import Job


class AbandonedRequestsError(RuntimeError):
    """Requests their callers gave up on still run past the grace period: the replica is wedged."""


class AbandonedRequests:
    """The abandoned requests of one replica: left to threads, or cancelled tasks that go on.

    ``serving`` are the code objects of the replica's methods that serve a request
    (with locals ``self``, the replica, and ``meta``): a cancelled task running one
    of them for this replica still serves a request here.
    """

    def __init__(
        self, replica: object, clock: Callable[[], float], serving: Collection[types.CodeType]
    ) -> None:
        self._replica = replica
        self._clock = clock
        self._serving = serving
        # Requests whose caller gave up while a worker thread runs them, until the
        # thread ends: slot -> (when the caller gave up, method name).
        self._threads: dict[Slot, tuple[float, str]] = {}
        # Tasks serving a request here that were cancelled but go on (the method
        # swallowed the CancelledError): task -> (first seen so, method name).
        self._tasks: dict[asyncio.Task[Any], tuple[float, str]] = {}

    @property
    def count(self) -> int:
        """Cancelled async requests that go on are counted as the last health check saw them."""
        return len(self._threads) + sum(not task.done() for task in self._tasks)

    def thread_methods(self) -> list[str]:
        """The methods worker threads still run for callers that gave up."""
        return [method for _, method in self._threads.values()]

    def leave_to_thread(
        self, slot: Slot, job: Job, method: str, then: Callable[[], object] | None = None
    ) -> None:
        """The caller gave up, but the thread cannot be interrupted: the slot stays taken
        until the thread ends (then ``then()`` runs), and counts as abandoned till then."""
        self._threads[slot] = (self._clock(), method)
        slot.hand_to_thread()

        def finished() -> None:
            try:
                if then is not None:
                    then()
            finally:
                del self._threads[slot]
                slot.release()

        job.on_finished = finished

    def refuse_if_wedged(
        self, grace_s: float, loop: asyncio.AbstractEventLoop | None, busy: bool
    ) -> None:
        """Raise AbandonedRequestsError if an abandoned request is older than ``grace_s``.

        ``busy``: requests not left to threads run here (some may be cancelled tasks).
        """
        now = self._clock()
        self._find_cancelled_tasks(now, loop if busy else None)
        stuck = [
            method
            for since, method in (*self._threads.values(), *self._tasks.values())
            if now - since >= grace_s
        ]
        if not stuck:
            return
        names = sorted(set(stuck))
        what = (
            "1 request abandoned by its caller still holds a slot"
            if len(stuck) == 1
            else f"{len(stuck)} requests abandoned by their callers still hold slots"
        )
        methods = ("method " if len(names) == 1 else "methods ") + ", ".join(map(repr, names))
        raise AbandonedRequestsError(
            f"{what} after {grace_s:g} s ({methods}); replacing the replica"
        )

    def _find_cancelled_tasks(self, now: float, loop: asyncio.AbstractEventLoop | None) -> None:
        """Look for cancelled tasks that still run a request here (see ``_tasks``).

        Done at health-check time, so requests pay nothing for it. Needs
        ``Task.cancelling`` (Python 3.11+); before that, only threads are tracked.
        """
        seen = self._tasks
        found: dict[asyncio.Task[Any], tuple[float, str]] = {}
        if loop is not None:
            for task in asyncio.all_tasks(loop):
                cancelling = getattr(task, "cancelling", None)
                if cancelling is None:
                    break
                if cancelling():
                    method = self._request_served(task)
                    if method is not None:
                        found[task] = (seen[task][0] if task in seen else now, method)
        self._tasks = found

    def _request_served(self, task: asyncio.Task[Any]) -> str | None:
        """The method of the request this replica serves in ``task`` (None if it serves none).

        Follows what the task awaits, coroutine by coroutine, to a serving frame of
        the replica. An async generator's ``__anext__`` shows its generator only to
        the garbage collector.
        """
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None and frame.f_code in self._serving:
                local = frame.f_locals
                if local.get("self") is self._replica:
                    name = getattr(local.get("meta"), "method_name", "__call__")
                    return "__call__" if name == HTTP_METHOD else str(name)
            following = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
            if following is None and type(awaited).__name__ == "async_generator_asend":
                following = next(
                    (r for r in gc.get_referents(awaited) if inspect.isasyncgen(r)), None
                )
            awaited = following
        return None


def name_of(fn: Any) -> str:
    """A method's name, for messages (through partials and generators)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return str(getattr(fn, "__name__", None) or type(fn).__name__)
