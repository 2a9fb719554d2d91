"""``RequestRouterConfig``: which request router a deployment's callers use, with
Ray Serve's field names and defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_REQUEST_ROUTER = "tandem.request_router:PowerOfTwoChoicesRequestRouter"


class RequestRouterConfig(BaseModel):
    """How callers of a deployment pick the replica for each request."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    request_router_class: str | Callable[..., Any] = DEFAULT_REQUEST_ROUTER
    request_router_kwargs: dict[str, Any] = Field(default_factory=dict)
    request_routing_stats_period_s: float = Field(default=10.0, gt=0)
    request_routing_stats_timeout_s: float = Field(default=30.0, gt=0)
    initial_backoff_s: float = Field(default=0.025, gt=0)
    backoff_multiplier: float = Field(default=2.0, gt=0)
    max_backoff_s: float = Field(default=0.5, gt=0)
