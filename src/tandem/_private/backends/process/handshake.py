"""The handshake that opens every connection to a replica's Unix socket.

Both ends prove they hold the run's secret (made by the process backend when
it opens, handed to each replica over its inherited control line) before a
single frame is parsed: a replica unpickles what callers send, so a stranger
must never get that far, and a caller must not unpickle what a stranger's
socket would feed it. On the raw socket, before any transport exists::

    caller  -> replica   MAGIC (8 bytes), caller nonce (32 bytes)
    replica -> caller    replica nonce (32), HMAC-SHA256(secret, REPLICA_LABEL + nonces)
    caller  -> replica   HMAC-SHA256(secret, CALLER_LABEL + nonces)

Distinct labels keep either side's proof from passing as the other's; fresh
nonces keep a proof from being replayed on another connection. It costs one
round trip per connection, and connections are long-lived. Either side gives
up after ``HANDSHAKE_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import socket
from collections.abc import Coroutine
from typing import Any

MAGIC = b"tandem\x00\x01"  # also names the protocol's version
NONCE_BYTES = 32
SECRET_BYTES = 32
HANDSHAKE_TIMEOUT_S = 5.0
_REPLICA_LABEL = b"tandem replica proof\x00"
_CALLER_LABEL = b"tandem caller proof\x00"
_MAC_BYTES = hashlib.sha256().digest_size


class HandshakeError(ConnectionError):
    """The other end did not prove it belongs to this run; the reason is safe to log."""


def new_secret() -> bytes:
    """A fresh secret for one run of the process backend."""
    return secrets.token_bytes(SECRET_BYTES)


def _proof(secret: bytes, label: bytes, caller_nonce: bytes, replica_nonce: bytes) -> bytes:
    return hmac.new(secret, label + caller_nonce + replica_nonce, hashlib.sha256).digest()


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    # Exactly ``size``: whatever follows the handshake stays in the kernel for the transport.
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise HandshakeError("it closed the connection during the handshake")
        data += chunk
    return data


async def client_handshake(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    secret: bytes,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> None:
    """Prove ourselves to the replica on the connected non-blocking ``sock``, and it to us."""

    async def run() -> None:
        caller_nonce = secrets.token_bytes(NONCE_BYTES)
        await loop.sock_sendall(sock, MAGIC + caller_nonce)
        answer = await _recv_exactly(loop, sock, NONCE_BYTES + _MAC_BYTES)
        replica_nonce, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
        expected = _proof(secret, _REPLICA_LABEL, caller_nonce, replica_nonce)
        if not hmac.compare_digest(proof, expected):
            raise HandshakeError("the socket's owner did not prove it holds this run's secret")
        await loop.sock_sendall(sock, _proof(secret, _CALLER_LABEL, caller_nonce, replica_nonce))

    await _bounded(run(), timeout_s)


async def server_handshake(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    secret: bytes,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> None:
    """Check that the caller on the accepted non-blocking ``sock`` holds the secret."""

    async def run() -> None:
        # The magic alone first, so that garbage is refused as soon as it arrives.
        if not hmac.compare_digest(await _recv_exactly(loop, sock, len(MAGIC)), MAGIC):
            raise HandshakeError("it sent something other than tandem's handshake")
        caller_nonce = await _recv_exactly(loop, sock, NONCE_BYTES)
        replica_nonce = secrets.token_bytes(NONCE_BYTES)
        proof = _proof(secret, _REPLICA_LABEL, caller_nonce, replica_nonce)
        await loop.sock_sendall(sock, replica_nonce + proof)
        answer = await _recv_exactly(loop, sock, _MAC_BYTES)
        expected = _proof(secret, _CALLER_LABEL, caller_nonce, replica_nonce)
        if not hmac.compare_digest(answer, expected):
            raise HandshakeError("it did not prove it holds this run's secret")

    await _bounded(run(), timeout_s)


async def _bounded(handshake: Coroutine[Any, Any, None], timeout_s: float) -> None:
    try:
        await asyncio.wait_for(handshake, timeout_s)
    except asyncio.TimeoutError:
        raise HandshakeError(f"the handshake did not finish within {timeout_s:g} s") from None
