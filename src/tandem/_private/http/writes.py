"""A connection's transport whose writes the proxy can hold and send as one.

uvicorn writes a response's head and its body with one ``transport.write`` each:
two system calls, and on loopback two wake-ups of the client, for a response that
is complete before its first byte goes out (most are: the replica sends it as one
item, ``calls.flow.Last``). The proxy holds the writes from the moment it has
read a request's body until the response is counted and logged (or starts to
stream), and releases them together.
"""

from __future__ import annotations

import asyncio
from typing import Any

# The scope key under which the proxy finds the connection's HeldWrites.
SCOPE_KEY = "tandem.writes"
# Held parts up to this many bytes in all are joined into one write; larger ones
# are written one by one (joining would copy a large body).
JOIN_LIMIT = 64 * 1024


class HeldWrites:
    """Wraps a transport; between :meth:`hold` and :meth:`release`, writes wait."""

    __slots__ = ("_held", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._held: list[bytes] | None = None

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        if not held:
            return
        write = self.transport.write
        if len(held) == 1:
            write(held[0])
        elif sum(len(part) for part in held) <= JOIN_LIMIT:
            write(b"".join(held))
        else:
            for part in held:
                write(part)

    def write(self, data: bytes) -> None:
        if self._held is None:
            self.transport.write(data)
        else:
            self._held.append(data)

    def close(self) -> None:
        self.release()  # what the response wrote goes out before the connection closes
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # the rest of the transport's interface
        return getattr(self.transport, name)


class Unheld:
    """What the proxy holds writes with where the connection cannot (the h11 parser): nothing."""

    __slots__ = ()

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass


UNHELD = Unheld()
