"""A stream's buffer in the calling process: a task runs the stream on the loop and
keeps its items until the reader takes them (``DeploymentResponseGenerator``).

At most STREAM_BUFFER items wait here: a reader that stops holds the stream back
(``calls.flow``). A reader in another thread takes what is here in one trip to
the loop (:meth:`Pump.take`). A stream handed off to another call before it
began (``calls.inbound.StreamCall``) never runs here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from tandem._private.calls.deadlines import exceeded, passed
from tandem._private.calls.flow import STREAM_BUFFER
from tandem.exceptions import RequestCancelledError

END = object()
_HANDED_OFF = (
    "This stream was passed to another call, which reads it (its items go straight to "
    "that call's replica); read that call's results instead."
)


class Pump:
    """Runs a stream on the loop as a task, buffering items until the reader takes them
    (up to STREAM_BUFFER: a reader that stops holds the stream back, see ``calls.flow``;
    a reader in another thread may hold as many again, taken in one go)."""

    def __init__(
        self, source: AsyncIterator[Any], start: bool = True, deadline: float | None = None
    ) -> None:
        self._source = source
        self._deadline = deadline  # the call's: a cancellation past it is its passing
        self._items: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
        self._room = asyncio.Semaphore(STREAM_BUFFER)
        self._task: asyncio.Task[None] | None = None
        self._cancelled = False
        self._began = False  # its task took its first step
        self._handed_off = False
        self.finished = False
        if start:
            self.start()

    def start(self) -> None:
        if self._cancelled:
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    def hand_off(self) -> bool:
        """Never run the stream here (another replica makes its call), if it has not
        begun; whether it had not."""
        if self._began or self._cancelled:
            return False
        self._handed_off = True
        return True

    async def _run(self) -> None:
        self._began = True
        if self._handed_off:
            self.finished = True
            self._items.put_nowait((False, RuntimeError(_HANDED_OFF)))
            return
        try:
            async for item in self._source:
                self._items.put_nowait((True, item))
                await self._room.acquire()
            self._items.put_nowait((True, END))
        except asyncio.CancelledError:
            if not self._cancelled and passed(self._deadline):
                # The call's DeadlineScope cancelled this task while it waited for room.
                error: Exception = exceeded("before the stream's reader took its items")
            else:
                error = RequestCancelledError("The streaming request was cancelled.")
            self._items.put_nowait((False, error))
            # Cancelled while waiting for room, the source is not inside a step of its
            # own: close it now, or the replica's generator would wait for the GC.
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()
            raise
        except BaseException as exc:
            self._items.put_nowait((False, exc))
        finally:
            self.finished = True

    async def next(self) -> Any:
        if self.finished and self._items.empty():
            if self._cancelled:
                raise RequestCancelledError("The streaming request was cancelled.")
            return END
        ok, value = await self._items.get()
        if not ok:
            self._items.put_nowait((ok, value))  # later reads fail the same way
            raise value
        if value is END:
            self._items.put_nowait((True, END))
        else:
            self._room.release()
        return value

    async def take(self) -> list[Any]:
        """The items here now, waiting for the first; [] at the end. The stream's
        error is raised by the take after the one with the items before it."""
        first = await self.next()
        if first is END:
            return []
        items = [first]
        queue = self._items
        while not queue.empty():
            ok, value = queue.get_nowait()
            if not ok or value is END:
                queue.put_nowait((ok, value))  # for the next take
                break
            self._room.release()
            items.append(value)
        return items

    def cancel(self) -> None:
        self._cancelled = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        elif self._task is None:
            self.finished = True
            self._items.put_nowait(
                (False, RequestCancelledError("The streaming request was cancelled."))
            )
