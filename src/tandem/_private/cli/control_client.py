"""The CLI's side of the control endpoint: find a server's, and send it requests.

``tandem status|deploy|shutdown --address http://HOST:PORT`` names a server by
its data address. A server on this machine run by the same user is found by
its port: its control socket is ``control-<PORT>.sock`` in the user's private
directory. A server elsewhere is reached with ``--control``: either
``http://HOST:PORT`` of its TCP control port (with ``--token-file``, or
``$TANDEM_CONTROL_TOKEN``), or a local port forwarded to its control socket
(``ssh -L 9000:/run/user/1000/tandem/control-8000.sock HOST``), or a socket path
given as ``unix:PATH``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem._private.rundir import control_socket_path

TOKEN_ENV_VAR = "TANDEM_CONTROL_TOKEN"
_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1", "0.0.0.0", "::"}


class ControlError(Exception):
    """A control request that failed, with a message for the user."""


@dataclass(frozen=True)
class ControlEndpoint:
    """Where a server's control endpoint is: a Unix socket path, or a TCP URL."""

    unix_path: str | None = None
    url: str | None = None
    token: str | None = None
    address: str | None = None  # the data address it was found by, if any

    def describe(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else str(self.url)


def find_control(
    address: str, control: str | None = None, token_file: str | None = None
) -> ControlEndpoint:
    """The control endpoint for a server named by its data ``address`` (or ``control``)."""
    token = _read_token(token_file)
    if control:
        if control.startswith("unix:"):
            return ControlEndpoint(unix_path=control[len("unix:") :])
        parsed = urllib.parse.urlsplit(control)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ControlError(f"--control takes http://HOST:PORT or unix:PATH, got {control!r}.")
        return ControlEndpoint(url=control.rstrip("/"), token=token)
    parsed = urllib.parse.urlsplit(address if "://" in address else f"http://{address}")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        raise ControlError(f"--address takes http://HOST:PORT, got {address!r}.") from None
    host = parsed.hostname or ""
    if not _is_this_machine(host):
        raise ControlError(
            f"{host} is not this machine: control a server on another machine with "
            "--control (its control port and --token-file, or an SSH-forwarded control "
            "socket); see SECURITY.md."
        )
    path = control_socket_path(port)
    if not path.exists():
        raise ControlError(
            f"No tandem server of yours serves {address} (port {port}) on this machine (no "
            f"control socket at {path}); start one with `tandem run`, or pass --address (or "
            "--control for a server elsewhere)."
        )
    return ControlEndpoint(unix_path=str(path), address=address)


def request(endpoint: ControlEndpoint, method: str, path: str, body: Any = None) -> Any:
    """Send one control request; return its JSON answer or raise ControlError."""
    data = None if body is None else json.dumps(body).encode()
    headers = _auth(endpoint)
    if data is not None:
        headers["content-type"] = "application/json"
    connection = _connection(endpoint)
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise _failed(endpoint, exc) from None
    finally:
        connection.close()
    try:
        answer = json.loads(raw or b"null")
    except ValueError:
        answer = None
    if response.status >= 400:
        raise _refused(response, answer)
    return answer


def fetch(
    endpoint: ControlEndpoint, path: str, timeout: float = 30
) -> tuple[http.client.HTTPResponse, bytes]:
    """GET ``path``: the response (its status and headers) and its body, whatever the
    status. Raises ControlError if no whole answer came."""
    connection = _connection(endpoint, timeout)
    try:
        connection.request("GET", path, headers=_auth(endpoint))
        response = connection.getresponse()
        return response, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise _failed(endpoint, exc) from None
    finally:
        connection.close()


def stream(endpoint: ControlEndpoint, path: str) -> Iterator[Any]:
    """GET a streamed answer of JSON lines (NDJSON); yield each object as it arrives,
    until the server ends the answer. Raises ControlError as :func:`request` does."""
    connection = _connection(endpoint, timeout=None)  # a followed log may be quiet for long
    try:
        try:
            connection.request("GET", path, headers=_auth(endpoint))
            response = connection.getresponse()
            if response.status >= 400:
                raw = response.read()
                try:
                    answer = json.loads(raw or b"null")
                except ValueError:
                    answer = None
                raise _refused(response, answer)
            while line := response.readline():
                if line.strip():
                    yield json.loads(line)
        except (OSError, http.client.HTTPException) as exc:
            raise _failed(endpoint, exc) from None
    finally:
        connection.close()


def _auth(endpoint: ControlEndpoint) -> dict[str, str]:
    """The headers every control request carries: the token, for a control port."""
    return {"authorization": f"Bearer {endpoint.token}"} if endpoint.token else {}


def _failed(endpoint: ControlEndpoint, exc: Exception) -> ControlError:
    """The error of a control request that got no (whole) answer."""
    if isinstance(exc, http.client.HTTPException):
        return ControlError(f"The control endpoint at {endpoint.describe()} broke off ({exc!r}).")
    reason = getattr(exc, "strerror", None) or exc
    if endpoint.address is not None:  # e.g. a socket left by a server that was killed
        return ControlError(
            f"No tandem server of yours serves {endpoint.address} on this machine: its "
            f"control socket {endpoint.describe()} does not answer "
            f"({reason}); start one with `tandem run`."
        )
    return ControlError(
        f"No tandem control endpoint answers at {endpoint.describe()} "
        f"({reason}); is the server running?"
    )


def _refused(response: http.client.HTTPResponse, answer: Any) -> ControlError:
    detail = answer.get("error") if isinstance(answer, dict) else None
    return ControlError(
        f"The server's control endpoint answered {response.status}: {detail or response.reason}"
    )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _connection(
    endpoint: ControlEndpoint, timeout: float | None = 120
) -> http.client.HTTPConnection:
    if endpoint.unix_path is not None:
        return _UnixConnection(endpoint.unix_path, timeout)
    parsed = urllib.parse.urlsplit(str(endpoint.url))
    if parsed.scheme == "https":
        return http.client.HTTPSConnection(parsed.netloc, timeout=timeout)
    return http.client.HTTPConnection(parsed.netloc, timeout=timeout)


def _read_token(token_file: str | None) -> str | None:
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            raise ControlError(
                f"Cannot read the token file {token_file}: {exc.strerror or exc}."
            ) from None
    return os.environ.get(TOKEN_ENV_VAR) or None


def _is_this_machine(host: str) -> bool:
    """Whether ``host`` names this machine: one of its addresses can be bound."""
    if host in _LOCAL_HOSTS:
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind((sockaddr[0], 0))
            except OSError:
                continue
            return True
    return False
