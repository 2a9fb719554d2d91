"""HTTPS on the data port: the TLS context from ``http_options``, and TLS connections
held to the same limits as plain ones.

:func:`tls_context` loads the key, certificate and client CAs when the server
starts (and when ``tandem.start`` or ``tandem run`` is given them), so a missing
file, a wrong password or a key that does not match its certificate fails there
with an error naming the option, never on a client's first request. An
encrypted key with no password fails too, instead of OpenSSL asking for one on
the terminal.

uvicorn's own TLS (``ssl=`` on the listening socket) hands a connection to the
protocol only after the handshake, with asyncio's default 60 s to finish it, so
connections still shaking hands would count against no cap and no head
deadline. Here the server listens in plain TCP and :class:`TLSAcceptor` wraps
each connection as it is accepted: it counts against ``max_connections`` from
that moment (past the cap it is closed before any handshake), and the handshake
must finish within ``header_timeout_s``. After it, the HTTP protocol with its
limits (:mod:`tandem._private.http.limits`) runs on the decrypted stream as it
does on a plain one.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from asyncio.sslproto import SSLProtocol
from typing import Any, cast

from tandem._private.http.limits import ConnectionLimits, Refusals
from tandem._private.http.options import HTTPOptions

# How long a closing connection waits for the client's close_notify before closing the
# TCP connection anyway (asyncio's default, 30 s, would hold idle clients' sockets that long,
# and a server's graceful stop with them).
CLOSE_NOTIFY_WAIT_S = 1.0


class _NoPassword(Exception):
    """OpenSSL asked for the password of an encrypted key, and none was given."""


def tls_context(options: HTTPOptions) -> ssl.SSLContext | None:
    """The server's TLS context for ``options`` (None: plain HTTP).

    Raises ValueError saying which file or password is wrong, and what to do.
    """
    if options.ssl_certfile is None or options.ssl_keyfile is None:
        return None
    certfile, keyfile = options.ssl_certfile, options.ssl_keyfile
    _readable("ssl_certfile", certfile)
    key_text = _readable("ssl_keyfile", keyfile)
    password = options.ssl_keyfile_password
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2+, no compression
    try:
        # Always a callable: with None, OpenSSL would prompt on the terminal and block.
        context.load_cert_chain(certfile, keyfile, lambda: _password(password))
    except _NoPassword:
        raise ValueError(
            f"http_options.ssl_keyfile {keyfile!r} is encrypted: give its password as "
            "ssl_keyfile_password."
        ) from None
    except ssl.SSLError as exc:
        raise ValueError(_load_failure(exc, certfile, keyfile, key_text, password)) from None
    if options.ssl_ca_certs is not None:
        _readable("ssl_ca_certs", options.ssl_ca_certs)
        try:
            context.load_verify_locations(cafile=options.ssl_ca_certs)
        except ssl.SSLError as exc:
            raise ValueError(
                f"http_options.ssl_ca_certs {options.ssl_ca_certs!r} holds no usable CA "
                f"certificate ({exc.reason or exc}); give a PEM file of CA certificates."
            ) from None
        # Ray Serve documents ssl_ca_certs as client certificate verification: require it.
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _password(password: str | None) -> str:
    if password is None:
        raise _NoPassword
    return password


def _readable(option: str, path: str) -> str:
    """The file's text (for telling what it holds); ValueError naming ``option`` if unreadable."""
    try:
        with open(path, "rb") as file:
            return file.read().decode("ascii", "replace")
    except OSError as exc:
        raise ValueError(
            f"http_options.{option} {path!r} cannot be read ({exc.strerror or exc}); give the "
            "path of a PEM file this process can read."
        ) from None


def _load_failure(
    exc: ssl.SSLError, certfile: str, keyfile: str, key_text: str, password: str | None
) -> str:
    """Why OpenSSL would not load the key and certificate, as far as it can be told."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        return (
            f"http_options.ssl_keyfile {keyfile!r} is not the key of the certificate in "
            f"ssl_certfile {certfile!r}; give the matching pair."
        )
    if "-----BEGIN CERTIFICATE-----" not in _readable("ssl_certfile", certfile):
        return (
            f"http_options.ssl_certfile {certfile!r} holds no PEM certificate "
            "(-----BEGIN CERTIFICATE-----)."
        )
    if "PRIVATE KEY-----" not in key_text:
        return f"http_options.ssl_keyfile {keyfile!r} holds no PEM private key."
    if password is not None and "ENCRYPTED" in key_text:
        return (
            f"http_options.ssl_keyfile_password does not decrypt ssl_keyfile {keyfile!r}; "
            "give the key's password."
        )
    return (
        f"The HTTPS key {keyfile!r} and certificate {certfile!r} cannot be loaded: "
        f"{exc.reason or exc}."
    )


class TLSAcceptor:
    """uvicorn's HTTP protocol factory for one HTTPS server (see the module docstring).

    ``http`` makes the HTTP protocol (with its limits) for a connection, as
    uvicorn would; :meth:`close` drops connections the server did not close.
    """

    def __init__(
        self,
        http: Any,
        context: ssl.SSLContext,
        limits: ConnectionLimits,
        refusals: Refusals,
    ) -> None:
        self._http = http
        self.context = context
        self.limits = limits
        self.refusals = refusals
        self.open: set[_TLSConnection] = set()

    def __call__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> asyncio.BaseProtocol:
        loop = _loop or asyncio.get_running_loop()
        app = self._http(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
        return _TLSConnection(self, loop, app)

    def close(self) -> None:
        for connection in list(self.open):
            connection.drop()


class _TLSConnection(SSLProtocol):
    """One accepted connection: TLS around the HTTP protocol, counted from accept to close."""

    def __init__(
        self, acceptor: TLSAcceptor, loop: asyncio.AbstractEventLoop, app: asyncio.BaseProtocol
    ) -> None:
        timeouts: dict[str, Any] = {
            # typeshed says int; asyncio takes any number of seconds.
            "ssl_handshake_timeout": acceptor.limits.header_timeout_s
        }
        if sys.version_info >= (3, 11):  # 3.10's TLS waits for the client's close_notify
            timeouts["ssl_shutdown_timeout"] = CLOSE_NOTIFY_WAIT_S
        super().__init__(
            loop,
            app,
            acceptor.context,
            cast("asyncio.Future[Any]", None),  # nobody waits for the handshake
            server_side=True,
            **timeouts,
        )
        self._acceptor = acceptor
        self._event_loop = loop
        self._raw: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        acceptor = self._acceptor
        if len(acceptor.open) >= acceptor.limits.max_connections:
            # Before the handshake no HTTP answer can be read: close, at no cost.
            acceptor.refusals.add(503, self._event_loop)
            cast(asyncio.Transport, transport).abort()
            return
        self._raw = transport
        acceptor.open.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._acceptor.open.discard(self)
        super().connection_lost(exc)  # also for a refused one: it closes the unused TLS side

    def _check_shutdown_timeout(self) -> None:
        # asyncio calls this when the client has not answered our close_notify in time, and
        # would abort, dropping what is still buffered for the client. HTTP needs no answer
        # (RFC 2818): close as asyncio does when the answer comes, which sends everything
        # written first. A late close_notify finds the socket closed, after the client has
        # read all up to ours.
        if self._raw is not None:
            self._raw.close()

    def drop(self) -> None:
        if self._raw is not None:
            cast(asyncio.Transport, self._raw).abort()
