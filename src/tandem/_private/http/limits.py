"""Connection limits on the data port: what one connection may cost the server.

Owns the limits that apply before a request reaches the proxy: how large a
request's head (request line and headers) may be, how long it may take to
arrive, and how many connections may be open at once; and the process's
open-file limit, from which the default connection cap is derived. (Idle time
between requests is uvicorn's keep-alive timer; body size is the proxy's.)

uvicorn's httptools protocol has no head size limit and arms no timer before a
connection's first request, so the limits live in a subclass of it, bound to
one server's limits by :func:`protocol_class`. Without httptools, a subclass of
uvicorn's h11 protocol enforces the same limits (h11's own head size limit,
``h11_max_incomplete_event_size``, covers only heads it is still waiting for).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import resource
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from tandem._private.http.options import HTTPOptions
from tandem._private.http.writes import SCOPE_KEY, HeldWrites

HAVE_HTTPTOOLS = importlib.util.find_spec("httptools") is not None
if TYPE_CHECKING or HAVE_HTTPTOOLS:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
else:  # pragma: no cover - httptools comes with uvicorn[standard]
    HttpToolsProtocol = asyncio.Protocol  # keeps the class below definable; h11 serves instead

logger = logging.getLogger("tandem.proxy")

# `tandem run` raises the soft open-file limit to the hard one, but no higher than this.
OPEN_FILES_CAP = 65536
# Descriptors kept from HTTP connections for replicas' sockets and pipes, logs and the
# server's own work: this share of the open-file limit, and at least MIN_FD_RESERVE.
FD_RESERVE_FRACTION = 0.25
MIN_FD_RESERVE = 256
MIN_MAX_CONNECTIONS = 16
# Refusals are logged at most this often, so an attack cannot flood the log.
REFUSAL_LOG_INTERVAL_S = 10.0

# Where h11 sees a head end (it accepts bare LF line ends).
_H11_HEAD_END = re.compile(b"\n\r?\n")
_REASON = {
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def open_file_limit() -> int | None:
    """The process's soft limit on open files (None: unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit(cap: int = OPEN_FILES_CAP) -> int | None:
    """Raise the soft open-file limit to the hard limit (at most ``cap``); return the new one.

    Many systems start processes with a soft limit of 1024 under a far higher hard
    limit; a server holding many connections and replica sockets should use the room.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. macOS allows less than the hard limit
            logger.debug("Could not raise the open-file limit to %d: %s", target, exc)
    return open_file_limit()


def default_max_connections(open_files: int | None) -> int:
    """The connection cap for a process that may have ``open_files`` descriptors open."""
    if open_files is None:
        open_files = OPEN_FILES_CAP
    reserve = max(int(open_files * FD_RESERVE_FRACTION), MIN_FD_RESERVE)
    return max(open_files - reserve, MIN_MAX_CONNECTIONS)


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits one server enforces, with the connection cap resolved."""

    max_header_bytes: int
    header_timeout_s: float
    max_connections: int

    @classmethod
    def from_options(cls, options: HTTPOptions) -> ConnectionLimits:
        """The limits ``options`` ask for; a cap not given is derived from the open-file limit."""
        max_connections = options.max_connections
        if max_connections is None:
            max_connections = default_max_connections(open_file_limit())
        return cls(options.max_header_bytes, options.header_timeout_s, max_connections)


class Refusals:
    """Counts what the limits refused, and logs it at most once per ``interval_s``.

    The first refusal is logged at once (on the loop's next turn); later ones are
    summed into one line per kind when the interval is over. :meth:`flush` logs
    what is left (the server calls it when it stops).
    """

    def __init__(self, limits: ConnectionLimits, interval_s: float = REFUSAL_LOG_INTERVAL_S):
        self._limits = limits
        self._interval_s = interval_s
        self._pending: dict[int, int] = {}  # status -> refusals not logged yet
        self._timer: asyncio.TimerHandle | None = None
        self._next_log = 0.0

    def add(self, status: int, loop: asyncio.AbstractEventLoop) -> None:
        self._pending[status] = self._pending.get(status, 0) + 1
        if self._timer is None:
            delay = max(0.0, self._next_log - time.monotonic())
            self._timer = loop.call_later(delay, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        self._next_log = time.monotonic() + self._interval_s
        limits = self._limits
        for status, count in sorted(self._pending.items()):
            if status == 503:
                logger.warning(
                    "Refused %d HTTP connection(s) with 503: %d were open (max_connections). "
                    "If that is your real load, raise max_connections (tandem run "
                    "--max-connections) and the open-file limit (ulimit -n).",
                    count,
                    limits.max_connections,
                )
            elif status == 431:
                logger.warning(
                    "Refused %d HTTP request(s) with 431: request line and headers over %d "
                    "bytes (max_header_bytes).",
                    count,
                    limits.max_header_bytes,
                )
            else:
                logger.warning(
                    "Closed %d HTTP connection(s) that sent no complete request line and "
                    "headers within %g s (header_timeout_s).",
                    count,
                    limits.header_timeout_s,
                )
        self._pending.clear()


def protocol_class(
    limits: ConnectionLimits,
    refusals: Refusals,
    parser: Literal["httptools", "h11"] | None = None,
) -> type[asyncio.Protocol]:
    """The protocol class (uvicorn's ``http=``) enforcing ``limits`` for one server.

    ``parser`` defaults to httptools when it is installed, else h11.
    """
    if parser is None:
        parser = "httptools" if HAVE_HTTPTOOLS else "h11"
    base: type[Any] = HttpToolsWithLimits if parser == "httptools" else H11WithLimits
    bound = type(base.__name__, (base,), {"limits": limits, "refusals": refusals})
    return cast("type[asyncio.Protocol]", bound)


class HttpToolsWithLimits(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit, a head deadline and a cap.

    Per request it costs a few attribute updates: a head that arrives in one read
    (nearly all do) arms no timer and is measured only if that read was large.
    """

    limits: ClassVar[ConnectionLimits]
    refusals: ClassVar[Refusals]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True  # waiting for (the rest of) a request line and headers
        self._head_bytes = 0  # bytes of that head in earlier reads (held by the parser)
        self._read_bytes = 0  # size of the read being parsed
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if _refused(self, transport):
            self.transport = transport  # for connection_lost
            return
        super().connection_made(transport)
        # Every cycle writes through it; the proxy holds a whole response's writes.
        self.transport = HeldWrites(transport)  # type: ignore[assignment]
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_refused:
            return  # the connection closes once the response before that head is out
        if self.timeout_keep_alive_task is not None:
            # The first byte after an idle gap starts the next head's clock, even a stray
            # CRLF, which starts no message but would cancel uvicorn's keep-alive timer.
            self._in_head = True
            self._head_bytes = 0
        self._read_bytes = len(data)
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # The head is still incomplete; httptools buffers a header until it ends, so
            # count what arrived (a read that began with a pipelined body counts whole).
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head()
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self.limits.header_timeout_s, self._head_late
                )

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        limit = self.limits.max_header_bytes
        # Only a head that came with a large read can be over the limit: measure only then.
        if self._head_bytes + self._read_bytes > limit and self._head_size() > limit:
            self._refuse_head()
            raise _HeadRefused  # stops the parser (uvicorn then logs an invalid request)
        self.scope[SCOPE_KEY] = self.transport  # type: ignore[literal-required]
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._head_refused:  # our answer (or close) stands
            super().send_400_response(msg)

    def _head_size(self) -> int:
        # Request line and header lines as received, give or take some whitespace.
        headers = sum(len(name) + len(value) + 4 for name, value in self.headers)
        return len(self.url) + headers + 16

    def _refuse_head(self) -> None:
        self._head_refused = True
        self._in_head = False
        self.refusals.add(431, self.loop)
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a response still going out: no answer fits in
            # between, so read no more and close once that response is complete.
            self.flow.pause_reading()
            self.cycle.keep_alive = False
            return
        _answer(
            self.transport,
            431,
            f"request line and headers over {self.limits.max_header_bytes} bytes",
        )

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head stalled behind a response still going out: close after it.
            self.cycle.keep_alive = False
            return
        _time_out(self.transport, self._head_bytes > 0, self.limits)
        self.refusals.add(408, self.loop)


class H11WithLimits(H11Protocol):
    """uvicorn's h11 protocol with a head size limit, a head deadline and a connection cap."""

    limits: ClassVar[ConnectionLimits]
    refusals: ClassVar[Refusals]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if _refused(self, transport):
            self.transport = transport
            return
        super().connection_made(transport)
        # Every cycle writes through it; the proxy holds a whole response's writes.
        self.transport = HeldWrites(transport)  # type: ignore[assignment]
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        limit = self.limits.max_header_bytes
        if self.conn.their_state is h11.IDLE and self._head_bytes + len(data) > limit:
            # h11 limits only a head it is still waiting for; one that arrives whole in
            # a large read would pass, so measure it before h11 sees it.
            end = _H11_HEAD_END.search(data)
            if end is None or self._head_bytes + end.end() > limit:
                _answer(self.transport, 431, f"request line and headers over {limit} bytes")
                self.refusals.add(431, self.loop)
                return
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # h11 has not seen a whole head yet
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self.limits.header_timeout_s, self._head_late
                )
        else:
            self._head_bytes = 0
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        _time_out(self.transport, self._head_bytes > 0, self.limits)
        self.refusals.add(408, self.loop)


class _HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a head that was refused."""


def _refused(protocol: HttpToolsWithLimits | H11WithLimits, transport: asyncio.Transport) -> bool:
    """Answer 503 and close, before reading a byte, if the server is at its cap.

    A refused connection holds its descriptor only for this moment, so idle
    sockets can never use up the descriptors replicas and the server need.
    """
    if len(protocol.connections) < protocol.limits.max_connections:
        return False
    _answer(transport, 503, "too many open connections; retry later", b"retry-after: 1\r\n")
    protocol.refusals.add(503, protocol.loop)
    return True


def _time_out(transport: asyncio.Transport, started: bool, limits: ConnectionLimits) -> None:
    if started:
        _answer(
            transport,
            408,
            f"request line and headers not complete within {limits.header_timeout_s:g} s",
        )
    else:  # a connection that never sent a byte gets no answer it did not ask for
        transport.close()


def _answer(transport: asyncio.Transport, status: int, text: str, headers: bytes = b"") -> None:
    """Write a short plain-text response and close the connection."""
    body = f"{_REASON[status]}: {text}.\n".encode()
    transport.write(
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n%s\r\n%s"
        % (status, _REASON[status].encode(), len(body), headers, body)
    )
    transport.close()
