"""Inbound streams: an argument whose items the caller sends while the call runs.

A WebSocket session is a call whose replica reads the client's messages as they
come: the proxy passes them as an :class:`Inbound`, an async iterator given as a
top-level argument. So is a client-streaming RPC, and a handle call given another
call's ``DeploymentResponseGenerator`` (streams that compose). In the caller's
process (local backend) the replica reads that iterator itself. Across
processes it travels as an :class:`InboundRef` (a token), and the caller's
connection sends its items to the replica's host with :func:`pump`, where an
:class:`InboundQueues` hands them to the replica. A sync method reads it as a
plain iterator (:class:`SyncInbound`), from its worker thread.

Flow control, the same bound as ``calls.flow`` on every backend: the pump sends
one batch at a time (so batches arrive in order on any transport), and the
host answers a batch only once fewer than STREAM_BUFFER items wait for the
replica. A replica that stops reading thus stops its caller reading from its
source a bounded number of items later, instead of buffering without end.

A stream passed on before it began (the usual ``ids = model.remote(tokens)``
right after ``tokens = tokenizer.remote(...)``, in a deployment) goes further:
its caller hands it off as a :class:`StreamCall`, the call itself, and the
replica that reads it makes that call from its own process. Items then flow
from one replica to the next directly, not through the process that made
both calls (``DeploymentResponseGenerator.hand_off``). The reading replica's
host opens it and closes it when the call that reads it ends, which stops it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tandem._private.calls.context import DeploymentID, RequestMetadata
from tandem._private.calls.flow import STREAM_BUFFER, new_token

if TYPE_CHECKING:
    from tandem._private.calls.runtime import Runtime

# Items of one push are at most this many (a batch is what waits at the time).
MAX_BATCH = STREAM_BUFFER
# A queue made by a push whose call never claimed it (e.g. the call failed on its
# way) is dropped after this long; tokens of ended streams are kept this many.
ORPHAN_S = 60.0
ENDED_KEPT = 4096

# Sends one batch: (items, whether the source ended, the error it ended with);
# returns False once the replica no longer reads (the call ended).
Push = Callable[[list[Any], bool, BaseException | None], Awaitable[bool]]


@dataclass(frozen=True)
class StreamCall:
    """A streaming call not made yet, handed to the replica that will read it."""

    deployment_id: DeploymentID
    meta: RequestMetadata
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @classmethod
    def of(
        cls,
        deployment_id: DeploymentID,
        meta: RequestMetadata,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> StreamCall | None:
        """The call, if it can be made elsewhere: its stream argument (if any) is one
        handed off too, not an iterator of this process."""
        args, kwargs, inbound = detach(args, kwargs)
        return None if inbound is not None else cls(deployment_id, meta, args, kwargs)

    def open(self, runtime: Runtime) -> AsyncGenerator[Any, None]:
        """Make the call from ``runtime``'s process: its items. A StreamCall among its
        arguments is handed on in turn (or opened here, if its replica is here)."""

        def opened(call: StreamCall) -> tuple[Inbound, Inbound]:
            inbound = Inbound(call, runtime)
            return inbound, inbound

        args, kwargs, inbound = swap_first(self.args, self.kwargs, StreamCall, opened)
        source = runtime.stream(self.deployment_id, self.meta, args, kwargs)
        return source if inbound is None else closing_stream(source, inbound)


class Inbound:
    """A caller's async iterator, passed as a top-level argument of a call; or a
    :class:`StreamCall` (``call``), opened through ``runtime`` when first read
    here, unless a connection hands it on (:func:`detach`)."""

    __slots__ = ("_items", "_runtime", "call", "source", "token")

    def __init__(self, source: AsyncIterator[Any] | StreamCall, runtime: Runtime | None = None):
        self.call: StreamCall | None = None
        self.source: AsyncIterator[Any] | None = None
        if isinstance(source, StreamCall):
            self.call = source
        else:
            self.source = source
        self._runtime = runtime
        self.token = new_token()
        self._items: AsyncIterator[Any] | None = None

    def __aiter__(self) -> Inbound:
        return self

    def __anext__(self) -> Awaitable[Any]:
        items = self._items
        if items is None:
            source = self.source
            if source is None:
                assert self.call is not None and self._runtime is not None
                source = self.source = self.call.open(self._runtime)
            items = self._items = aiter(source)
        return anext(items)

    async def aclose(self) -> None:
        """Close the source (e.g. stop the upstream call whose items these are)."""
        aclose = getattr(self.source, "aclose", None)
        if aclose is not None:
            await aclose()

    def __reduce__(self) -> Any:
        raise TypeError(
            "An inbound stream travels only as a top-level argument of a streaming call "
            "(its connection sends the items); it cannot be pickled."
        )


@dataclass(frozen=True)
class InboundRef:
    """An :class:`Inbound` as it travels to another process: its token."""

    token: str


def detach(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], Inbound | None]:
    """``args`` and ``kwargs`` as they travel to another process, and the Inbound
    whose items the caller must send (a call has at most one): a handed-off
    StreamCall not opened here travels as it is (None to send); an iterator of
    this process as a ref."""
    return swap_first(args, kwargs, Inbound, _travelling)


def _travelling(inbound: Inbound) -> tuple[StreamCall | InboundRef, Inbound | None]:
    if inbound.call is not None and inbound.source is None:
        return inbound.call, None
    return InboundRef(inbound.token), inbound


def swap_first(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    kind: type | tuple[type, ...],
    swap: Callable[[Any], tuple[Any, Any]],
) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """``args`` and ``kwargs`` with their first top-level value of ``kind`` replaced by
    what ``swap`` makes of it, and the second thing ``swap`` returned (None if none)."""
    for index, arg in enumerate(args):
        if isinstance(arg, kind):
            new, extra = swap(arg)
            return (*args[:index], new, *args[index + 1 :]), kwargs, extra
    for key, value in kwargs.items():
        if isinstance(value, kind):
            new, extra = swap(value)
            return args, {**kwargs, key: new}, extra
    return args, kwargs, None


async def closing_call(call: Awaitable[Any], inbound: Inbound) -> Any:
    """A unary call with a stream argument; the stream is closed when the call ends."""
    try:
        return await call
    finally:
        await inbound.aclose()


async def closing_stream(
    source: AsyncGenerator[Any, None], inbound: Inbound
) -> AsyncGenerator[Any, None]:
    """A streaming call with a stream argument; the stream is closed when the call ends."""
    try:
        async for item in source:
            yield item
    finally:
        try:
            await source.aclose()
        finally:
            await inbound.aclose()


def has_stream(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call's arguments, as its replica got them, include a stream."""
    return any(isinstance(a, _STREAMS) for a in args) or (
        bool(kwargs) and any(isinstance(v, _STREAMS) for v in kwargs.values())
    )


def for_sync_code(
    args: tuple[Any, ...], kwargs: dict[str, Any], loop: asyncio.AbstractEventLoop
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of a call to a sync method, with streams as plain iterators."""

    def plain(value: Any) -> Any:
        return SyncInbound(value, loop) if isinstance(value, _STREAMS) else value

    return tuple(map(plain, args)), {key: plain(value) for key, value in kwargs.items()}


class SyncInbound:
    """A stream argument as a sync method reads it in its worker thread: a plain
    iterator whose items are taken on the replica's loop, one at a time."""

    __slots__ = ("_loop", "_source")

    def __init__(self, source: AsyncIterator[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._source = source
        self._loop = loop

    def __iter__(self) -> SyncInbound:
        return self

    def __next__(self) -> Any:
        item = asyncio.run_coroutine_threadsafe(self._next(), self._loop).result()
        if item is _ENDED:
            raise StopIteration
        return item

    async def _next(self) -> Any:
        try:
            return await anext(self._source)
        except StopAsyncIteration:
            return _ENDED


_ENDED = object()


async def pump(inbound: Inbound, push: Push) -> None:
    """Send ``inbound``'s items with ``push`` until it ends or the replica stops reading.

    Reading the source goes on while a batch is on its way (at most STREAM_BUFFER
    items ahead), so a slow link costs latency, not throughput.
    """
    waiting: asyncio.Queue[tuple[Any, bool, BaseException | None]] = asyncio.Queue(STREAM_BUFFER)

    async def read() -> None:
        try:
            async for item in inbound:
                await waiting.put((item, False, None))
        except Exception as exc:  # the replica's iterator raises it, after the items
            await waiting.put((None, True, exc))
        else:
            await waiting.put((None, True, None))

    reader = asyncio.ensure_future(read())
    try:
        ended = False
        while not ended:
            entries = [await waiting.get()]
            while len(entries) < MAX_BATCH and not waiting.empty():
                entries.append(waiting.get_nowait())
            _, ended, error = entries[-1]
            items = [item for item, last, _ in entries if not last]
            if not await push(items, ended, error):
                return
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await inbound.aclose()


def start_pump(inbound: Inbound, push: Push) -> asyncio.Task[None]:
    """Run :func:`pump` as a task; a push that fails (the connection broke) fails the
    call on its own, so the task's error is only retrieved here."""
    task = asyncio.ensure_future(pump(inbound, push))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def stop_pump(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class InboundQueue:
    """The replica's end of an inbound stream in another process: an async iterator."""

    __slots__ = ("_arrived", "_closed", "_ended", "_error", "_items", "_room")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._ended = False
        self._closed = False  # the call ended: pushes are refused
        self._error: BaseException | None = None
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, items: list[Any], end: bool, error: BaseException | None) -> bool:
        """Take a batch; return once the replica has room for more (False: it is gone)."""
        if self._closed:
            return False
        self._items.extend(items)
        if end:
            self._ended, self._error = True, error
        self._arrived.set()
        while len(self._items) >= STREAM_BUFFER and not self._closed:
            self._room.clear()
            await self._room.wait()
        return not self._closed

    def close(self) -> None:
        """The call ended: drop what is left and refuse what comes (a reader still
        there sees the end)."""
        self._closed = self._ended = True
        self._items.clear()
        self._room.set()
        self._arrived.set()

    def __aiter__(self) -> InboundQueue:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._ended:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                raise StopAsyncIteration
            self._arrived.clear()
            await self._arrived.wait()
        item = self._items.popleft()
        if len(self._items) < STREAM_BUFFER:
            self._room.set()
        return item


class InboundQueues:
    """A host's inbound streams by token. A push may overtake its call (Ray does not
    keep the order of an async actor's calls), so either one makes the queue.
    A StreamCall argument is opened through ``runtime`` (the host's)."""

    def __init__(
        self, runtime: Runtime | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._runtime = runtime
        self._clock = clock
        self._queues: dict[str, InboundQueue] = {}
        self._unclaimed: dict[str, float] = {}  # made by a push: token -> when
        self._ended: OrderedDict[str, None] = OrderedDict()

    def claim(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], str | Inbound | None]:
        """``args`` and ``kwargs`` with an InboundRef replaced by its queue, or a
        StreamCall by the stream it makes from here; what to :meth:`release` when the
        call ends (the queue's token, or the stream)."""
        return swap_first(args, kwargs, _SENT, self._claimed)

    def _claimed(self, sent: InboundRef | StreamCall) -> tuple[Any, str | Inbound]:
        if isinstance(sent, StreamCall):
            opened = Inbound(sent, self._runtime)
            return opened, opened
        self._unclaimed.pop(sent.token, None)
        return self._queue(sent.token), sent.token

    async def release(self, claimed: str | Inbound) -> None:
        """The call that read what :meth:`claim` gave ended: close it."""
        if isinstance(claimed, str):
            self.close(claimed)
        else:
            await claimed.aclose()  # stops the call it made, if still going

    async def push(
        self, token: str, items: list[Any], end: bool, error: BaseException | None
    ) -> bool:
        if token in self._ended:
            return False
        if token not in self._queues:
            self._sweep()
            self._unclaimed[token] = self._clock()
        return await self._queue(token).put(items, end, error)

    def close(self, token: str) -> None:
        """The call that read ``token`` ended."""
        queue = self._queues.pop(token, None)
        if queue is not None:
            queue.close()
        self._unclaimed.pop(token, None)
        self._ended[token] = None
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def _queue(self, token: str) -> InboundQueue:
        queue = self._queues.get(token)
        if queue is None:
            queue = self._queues[token] = InboundQueue()
        return queue

    def _sweep(self) -> None:
        now = self._clock()
        for token, since in list(self._unclaimed.items()):
            if now - since > ORPHAN_S:
                self.close(token)


# How a stream argument arrives from another process.
_SENT = (InboundRef, StreamCall)

# What a replica's method may get as a stream argument: the caller's own iterator
# (local backend) or the queue its items arrive in (another process).
_STREAMS = (Inbound, InboundQueue)
