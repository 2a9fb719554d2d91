"""HTTP options (Ray Serve's ``http_options``), validated once at the edge.

The limits among them have safe defaults (named below) and are enforced on the
data port: header size, header time, idle time and open connections by
:mod:`tandem._private.http.limits`, body size by the proxy.
"""

from __future__ import annotations

import difflib
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


class HTTPOptions(BaseModel):
    """Where the proxy listens, and what one request or connection may cost it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = DEFAULT_HOST
    """Interface the data port listens on."""
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """Port of the data port (0 picks a free one)."""
    root_path: str = ""
    """Ray Serve's ``root_path``: only "" (serving at the server's root) for now."""
    request_timeout_s: float | None = Field(default=None, gt=0)
    """A request still running after this many seconds gets 408 (None: no limit)."""
    keep_alive_timeout_s: float = Field(default=DEFAULT_KEEP_ALIVE_TIMEOUT_S, gt=0)
    """An idle keep-alive connection is closed after this many seconds without a request."""
    access_log: bool = True
    """Log one line per request."""
    max_body_bytes: int | None = Field(default=DEFAULT_MAX_BODY_BYTES, ge=0)
    """A request body larger than this gets 413, before it is buffered (None: no limit)."""
    max_header_bytes: int = Field(default=DEFAULT_MAX_HEADER_BYTES, ge=MIN_MAX_HEADER_BYTES)
    """A request line and headers larger than this get 431 and the connection is closed."""
    header_timeout_s: float = Field(default=DEFAULT_HEADER_TIMEOUT_S, gt=0)
    """A request line and headers not complete this many seconds after the connection opens
    (or, on a kept-alive connection, after the request's first byte) get 408 and a close."""
    max_connections: int | None = Field(default=None, ge=1)
    """Open connections past this get 503 and are closed at once (None: derived from the
    process's open-file limit when the server starts, keeping a reserve for replicas)."""

    @field_validator("root_path")
    @classmethod
    def _no_root_path(cls, value: str) -> str:
        if value not in ("", "/"):
            raise ValueError(
                f"root_path {value!r} is not supported yet: serve at the server's root and "
                "let a reverse proxy in front strip the prefix, or put it in each "
                "application's route_prefix"
            )
        return ""

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, data: Any) -> Any:
        """Name an unknown option and the likely intended one, not just "extra input"."""
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    names = sorted(cls.model_fields)
                    guess = difflib.get_close_matches(str(key), names, n=1)
                    hint = f"did you mean {guess[0]!r}? " if guess else ""
                    raise ValueError(
                        f"unknown HTTP option {key!r} ({hint}the options are {', '.join(names)})"
                    )
        return data
