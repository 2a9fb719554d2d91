"""``BackpressureConfig``: what an HTTP client gets when a deployment sheds load
(its replicas and its callers' queues are full), with Ray Serve's names and defaults.

The proxy applies it (:mod:`tandem._private.http.proxy`) to requests its ingress
sheds; handle callers get ``BackPressureError`` whatever it says.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class BackpressureConfig(BaseModel):
    """The status code of a shed request (503 or 429) and an optional Retry-After."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status_code: Literal[503, 429] = 503
    """503 Service Unavailable (the default) or 429 Too Many Requests."""
    retry_after_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    """If set, shed responses carry ``Retry-After`` with this many seconds, rounded up."""
