"""A stream run ahead by a task of its own, so its items can leave in chunks.

A transport that sends a stream's items to a caller in another process pays per
message. :class:`Channel` runs the stream (its ``pump`` task) while the
transport sends what has come so far; :func:`gathered` takes the next items: the
first one, and those that come within a window after it. ``stream_chunk_ms``
(``handle.options``) asks for a window: fewer, larger messages for a stream of
many small items, each item at most that much later. :func:`chunks` yields them
as :class:`Chunk` items, which the caller's connection unpacks: the reader sees
the same items, one by one.

The source's own flow control bounds the items that wait here: a replica's host
counts an item as sent once the pump took it (``calls.flow.Credit``).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, Callable
from typing import Any, NamedTuple

from tandem._private.calls.flow import STREAM_BUFFER
from tandem._private.queues import wait_event


class Ended(Exception):
    """The stream has no more items."""


class Chunk(NamedTuple):
    """Items of one stream that travel to the caller as one message."""

    items: list[Any]


class Channel:
    """A stream's items, from its ``pump`` task to whoever takes them. Cancelling
    the pump cancels the stream; ``on_error`` sees an error before it is passed on.
    ``window_s``: how long :func:`gathered` waits for more after a first item."""

    def __init__(
        self,
        source: AsyncGenerator[Any, None],
        on_error: Callable[[BaseException], None] | None = None,
        window_s: float = 0.0,
    ) -> None:
        self.window_s = window_s
        self._items: collections.deque[Any] = collections.deque()
        self._arrived = asyncio.Event()
        self._on_error = on_error
        self.pump = asyncio.ensure_future(self._run(source))
        self.pump.add_done_callback(lambda _: self._arrived.set())

    async def _run(self, source: AsyncGenerator[Any, None]) -> None:
        try:
            async for item in source:
                self._items.append(item)
                self._arrived.set()
        except Exception as exc:
            if self._on_error is not None:
                self._on_error(exc)
            raise
        finally:
            await source.aclose()

    def take(self) -> list[Any]:
        """The items here now (perhaps none)."""
        items = list(self._items)
        self._items.clear()
        return items

    @property
    def ended_cleanly(self) -> bool:
        """Every item is taken and the stream ended without an error."""
        pump = self.pump
        return not self._items and pump.done() and not pump.cancelled() and not pump.exception()

    async def wait(self, timeout_s: float | None = None) -> None:
        """Until there is an item (or the stream ended), or ``timeout_s`` passed."""
        if self._items or self.pump.done():
            return
        self._arrived.clear()
        await wait_event(self._arrived, timeout_s)

    async def next(self) -> Any:
        """The next item; at the end, Ended, or the stream's error (after its items)."""
        while not self._items:
            self._raise_if_over()
            await self.wait()
        return self._items.popleft()

    def _raise_if_over(self) -> None:
        pump = self.pump
        if not pump.done():
            return
        if pump.cancelled():
            raise asyncio.CancelledError
        error = pump.exception()
        if error is not None:
            raise error
        raise Ended

    async def close(self) -> None:
        if not self.pump.done():
            self.pump.cancel()
            await asyncio.wait([self.pump])


async def gathered(channel: Channel, window_s: float | None = None) -> list[Any]:
    """The channel's next items: the first (waiting for it), then those there now and
    those that come within ``window_s`` (default: the channel's) after it, up to
    STREAM_BUFFER. Ended at the end; an error of the stream after the items before it."""
    window_s = channel.window_s if window_s is None else window_s
    items = [await channel.next()]
    items.extend(channel.take())
    if window_s > 0:
        loop = asyncio.get_running_loop()
        close_at = loop.time() + window_s
        while len(items) < STREAM_BUFFER and not channel.pump.done():
            remaining = close_at - loop.time()
            if remaining <= 0:
                break
            await channel.wait(remaining)
            items.extend(channel.take())
    return items


async def batches(channel: Channel) -> AsyncGenerator[list[Any], None]:
    """The channel's items, :func:`gathered` batch by batch; closing this (or its end)
    closes the channel, which stops its stream."""
    try:
        while True:
            try:
                items = await gathered(channel)
            except Ended:
                return
            yield items
    finally:
        await channel.close()


async def chunks(source: AsyncGenerator[Any, None], window_s: float) -> AsyncGenerator[Chunk, None]:
    """``source``'s items in chunks of those that came within ``window_s`` of each
    chunk's first item; closing this stops ``source``."""
    batched = batches(Channel(source, window_s=window_s))
    try:
        async for items in batched:
            yield Chunk(items)
    finally:
        await batched.aclose()
