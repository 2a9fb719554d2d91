"""A connection between two processes that carries many requests at once.

Each side is a :class:`Peer`: it sends requests and gets their replies
(matched by id), and, if it has handlers, serves the requests the other side
sends. Streams are requests whose reply is a series of items. When the
connection breaks, every request waiting on it fails with
``ReplicaUnavailableError`` at once: nothing hangs.

Messages are tuples; the first item says what they are:

    ("call", id, op, payload)        a request; the reply is one "ok" or "err"
    ("stream", id, op, payload)      a request; the reply is "item"s, then "end" or "err"
    ("cancel", id)                   stop serving request id
    ("ok", id, value) ("err", id, packed error) ("item", id, value) ("end", id, None)
    ("last", id, value)              an item known to be the last, and the end
    ("note", op, payload)            a one-way message, no reply

Connections to a replica's Unix socket (:func:`open_peer`, :class:`PeerListener`)
carry frames only after both ends passed the handshake (``handshake``); a
control line (:func:`peer_on_socket`) is an inherited socket pair, trusted as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from tandem._private.backends.process.frames import FrameProtocol, pack_error, unpack_error
from tandem._private.backends.process.handshake import (
    HandshakeError,
    client_handshake,
    server_handshake,
)
from tandem._private.calls.errors import ReplicaNotReached
from tandem._private.calls.flow import Last
from tandem.exceptions import ReplicaUnavailableError

logger = logging.getLogger("tandem")

# Serves ("call", op, payload): returns the reply value or raises.
CallHandler = Callable[[str, Any], Awaitable[Any]]
# Serves ("stream", op, payload): yields the items.
StreamHandler = Callable[[str, Any], AsyncGenerator[Any, None]]
NoteHandler = Callable[[str, Any], None]


class Peer:
    """One end of a connection (see the module docstring).

    Connect it with :func:`open_peer` or :func:`peer_on_socket`, or serve
    :attr:`protocol` from a server.
    """

    def __init__(
        self,
        name: str,
        on_call: CallHandler | None = None,
        on_stream: StreamHandler | None = None,
        on_note: NoteHandler | None = None,
    ) -> None:
        self.name = name
        self._on_call = on_call
        self._on_stream = on_stream
        self._on_note = on_note
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, asyncio.Queue[tuple[str, Any]]] = {}
        self._serving: dict[int, asyncio.Task[None]] = {}
        self.protocol = FrameProtocol(self._on_message, self._on_lost)
        self.closed = asyncio.Event()
        self.closed_callbacks: list[Callable[[], None]] = []

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    def abort(self) -> None:
        """Close now; requests still waiting fail."""
        if self.protocol.transport is not None:
            self.protocol.transport.abort()

    # -- sending -----------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        """Send a request; if the connection is closed (or closing), nothing went out,
        so the caller may safely send the request elsewhere."""
        if not self.closed.is_set():
            try:
                self.protocol.send(message)
                return
            except ConnectionError:
                pass  # closing: connection_lost has not run yet
        raise ReplicaNotReached(
            f"The connection to {self.name} is closed; the request was not sent."
        )

    def note(self, op: str, payload: Any) -> None:
        """Send a one-way message (dropped if the connection is closed)."""
        if not self.closed.is_set():
            self.protocol.send(("note", op, payload))

    async def call(self, op: str, payload: Any) -> Any:
        """Send a request and wait for its reply; cancelling this cancels it over there."""
        request_id = next(self._ids)
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = reply
        try:
            self._send(("call", request_id, op, payload))
            return await reply
        except asyncio.CancelledError:
            if not self.closed.is_set():
                self.protocol.send(("cancel", request_id))
            raise
        finally:
            self._replies.pop(request_id, None)

    async def stream(self, op: str, payload: Any) -> AsyncGenerator[Any, None]:
        """Send a streaming request and yield its items as they arrive."""
        request_id = next(self._ids)
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._streams[request_id] = items
        finished = False
        try:
            self._send(("stream", request_id, op, payload))
            while True:
                kind, value = await items.get()
                if kind == "item":
                    yield value
                elif kind == "end":
                    finished = True
                    return
                else:
                    finished = True
                    raise value
        finally:
            self._streams.pop(request_id, None)
            if not finished and not self.closed.is_set():
                self.protocol.send(("cancel", request_id))

    # -- receiving ---------------------------------------------------------

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ok":
            reply = self._replies.get(message[1])
            if reply is not None and not reply.done():
                reply.set_result(message[2])
        elif kind == "item" or kind == "end":
            items = self._streams.get(message[1])
            if items is not None:
                items.put_nowait((kind, message[2]))
        elif kind == "last":  # an item and the end, in one message
            items = self._streams.get(message[1])
            if items is not None:
                items.put_nowait(("item", Last(message[2])))
                items.put_nowait(("end", None))
        elif kind == "err":
            error = unpack_error(message[2])
            reply = self._replies.get(message[1])
            if reply is not None and not reply.done():
                reply.set_exception(error)
            elif message[1] in self._streams:
                self._streams[message[1]].put_nowait(("err", error))
        elif kind == "call" or kind == "stream":
            self._serve(kind, message[1], message[2], message[3])
        elif kind == "cancel":
            task = self._serving.get(message[1])
            if task is not None:
                task.cancel()
        elif kind == "note" and self._on_note is not None:
            try:
                self._on_note(message[1], message[2])
            except Exception:
                logger.exception("Handling %r from %s failed", message[1], self.name)

    def _on_lost(self, exc: BaseException | None) -> None:
        self.closed.set()
        for callback in self.closed_callbacks:
            callback()
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(self._broken())
        for items in self._streams.values():
            items.put_nowait(("err", self._broken()))
        for task in self._serving.values():
            task.cancel()

    def _broken(self) -> ReplicaUnavailableError:
        return ReplicaUnavailableError(
            f"The connection to {self.name} broke: the replica died or was stopped."
        )

    # -- serving -----------------------------------------------------------

    def _serve(self, kind: str, request_id: int, op: str, payload: Any) -> None:
        if kind == "call":
            task = asyncio.ensure_future(self._serve_call(request_id, op, payload))
        else:
            task = asyncio.ensure_future(self._serve_stream(request_id, op, payload))
        self._serving[request_id] = task
        task.add_done_callback(lambda _: self._serving.pop(request_id, None))

    async def _serve_call(self, request_id: int, op: str, payload: Any) -> None:
        assert self._on_call is not None
        try:
            value = await self._on_call(op, payload)
        except asyncio.CancelledError:
            return  # the caller asked for it (or is gone): nobody waits for a reply
        except BaseException as exc:
            self._reply(("err", request_id, pack_error(exc)))
            return
        self._reply(("ok", request_id, value))

    async def _serve_stream(self, request_id: int, op: str, payload: Any) -> None:
        assert self._on_stream is not None
        source = self._on_stream(op, payload)
        ended = False  # a "last" item was sent: it carried the end
        try:
            async for item in source:
                if type(item) is Last:
                    self._reply(("last", request_id, item.value))
                    ended = True
                    continue  # the source ends now; let it finish cleanly
                self._reply(("item", request_id, item))
                await self.protocol.drain()  # a slow reader slows the producer
        except asyncio.CancelledError:
            return
        except BaseException as exc:
            if not ended:
                self._reply(("err", request_id, pack_error(exc)))
            return
        finally:
            await source.aclose()
        if not ended:
            self._reply(("end", request_id, None))

    def _reply(self, message: tuple[Any, ...]) -> None:
        if self.closed.is_set():
            return
        try:
            self.protocol.send(message)
        except ConnectionError:
            pass
        except Exception as exc:  # e.g. the value cannot be pickled
            if message[0] not in ("ok", "item"):
                raise
            error = TypeError(
                f"The result of type {type(message[2]).__name__} cannot be sent to the "
                f"caller: {exc}"
            )
            self.protocol.send(("err", message[1], pack_error(error)))


# After a failed accept (e.g. out of file descriptors), wait this long before the next.
ACCEPT_RETRY_S = 0.1


async def open_peer(path: str, name: str, secret: bytes) -> Peer:
    """Connect to a replica's Unix socket; both ends prove they hold ``secret`` first.

    Raises ``OSError`` (``HandshakeError`` if the handshake failed) when it cannot.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, path)
        await client_handshake(loop, sock, secret)
        peer = Peer(name)
        _large_buffers(sock)
        await loop.create_unix_connection(lambda: peer.protocol, sock=sock)
    except BaseException:
        sock.close()
        raise
    return peer


class PeerListener:
    """Serves whoever connects to a Unix socket and passes the handshake.

    Each connection gets its own task for the handshake and, once through, a
    peer from ``make_peer``; one that fails is closed and logged, and nothing it
    sent is ever parsed. :meth:`open` binds and starts accepting; :meth:`close`
    ends the accept loop and the handshakes in progress (peers already serving
    stay open).
    """

    def __init__(self, secret: bytes, make_peer: Callable[[], Peer]) -> None:
        self._secret = secret
        self._make_peer = make_peer
        self.path = ""
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def open(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # Before listen(), so no one connects while the umask's mode holds.
            os.chmod(path, 0o600)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.path, self._sock = path, sock
        self._accepting = asyncio.ensure_future(self._accept(sock))

    async def close(self) -> None:
        tasks = [task for task in (self._accepting, *self._handshakes) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                logger.warning("Accepting a connection on %s failed: %s", self.path, exc)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            conn.setblocking(False)
            task = asyncio.ensure_future(self._admit(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _admit(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await server_handshake(loop, conn, self._secret)
            peer = self._make_peer()
            _large_buffers(conn)
            await loop.connect_accepted_socket(lambda: peer.protocol, sock=conn)
        except OSError as exc:  # HandshakeError included
            reason = exc if isinstance(exc, HandshakeError) else f"its socket failed ({exc})"
            logger.warning("Refused a connection to %s%s: %s.", self.path, _caller(conn), reason)
            conn.close()
        except BaseException:
            conn.close()
            raise


def _caller(conn: socket.socket) -> str:
    """Who is on the other end of ``conn``, for a log line (Linux only)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return ""
    pid, _, _ = struct.unpack("3i", creds)
    return f" from pid {pid}"


async def peer_on_socket(sock: socket.socket, peer: Peer) -> Peer:
    """Run ``peer`` over an already connected socket (one end of a socket pair)."""
    await asyncio.get_running_loop().create_unix_connection(lambda: peer.protocol, sock=sock)
    return peer


def _large_buffers(sock: socket.socket) -> None:
    """Let up to 4 MiB wait in the socket (as far as the system allows, net.core.wmem_max):
    a loop reads what is there in one go, so a large message on one connection is not
    starved by many small reads elsewhere on a busy loop (each ready socket gets one read
    per turn)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        except OSError:
            pass
