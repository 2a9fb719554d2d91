"""The threads a replica runs its sync methods on.

A lean version of ``ThreadPoolExecutor`` for one job: run a function in a
thread and settle an asyncio future on the replica's loop. It skips the
concurrent Future, its Condition and the callback chain of ``wrap_future``,
which are most of the cost of a sync call on the local backend.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class UserCodeExit(Exception):
    """User code raised SystemExit or KeyboardInterrupt, which must not stop tandem's loop."""


def contain(exc: BaseException) -> BaseException:
    """An exception from user code, made safe to raise on the event loop.

    asyncio lets SystemExit and KeyboardInterrupt out of its loop, which would
    stop every replica and the proxy; they become a plain error of the request.
    """
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):
        error = UserCodeExit(f"User code raised {type(exc).__name__}({exc}).")
        error.__cause__ = exc
        return error
    return exc


class Job:
    """One function call on a worker thread; ``future`` settles on the loop."""

    __slots__ = ("args", "context", "finished", "fn", "future", "on_finished", "seconds")

    def __init__(
        self,
        future: asyncio.Future[Any],
        context: contextvars.Context,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> None:
        self.future = future
        self.context = context
        self.fn = fn
        self.args = args
        # True once the thread is done with it (set on the loop; the future may be
        # cancelled long before).
        self.finished = False
        self.seconds = 0.0  # how long the function ran in its thread (wall time)
        # Set (on the loop) by a caller that stopped waiting but must know when the thread ends.
        self.on_finished: Callable[[], None] | None = None


def _finish(job: Job, ok: bool, value: Any) -> None:
    job.finished = True
    future = job.future
    if not future.cancelled():
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    if job.on_finished is not None:
        job.on_finished()


class WorkerThreads:
    """Up to ``max_workers`` threads, started as needed, idle ones reused."""

    def __init__(self, max_workers: int, name: str) -> None:
        self._max = max_workers
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, Job] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def run(
        self,
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> Job:
        """Run ``fn(*args)`` in ``context`` on a worker thread."""
        if self._closed:
            raise RuntimeError("This replica's worker threads are shut down.")
        job = Job(loop.create_future(), context, fn, args)
        self._jobs.put((loop, job))
        with self._lock:
            if self._idle:
                self._idle -= 1
                return job
            if len(self._threads) >= self._max:
                return job
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
        thread.start()
        return job

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            item = jobs.get()
            if item is None:
                return
            loop, job = item
            item = None
            start = time.perf_counter()
            try:
                outcome: tuple[bool, Any] = (True, job.context.run(job.fn, *job.args))
            except BaseException as exc:
                outcome = (False, contain(exc))
            job.seconds = time.perf_counter() - start
            job.fn = job.args = None  # type: ignore[assignment]
            try:
                loop.call_soon_threadsafe(_finish, job, *outcome)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            job = outcome = None  # type: ignore[assignment]
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        """Let the threads end once they finish what they run; do not wait for them."""
        self._closed = True
        with self._lock:
            for _ in self._threads:
                self._jobs.put(None)
