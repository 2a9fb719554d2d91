"""Flow control of streams: how far a stream's generator may run ahead of its reader.

``STREAM_BUFFER`` is the one bound, the same on every backend. A stream's items
wait for their reader in at most two places, and each holds at most that many:
the handle's buffer in the calling process, and the way from a replica in
another process (or Ray actor) to its caller. The second is bounded end to end,
by credit: the replica's host lets the generator go on only while fewer than
STREAM_BUFFER of the items it sent are unread by the caller (:class:`Credit`),
and the caller reports what it read in batches (:class:`ReadReports`), so the
buffers in between (sockets, Ray's objects) hold no more than that either. A
reader that stops thus stops the generator a bounded number of items later,
instead of letting it fill memory; one that reads on lets it go on. (A reader
in another thread than the loop's, e.g. the driver's ``for`` loop, takes what
the handle's buffer holds in one go: as many again wait in its hand.)

A producer that knows an item is its stream's last says so (:class:`Last`): the
process wire then sends the item and the stream's end as one message.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any, NamedTuple

STREAM_BUFFER = 64
# A caller reports its reads in batches this large: half the bound, so the
# producer gets room again well before it runs out.
READ_REPORT_EVERY = STREAM_BUFFER // 2

# Tokens are unique across processes: many callers send requests to one host.
_TOKEN_PREFIX = uuid.uuid4().hex[:12]
_token_numbers = itertools.count()


def new_token() -> str:
    """A name for one request, by which its host can cancel it or count its reads."""
    return f"{_TOKEN_PREFIX}{next(_token_numbers):x}"


class Credit:
    """The producing side of one stream: how many items it sent are still unread."""

    __slots__ = ("_room", "_unread")

    def __init__(self) -> None:
        self._unread = 0
        self._room = asyncio.Event()

    def read(self, count: int) -> None:
        """The caller read ``count`` more items."""
        self._unread -= count
        if self._unread < STREAM_BUFFER:
            self._room.set()

    async def sent(self) -> None:
        """Count one more item sent; wait while STREAM_BUFFER of them are unread."""
        self._unread += 1
        while self._unread >= STREAM_BUFFER:
            self._room.clear()
            await self._room.wait()


class ReadReports:
    """The reading side of one stream: counts the items its reader took and
    reports them (``report(count)``) every READ_REPORT_EVERY items."""

    __slots__ = ("_report", "_unreported")

    def __init__(self, report: Callable[[int], None]) -> None:
        self._report = report
        self._unreported = 0

    def took(self) -> None:
        self._unreported += 1
        if self._unreported >= READ_REPORT_EVERY:
            count, self._unreported = self._unreported, 0
            self._report(count)


class Last:
    """A stream's item that its producer knows is the last one (e.g. a plain HTTP
    response, whole): transports may send it together with the stream's end."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Last, (self.value,))


class Opened(NamedTuple):
    """A stream that has begun: its first item, then what ``rest`` yields. ``rest``
    has started, so closing it (or losing it) runs its clean-up."""

    first: Any
    rest: AsyncGenerator[Any, None]


async def begin(source: AsyncGenerator[Any, None]) -> Last | Opened:
    """Start ``source``: a whole answer (its one ``Last`` item; ``source`` is done by
    then), or the stream begun. A source that ends at once is an empty ``Last(())``."""
    try:
        first = await source.__anext__()
    except StopAsyncIteration:
        return Last(())
    except BaseException:
        await source.aclose()
        raise
    if type(first) is not Last:
        return Opened(first, source)
    # It ends now: let it finish on its own (closing it early would count a
    # cancellation, and over a wire tell the producer to stop what is done).
    try:
        extra = await source.__anext__()
    except StopAsyncIteration:
        return first
    await source.aclose()
    raise RuntimeError(f"A stream went on after its last item (with {type(extra).__name__}).")


async def chained(opened: Opened, on_end: Callable[[], None]) -> AsyncGenerator[Any, None]:
    """Yield a begun stream's items; call ``on_end`` once it ends, however it ends."""
    try:
        yield opened.first
        async for item in opened.rest:
            yield item
    finally:
        try:
            await opened.rest.aclose()
        finally:
            on_end()
