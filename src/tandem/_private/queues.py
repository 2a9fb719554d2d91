"""Waiting on the loop: a queue that a producer task fills, an event with a timeout,
undoing a cancellation a task caused itself, and a waiter's place in a queue served
by priority."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Waiter(Generic[T]):
    """One waiting in a queue kept sorted (``bisect.insort``): higher ``priority``
    first, then lower ``arrival`` (first come, first served)."""

    __slots__ = ("future", "rank")

    def __init__(self, priority: int, arrival: int) -> None:
        self.rank = (-priority, arrival)
        self.future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    def __lt__(self, other: Waiter[Any]) -> bool:
        return self.rank < other.rank


async def drain(items: asyncio.Queue[Any], end: Any) -> AsyncGenerator[Any, None]:
    """Yield items until ``end``; an exception put in the queue is raised here."""
    while True:
        item = await items.get()
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


async def wait_event(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passed; whether it is set.

    Not ``asyncio.wait_for``: on Python 3.11, a cancellation that arrives just as
    its timeout fires can be lost, and the cancelled task then waits forever.
    """
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter], timeout=timeout_s)
    finally:
        waiter.cancel()
    return event.is_set()


async def bounded(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``awaitable``'s result; asyncio.TimeoutError (and it is cancelled) if that takes
    over ``timeout_s``. Not ``asyncio.wait_for``, for the reason ``wait_event`` gives:
    a periodic call bounded by it, cancelled at close, could hang the close for good."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait([task], timeout=timeout_s)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise asyncio.TimeoutError
    return task.result()


def uncancel(task: asyncio.Task[Any] | None) -> None:
    """Forget the cancellations requested of ``task`` (Python 3.11+ counts them), so a
    task that swallowed a cancellation it caused itself ends as if never cancelled."""
    undo = getattr(task, "uncancel", None)
    if task is not None and undo is not None:
        while task.cancelling():
            undo()
