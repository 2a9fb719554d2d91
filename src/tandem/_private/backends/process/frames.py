"""Framing for messages between processes: pickle protocol 5 with out-of-band buffers.

A message is one Python object. Large buffers inside it (bytes, bytearrays,
NumPy arrays and anything else that supports ``PickleBuffer``) travel
out-of-band: they are written to the socket straight from their memory, not
copied into the pickle stream, and arrive as buffers the unpickler adopts.

Wire format of one frame::

    u32 count of buffers (n)  u64 len(pickle)  u64 len(buffer) * n
    pickle bytes  buffer bytes * n

A frame holds at most ``MAX_BUFFERS`` out-of-band buffers and ``MAX_FRAME``
bytes in all; a receiver drops a connection whose frame announces more, and
takes memory as bytes arrive, never on a header's word. (Who may send frames
at all is settled before the first one: see ``handshake``.)
"""

from __future__ import annotations

import asyncio
import copyreg
import logging
import pickle
import struct
import traceback
from collections.abc import Callable
from typing import Any, cast

import cloudpickle

logger = logging.getLogger("tandem")

_HEADER = struct.Struct("!IQ")
_LENGTH = struct.Struct("!Q")
# Buffers smaller than this are cheaper inside the pickle than beside it.
MIN_OUT_OF_BAND = 64 * 1024
# The most one frame may hold, its pickle and buffers summed; larger messages
# fail at the sender, and a frame announcing more drops the connection.
MAX_FRAME = 2 << 30
# The most out-of-band buffers in one frame; the sender keeps any more in-band.
MAX_BUFFERS = 16 * 1024


class FrameTooLargeError(ValueError):
    """A message over the frame limits (raised where it is sent)."""


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


def _reduce_starlette_state(state: Any) -> tuple[Any, tuple[dict[str, Any]]]:
    return type(state), (dict(state._state),)


def picklable_starlette() -> None:
    """Teach pickle Starlette's ``State`` (in FastAPI apps sent by value to replicas).

    Its ``__getattr__`` recurses while an instance is being unpickled.
    """
    try:
        from starlette.datastructures import State
    except ImportError:
        return
    copyreg.pickle(State, _reduce_starlette_state)


_MAIN = b"__main__"


def dumps(message: Any) -> list[bytes | memoryview]:
    """The parts of one frame, ready for ``writelines`` (no copy of large buffers)."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < MIN_OUT_OF_BAND or len(buffers) >= MAX_BUFFERS:
            return True  # keep it in the pickle stream
        buffers.append(buffer)
        return False

    try:
        body = pickle.dumps(message, protocol=5, buffer_callback=out_of_band)
    except (pickle.PicklingError, TypeError, AttributeError):
        body = _MAIN
    if _MAIN in body:
        # Classes and functions defined in the driver's __main__ (a script or a
        # notebook) pickle by name, and no other process has them under that name:
        # they travel by value. The scan is cheap (large buffers are not in ``body``),
        # and data that merely contains these bytes only takes the slower path.
        buffers.clear()
        body = cloudpickle.dumps(message, protocol=5, buffer_callback=out_of_band)
    raws = [b.raw() for b in buffers]
    size = len(body) + sum(raw.nbytes for raw in raws)
    if size > MAX_FRAME:
        raise FrameTooLargeError(
            f"A message of {_gib(size)} is over tandem's limit of {_gib(MAX_FRAME)} between "
            "processes; send a path or a reference to the data instead."
        )
    header = _HEADER.pack(len(raws), len(body)) + b"".join(_LENGTH.pack(raw.nbytes) for raw in raws)
    return [header, body, *raws]


# Received parts at least this large are read straight into their own buffer.
_DIRECT = 64 * 1024
_STAGING = 256 * 1024
# A part's own buffer starts this large (or at the part's size, if smaller) and
# doubles as bytes arrive, so a header cannot make us take memory on its word.
_FIRST_GROWTH = 1 << 20
_ZEROS = bytes(_FIRST_GROWTH)


def _grow(buffer: bytearray, filled: int, size: int) -> bytearray:
    """``buffer`` (full with ``filled`` bytes) made up to twice as long, at most ``size``."""
    target = min(2 * len(buffer), size)
    zeros = memoryview(_ZEROS)
    try:
        # In place, so realloc can grow a large buffer by remapping its pages
        # rather than copying what arrived; in steps, as Python has no resize.
        while len(buffer) < target:
            buffer += zeros[: target - len(buffer)]
        return buffer
    except BufferError:  # still exported somewhere: copy into a new one instead
        bigger = bytearray(target)
        bigger[:filled] = memoryview(buffer)[:filled]
        return bigger


class FrameProtocol(asyncio.BufferedProtocol):
    """Reads frames off a stream socket and hands each message to ``on_message``.

    Small frames are parsed out of one staging buffer (often several per
    ``recv``); a large part (an out-of-band buffer, or a large pickle) is
    received straight into the buffer the unpickler will adopt, so a 10 MB
    array is copied once on the way in: from the kernel into its own memory.
    That buffer grows as bytes arrive (see ``_grow``), not on the header's word.
    """

    def __init__(
        self,
        on_message: Callable[[Any], None],
        on_lost: Callable[[BaseException | None], None],
    ) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._staging = bytearray(_STAGING)
        self._start = 0  # unparsed bytes are self._staging[self._start:self._end]
        self._end = 0
        # The frame being read: its part lengths, parts so far, and a part in direct mode
        # (its buffer, bytes received, and the part's full size).
        self._lengths: list[int] | None = None
        self._parts: list[bytearray] = []
        self._direct: bytearray | None = None
        self._filled = 0
        self._wanted = 0
        self._paused = False
        self._drained: list[asyncio.Future[None]] = []

    # -- asyncio.BufferedProtocol -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None:
            if self._filled == len(self._direct):
                # Grown here, not in buffer_updated: by now the transport has
                # let go of the view it received into, so the buffer may move.
                self._direct = _grow(self._direct, self._filled, self._wanted)
            return memoryview(self._direct)[self._filled :]
        if self._end == len(self._staging):
            # Move the unparsed tail to the front to make room.
            tail = self._end - self._start
            self._staging[:tail] = self._staging[self._start : self._end]
            self._start, self._end = 0, tail
        return memoryview(self._staging)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is not None:
            self._filled += nbytes
            if self._filled < self._wanted:
                return
            self._parts.append(self._direct)
            self._direct = None
        else:
            self._end += nbytes
        try:
            self._parse()
        except Exception as exc:  # a broken frame: this connection cannot go on
            logger.error("Dropping a connection that sent a bad frame: %s", exc)
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        for waiter in self._drained:
            if not waiter.done():
                waiter.set_result(None)
        self._on_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drained:
            if not waiter.done():
                waiter.set_result(None)
        self._drained.clear()

    # -- frames --------------------------------------------------------------

    def _read_header(self) -> list[int] | None:
        """The part lengths of the next frame, once its header is in; checked against the caps."""
        available = self._end - self._start
        if available < _HEADER.size:
            return None
        count, body_length = _HEADER.unpack_from(self._staging, self._start)
        if count > MAX_BUFFERS:
            raise FrameTooLargeError(
                f"a frame announced {count} buffers, over the limit of {MAX_BUFFERS} (MAX_BUFFERS)"
            )
        need = _HEADER.size + _LENGTH.size * count  # fits the staging buffer (MAX_BUFFERS)
        if available < need:
            return None
        lengths = [body_length] + [
            _LENGTH.unpack_from(self._staging, self._start + _HEADER.size + _LENGTH.size * i)[0]
            for i in range(count)
        ]
        if sum(lengths) > MAX_FRAME:
            raise FrameTooLargeError(
                f"a frame announced {_gib(sum(lengths))}, over the limit of {_gib(MAX_FRAME)} "
                "(MAX_FRAME)"
            )
        self._start += need
        return lengths

    def _parse(self) -> None:
        while True:
            if self._lengths is None:
                self._lengths = self._read_header()
                if self._lengths is None:
                    return
                self._parts = []
            lengths = self._lengths
            while len(self._parts) < len(lengths):
                size = lengths[len(self._parts)]
                available = self._end - self._start
                if available >= size:
                    self._parts.append(self._staging[self._start : self._start + size])
                    self._start += size
                    continue
                if size >= _DIRECT or size > len(self._staging):
                    # Receive the rest of this part straight into its own buffer.
                    part = bytearray(min(size, _FIRST_GROWTH))
                    part[:available] = self._staging[self._start : self._end]
                    self._start = self._end = 0
                    self._direct, self._filled, self._wanted = part, available, size
                return
            body, *buffers = self._parts
            self._lengths = None
            self._parts = []
            if self._start == self._end:
                self._start = self._end = 0
            self._on_message(pickle.loads(body, buffers=buffers))

    # -- writing -------------------------------------------------------------

    def send(self, message: Any) -> None:
        """Queue one message (pickling happens here, so errors reach the sender)."""
        parts = dumps(message)
        assert self.transport is not None
        if self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.writelines(parts)

    async def drain(self) -> None:
        """Wait while the other side is slow to read what was sent."""
        if self._paused and self.transport is not None and not self.transport.is_closing():
            waiter = asyncio.get_running_loop().create_future()
            self._drained.append(waiter)
            await waiter


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process (its ``__cause__``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nThe remote traceback:\n{self.text}"


class RemoteError(Exception):
    """An exception from another process that could not be rebuilt as its own type."""


def pack_error(exc: BaseException) -> tuple[bytes | None, str, str]:
    """An exception as (pickled exception or None, description, traceback text)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob: bytes | None = cloudpickle.dumps(exc, protocol=5)
        pickle.loads(cloudpickle.dumps(exc, protocol=5))  # it must come back, too
    except Exception:
        blob = None
    return blob, f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}", text


def unpack_error(packed: tuple[bytes | None, str, str]) -> BaseException:
    """The exception of :func:`pack_error`, same type if possible, remote traceback attached."""
    blob, description, text = packed
    exc: BaseException
    try:
        exc = pickle.loads(blob) if blob is not None else RemoteError(description)
    except Exception:
        exc = RemoteError(description)
    exc.__cause__ = RemoteTraceback(text)
    return exc
