"""Framing for messages between processes: pickle protocol 5 with out-of-band buffers.

A message is one Python object. Large buffers inside it (bytes, bytearrays,
NumPy arrays and anything else that supports ``PickleBuffer``) travel
out-of-band: they are written to the socket straight from their memory, not
copied into the pickle stream, and arrive as buffers the unpickler adopts.

Wire format of one frame::

    u32 count of buffers (n)  u64 len(pickle)  u64 len(buffer) * n
    pickle bytes  buffer bytes * n
"""

from __future__ import annotations

import asyncio
import copyreg
import pickle
import struct
import traceback
from typing import Any

import cloudpickle

_HEADER = struct.Struct("!IQ")
_LENGTH = struct.Struct("!Q")
# Buffers smaller than this are cheaper inside the pickle than beside it.
MIN_OUT_OF_BAND = 64 * 1024
MAX_FRAME = 1 << 40


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


def dumps(message: Any) -> list[bytes | memoryview]:
    """The parts of one frame, ready for ``writelines`` (no copy of large buffers)."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < MIN_OUT_OF_BAND:
            return True  # keep it in the pickle stream
        buffers.append(buffer)
        return False

    try:
        body = pickle.dumps(message, protocol=5, buffer_callback=out_of_band)
    except (pickle.PicklingError, TypeError, AttributeError):
        buffers.clear()
        # Classes and functions defined in __main__ or a notebook travel by value.
        body = cloudpickle.dumps(message, protocol=5, buffer_callback=out_of_band)
    raws = [b.raw() for b in buffers]
    header = _HEADER.pack(len(raws), len(body)) + b"".join(_LENGTH.pack(raw.nbytes) for raw in raws)
    return [header, body, *raws]


def loads(body: bytes, buffers: list[bytearray]) -> Any:
    return pickle.loads(body, buffers=buffers)


async def read_message(reader: asyncio.StreamReader) -> Any:
    """Read one frame; raises IncompleteReadError at end of stream."""
    count, body_length = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    lengths = [_LENGTH.unpack(await reader.readexactly(_LENGTH.size))[0] for _ in range(count)]
    if body_length > MAX_FRAME or any(n > MAX_FRAME for n in lengths):
        raise ValueError("Frame too large; the connection is out of sync.")
    body = await reader.readexactly(body_length)
    buffers = [bytearray(await reader.readexactly(n)) if n else bytearray() for n in lengths]
    return loads(body, buffers)


def write_message(writer: asyncio.StreamWriter, message: Any) -> None:
    """Queue one frame on ``writer`` (call ``await writer.drain()`` to apply backpressure)."""
    writer.writelines(dumps(message))


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
