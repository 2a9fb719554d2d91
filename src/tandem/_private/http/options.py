"""HTTP options (Ray Serve's ``http_options``), validated once at the edge.

Ray Serve's fields keep their meaning: where the proxy listens, its ASGI
``root_path``, HTTPS (``ssl_*``, see :mod:`tandem._private.http.tls`), the
request and keep-alive timeouts. The fields Ray Serve deprecated are taken as
it takes them: ``location`` (use ``proxy_location``), and ``middlewares`` and
``num_cpus`` only when empty.

tandem's own limits have safe defaults (named below) and are enforced on the
data port: header size, header time, idle time and open connections by
:mod:`tandem._private.http.limits`, body size by the proxy.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Iterable
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 5.0
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_HEADER_TIMEOUT_S = 30.0
DEFAULT_MAX_BODY_BYTES = 100 * 1024 * 1024
# A smaller head limit would refuse ordinary browser requests (cookies alone reach 4 KiB).
MIN_MAX_HEADER_BYTES = 1024
# What uvicorn puts before every path: printable ASCII without a query, fragment or space.
_ROOT_PATH_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - set("?#%")


class ProxyLocation(str, Enum):
    """Where proxies run (Ray Serve's names). tandem runs one proxy, in the process that
    runs the applications, for ``HeadOnly`` and ``EveryNode`` alike; ``Disabled`` runs none."""

    Disabled = "Disabled"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"

    @classmethod
    def of(cls, value: ProxyLocation | str) -> ProxyLocation:
        """``value`` as a location; "NoServer" is Ray Serve's old name for Disabled."""
        if isinstance(value, cls):
            return value
        name = getattr(value, "value", value)  # e.g. Ray Serve's own enum
        if name == "NoServer":
            return cls.Disabled
        try:
            return cls(name)
        except ValueError:
            raise ValueError(
                f"proxy_location must be 'Disabled', 'HeadOnly' or 'EveryNode', got {value!r}"
            ) from None


class HTTPOptions(BaseModel):
    """Where the proxy listens, and what one request or connection may cost it."""

    # hide_input_in_errors: pydantic's own message must not show ssl_keyfile_password.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    host: str | None = DEFAULT_HOST
    """Interface the data port listens on (None: serve no HTTP, as Ray Serve does)."""
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """Port of the data port (0 picks a free one)."""
    root_path: str = ""
    """The ASGI root path, for serving behind a reverse proxy that strips it: requests
    arrive without it, and applications see it in the scope's ``root_path`` and ``path``."""
    request_timeout_s: float | None = Field(default=None, gt=0)
    """A request still running after this many seconds gets 408 (None: no limit)."""
    keep_alive_timeout_s: float = Field(default=DEFAULT_KEEP_ALIVE_TIMEOUT_S, gt=0)
    """An idle keep-alive connection is closed after this many seconds without a request."""
    ssl_keyfile: str | None = None
    """The private key (PEM) for HTTPS; given with ``ssl_certfile``, the data port speaks
    only HTTPS."""
    ssl_certfile: str | None = None
    """The certificate chain (PEM) for HTTPS, given with ``ssl_keyfile``."""
    ssl_keyfile_password: str | None = Field(default=None, repr=False)
    """The password of an encrypted ``ssl_keyfile``."""
    ssl_ca_certs: str | None = None
    """CA certificates (PEM): when given, clients must present a certificate they signed."""
    root_url: str = ""
    """The URL tandem reports for the proxy, e.g. that of a load balancer in front of it
    ("": the server's own address)."""
    location: ProxyLocation | None = None
    """Deprecated by Ray Serve: if set, it replaces ``proxy_location``."""
    middlewares: list[Any] = Field(default_factory=list)
    """Removed from Ray Serve: only an empty list is taken."""
    num_cpus: int = 0
    """Removed from Ray Serve: only 0 is taken."""
    access_log: bool = True
    """Log one line per request."""
    max_body_bytes: int | None = Field(default=DEFAULT_MAX_BODY_BYTES, ge=0)
    """A request body larger than this gets 413, before it is buffered (None: no limit)."""
    max_header_bytes: int = Field(default=DEFAULT_MAX_HEADER_BYTES, ge=MIN_MAX_HEADER_BYTES)
    """A request line and headers larger than this get 431 and the connection is closed."""
    header_timeout_s: float = Field(default=DEFAULT_HEADER_TIMEOUT_S, gt=0)
    """A request line and headers not complete this many seconds after the connection opens
    (or, on a kept-alive connection, after the request's first byte) get 408 and a close.
    Over HTTPS the TLS handshake must also finish within this time."""
    max_connections: int | None = Field(default=None, ge=1)
    """Open connections past this get 503 and are closed at once (None: derived from the
    process's open-file limit when the server starts, keeping a reserve for replicas)."""

    @property
    def tls(self) -> bool:
        """Whether the data port speaks HTTPS."""
        return self.ssl_certfile is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def proxy_location(self, requested: ProxyLocation | str | None) -> ProxyLocation:
        """Where proxies run, given ``proxy_location`` (None: not given): ``location``
        overrides it, as in Ray Serve, and no host means no proxy."""
        if self.host is None:
            return ProxyLocation.Disabled
        if self.location is not None:
            return self.location
        return ProxyLocation.EveryNode if requested is None else ProxyLocation.of(requested)

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value: str) -> str:
        if value in ("", "/"):
            return ""
        if not value.startswith("/") or not set(value) <= _ROOT_PATH_CHARS:
            raise ValueError(
                f"root_path must start with '/' and hold only printable ASCII without "
                f"spaces, '?', '#' or '%', e.g. '/serve'; got {value!r}"
            )
        # uvicorn puts it before every path as it is: "/serve/" would make "/serve//x".
        return value.rstrip("/")

    @field_validator(
        "ssl_keyfile", "ssl_certfile", "ssl_keyfile_password", "ssl_ca_certs", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # as Ray Serve reads them

    @field_validator("ssl_keyfile_password", mode="before")
    @classmethod
    def _password_is_text(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            # Says "got", so tandem's error message does not show the value either.
            raise ValueError(f"must be a string, got a {type(value).__name__}")
        return value

    @field_validator("location", mode="before")
    @classmethod
    def _location(cls, value: Any) -> Any:
        if value is None:
            return None
        warnings.warn(
            "http_options 'location' is deprecated (as in Ray Serve): pass proxy_location to "
            "tandem.start() or set proxy_location in the config file instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        return ProxyLocation.of(value)

    @field_validator("middlewares")
    @classmethod
    def _no_middlewares(cls, value: list[Any]) -> list[Any]:
        if value:
            raise ValueError(
                "proxy middlewares are not supported (Ray Serve removed them too): add the "
                "middleware to your FastAPI or Starlette app and serve it with @serve.ingress"
            )
        return value

    @field_validator("num_cpus")
    @classmethod
    def _no_num_cpus(cls, value: int) -> int:
        if value:
            raise ValueError(
                "num_cpus is not supported (Ray Serve removed it too): the proxy runs in the "
                "driver's process and reserves no CPUs; leave it out"
            )
        return value

    @model_validator(mode="after")
    def _key_and_certificate(self) -> HTTPOptions:
        # Both ways round: a key alone must not quietly serve plain HTTP.
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError(
                "ssl_keyfile and ssl_certfile must be given together to serve HTTPS "
                f"(got only {'ssl_keyfile' if self.ssl_keyfile else 'ssl_certfile'})"
            )
        if not self.tls:
            extra = [
                name for name in ("ssl_keyfile_password", "ssl_ca_certs") if getattr(self, name)
            ]
            if extra:
                raise ValueError(
                    f"{' and '.join(extra)} only apply to HTTPS: give ssl_keyfile and "
                    "ssl_certfile too, or leave them out"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, data: Any) -> Any:
        return known_names(data, cls.model_fields, "HTTP")


def known_names(data: Any, fields: Iterable[str], what: str) -> Any:
    """``data`` if it names only ``fields``; else a ValueError naming the unknown option
    and the likely intended one (not just pydantic's "extra input")."""
    if isinstance(data, dict):
        names = sorted(fields)
        for key in data:
            if key not in names:
                guess = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {guess[0]!r}? " if guess else ""
                raise ValueError(
                    f"unknown {what} option {key!r} ({hint}the options are {', '.join(names)})"
                )
    return data


# Direct ingress (http/direct.py): ingress replicas serve HTTP on the data port too.
DIRECT_INGRESS_ENV = "TANDEM_DIRECT_INGRESS"


def direct_ingress_enabled() -> bool:
    """Whether direct ingress was asked for (``TANDEM_DIRECT_INGRESS``; ``tandem run
    --direct-ingress`` sets it)."""
    value = os.environ.get(DIRECT_INGRESS_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{DIRECT_INGRESS_ENV}={value!r} is not a yes or no; set it to 1 or 0.")
