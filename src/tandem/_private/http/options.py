"""HTTP options (Ray Serve's ``http_options``), validated once at the edge."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class HTTPOptions(BaseModel):
    """Where the proxy listens and how long a request may take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    root_path: str = ""
    request_timeout_s: float | None = Field(default=None, gt=0)
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)
    access_log: bool = True
    # Largest request body; past it 413 (set by the lead engineer for the proxy's check).
    max_body_bytes: int | None = Field(default=100 * 1024 * 1024, ge=0)
