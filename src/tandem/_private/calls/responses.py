"""What a call returns: :class:`DeploymentResponse` and :class:`DeploymentResponseGenerator`.

Both are made by ``DeploymentHandle.remote`` (:mod:`tandem.handle`, which
exports them) around a request that already runs on tandem's event loop. They
work from async code (``await``, ``async for``) on any event loop, and from
sync code (``.result()``, ``for``) in any thread but the loop's own.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import importlib.util
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from typing import Any, Generic, TypeVar

from tandem._private.calls.context import RequestMetadata
from tandem._private.calls.inbound import StreamCall
from tandem._private.calls.pump import END, Pump
from tandem._private.calls.runtime import Runtime
from tandem.exceptions import RequestCancelledError

__all__ = ["DeploymentResponse", "DeploymentResponseGenerator"]

# What a call returns (or a stream yields): ``DeploymentResponse[int]`` in type hints,
# as Ray Serve's classes allow.
R = TypeVar("R")


class BlocksTheLoopError(RuntimeError):
    """A blocking wait was asked for on a thread that runs an event loop."""


def _refuse_blocking_on_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise BlocksTheLoopError(
        f"{what} blocks, and this thread runs an event loop; use `await` (or `async for`) "
        "on the response instead."
    )


class DeploymentResponse(Generic[R]):
    """The future result of a unary call: ``await`` it, or ``.result()`` in sync code.

    Passed as an argument of another ``.remote()`` call, it is replaced by its
    result before the downstream method runs.
    """

    __slots__ = (
        "__weakref__",
        "_cancelled",
        "_finished",
        "_latch",
        "_meta",
        "_outcome",
        "_pending",
        "_runner",
        "_runtime",
        "_start_handle",
        "_task",
    )

    def __init__(
        self,
        runtime: Runtime,
        coro: Coroutine[Any, Any, Any],
        meta: RequestMetadata | None = None,
    ) -> None:
        self._runtime = runtime
        self._meta = meta
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False
        self._pending: Coroutine[Any, Any, Any] | None = None
        self._start_handle: asyncio.Handle | None = None
        self._runner: asyncio.Task[Any] | None = None
        self._outcome: tuple[bool, Any] | None = None
        self._finished: asyncio.Future[None] | None = None
        if runtime.on_loop_thread():
            self._latch: threading.Lock | None = None
            # Most calls are awaited at once. The call starts on the loop's next step
            # as a task of its own, unless it is awaited first: then it runs inside
            # the awaiting task, which saves a task and two trips through the loop.
            self._pending = coro
            self._start_handle = runtime.loop.call_soon(self._start_pending)
        else:
            # Released when the task ends: the cheapest way to wake a waiting thread.
            self._latch = threading.Lock()
            self._latch.acquire()
            runtime.loop.call_soon_threadsafe(self._start, coro)

    def _start_pending(self) -> None:
        coro, self._pending = self._pending, None
        if coro is not None:
            self._start(coro)

    def _start(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self._task = self._runtime.loop.create_task(coro)
        task.add_done_callback(self._on_done)
        if self._cancelled:
            task.cancel()

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled():
            task.exception()  # a result nobody asks for is not an error worth logging
        if self._latch is not None:
            self._latch.release()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        loop = asyncio.get_running_loop()
        if loop is not self._runtime.loop:
            # Awaited on another event loop (e.g. the user's own asyncio program).
            future = asyncio.run_coroutine_threadsafe(self._wait(), self._runtime.loop)
            return await asyncio.wrap_future(future)
        coro = self._pending
        if coro is not None:
            self._pending = None
            assert self._start_handle is not None
            self._start_handle.cancel()
            return await self._run_inline(coro)
        if self._runner is not None and self._outcome is None:
            # Another task runs this call: wait for it to finish.
            if self._finished is None:
                self._finished = loop.create_future()
            await asyncio.shield(self._finished)
        if self._outcome is not None:
            ok, value = self._outcome
            if ok:
                return value
            raise value
        while self._task is None:  # made off the loop; its start is already queued
            await asyncio.sleep(0)
        try:
            return await self._task
        except asyncio.CancelledError:
            if self._cancelled:
                raise self._cancelled_error() from None
            raise

    async def _run_inline(self, coro: Coroutine[Any, Any, Any]) -> Any:
        runner = self._runner = asyncio.current_task()
        try:
            result = await coro
        except asyncio.CancelledError:
            self._settle(False, self._cancelled_error())
            if self._cancelled:
                # We cancelled the runner on behalf of .cancel(): that is not its own.
                uncancel = getattr(runner, "uncancel", None)
                if uncancel is not None:
                    uncancel()
                raise self._cancelled_error() from None
            raise
        except BaseException as exc:
            self._settle(False, exc)
            raise
        self._settle(True, result)
        return result

    def _settle(self, ok: bool, value: Any) -> None:
        self._outcome = (ok, value)
        self._runner = None
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    def result(self, timeout_s: float | None = None) -> Any:
        """Block until the result is there (TimeoutError after ``timeout_s``)."""
        _refuse_blocking_on_loop("DeploymentResponse.result()")
        latch = self._latch
        if latch is None:
            # Made on the loop and read from a thread: wait through the loop.
            future = asyncio.run_coroutine_threadsafe(self._wait(), self._runtime.loop)
            try:
                return future.result(timeout_s)
            except concurrent.futures.TimeoutError:
                raise self._timeout_error(timeout_s) from None
        if not latch.acquire(timeout=-1 if timeout_s is None else max(timeout_s, 0)):
            raise self._timeout_error(timeout_s)
        latch.release()  # let every other waiter through as well
        task = self._task
        assert task is not None
        if task.cancelled():
            raise self._cancelled_error()
        error = task.exception()
        if error is not None:
            raise error
        return task.result()

    def cancel(self) -> None:
        """Cancel the request, here and in every call it made; waiters get RequestCancelledError."""
        self._cancelled = True
        if self._runtime.on_loop_thread():
            self._cancel_on_loop()
        elif not self._runtime.loop.is_closed():
            self._runtime.loop.call_soon_threadsafe(self._cancel_on_loop)

    def _cancel_on_loop(self) -> None:
        coro = self._pending
        if coro is not None:  # never started: it never will
            self._pending = None
            if self._start_handle is not None:
                self._start_handle.cancel()
            coro.close()
            self._settle(False, self._cancelled_error())
        elif self._runner is not None:
            self._runner.cancel()
        elif self._task is not None:
            self._task.cancel()
        # else: made off the loop and not started yet; _start sees the flag.

    def _timeout_error(self, timeout_s: float | None) -> TimeoutError:
        return TimeoutError(f"The response did not arrive within timeout_s={timeout_s}.")

    def _cancelled_error(self) -> RequestCancelledError:
        return RequestCancelledError("The request was cancelled.")

    async def _to_object_ref(self) -> Any:
        """The result as a Ray ObjectRef; needs the ``ray`` extra.

        If the call went to its replica with a reference of its own (a Ray actor's
        ObjectRef, which a Ray task can take before the result exists), that one;
        otherwise the result, once there, put in Ray's object store.
        """
        session = _ray_session()
        ref = await self._replica_object_ref()
        if ref is not None:
            return ref
        return session.put(await self)

    def _to_object_ref_sync(self) -> Any:
        """:meth:`_to_object_ref` for code that is not async."""
        session = _ray_session()
        _refuse_blocking_on_loop("DeploymentResponse._to_object_ref_sync()")
        ref = self._runtime.run_sync(self._replica_object_ref())
        if ref is not None:
            return ref
        return session.put(self.result())

    async def _replica_object_ref(self) -> Any:
        """The ObjectRef of the call to the replica, or None if it never made one."""
        loop = asyncio.get_running_loop()
        if loop is not self._runtime.loop:
            future = asyncio.run_coroutine_threadsafe(
                self._replica_object_ref(), self._runtime.loop
            )
            return await asyncio.wrap_future(future)
        meta = self._meta
        if meta is None:
            return None
        call_ref = meta.call_ref
        if call_ref is not None and not isinstance(call_ref, asyncio.Future):
            return call_ref  # the call already went out
        if self._outcome is not None or (self._task is not None and self._task.done()):
            return None  # it ended without reaching a replica
        if call_ref is None:
            call_ref = meta.call_ref = loop.create_future()
        self._start_pending()  # if the call has not started, it starts now, as a task
        # Shielded: giving up this wait must not cancel the call itself.
        finished = asyncio.shield(self._wait())
        try:
            await asyncio.wait([call_ref, finished], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not finished.done():
                finished.cancel()
            elif not finished.cancelled():
                finished.exception()  # the caller sees it when it awaits the response
        return call_ref.result() if call_ref.done() else None


def _ray_session() -> Any:
    """tandem's module for joining Ray, if Ray is installed."""
    if importlib.util.find_spec("ray") is None:
        raise ImportError(
            'Converting a response to a Ray ObjectRef needs Ray: pip install "tandem-serve[ray]".'
        )
    from tandem._private.backends.ray import session

    return session


class DeploymentResponseGenerator(Generic[R]):
    """The results of a streaming call, as the replica yields them.

    ``async for`` in async code, ``for`` in sync code. Closing it early (or
    ``.cancel()``) stops the generator in the replica.
    """

    def __init__(
        self,
        runtime: Runtime,
        source: AsyncIterator[Any],
        handoff: Callable[[], StreamCall | None] | None = None,
        deadline: float | None = None,
    ) -> None:
        self._runtime = runtime
        self._pump: Pump | None = None
        self._closed = False
        # Makes the call itself (see hand_off), while it may still be handed off.
        self._handoff = handoff
        # Items a reader in another thread took in one go (Pump.take), not read yet.
        self._taken: collections.deque[Any] = collections.deque()
        if runtime.on_loop_thread():
            self._pump = Pump(source, deadline=deadline)
        else:
            pump = self._pump = Pump(source, start=False, deadline=deadline)
            runtime.loop.call_soon_threadsafe(pump.start)

    def hand_off(self) -> StreamCall | None:
        """The call, for a replica that reads this stream to make itself (see
        ``calls.inbound``), if it has not begun here: this generator then yields
        nothing. None if it began, or was made outside tandem's loop."""
        handoff, pump = self._handoff, self._pump
        self._handoff = None
        if handoff is None or pump is None or not self._runtime.on_loop_thread():
            return None
        call = handoff()
        return call if call is not None and pump.hand_off() else None

    # async iteration ------------------------------------------------------

    def __aiter__(self) -> DeploymentResponseGenerator[Any]:
        return self

    async def __anext__(self) -> Any:
        assert self._pump is not None
        try:
            if asyncio.get_running_loop() is self._runtime.loop:
                item = await self._pump.next()
            else:
                item = await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(self._pump.next(), self._runtime.loop)
                )
        except asyncio.CancelledError:
            # Whoever reads the stream is being cancelled: so is the stream, as a
            # unary call awaited at that point would be.
            self.cancel()
            raise
        if item is END:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        self.cancel()

    # sync iteration -------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        _refuse_blocking_on_loop("Iterating a DeploymentResponseGenerator with `for`")
        assert self._pump is not None
        taken = self._taken
        if taken and not self._closed:
            return taken.popleft()
        taken.clear()
        # Every item there now in one trip to the loop: a trip per item would cost
        # more than most items (two thread wake-ups).
        items = asyncio.run_coroutine_threadsafe(self._pump.take(), self._runtime.loop).result()
        if not items:
            raise StopIteration
        taken.extend(items)
        return taken.popleft()

    def close(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop the stream in the replica; the next read raises RequestCancelledError."""
        if self._closed or self._pump is None:
            return
        self._closed = True
        if self._runtime.on_loop_thread():
            self._pump.cancel()
        elif not self._runtime.loop.is_closed():
            self._runtime.loop.call_soon_threadsafe(self._pump.cancel)

    def __del__(self) -> None:
        pump = self._pump
        if pump is not None and not self._closed and not pump.finished:
            try:
                self.cancel()
            except RuntimeError:  # the loop is already closed
                pass
