"""``RequestRouterConfig``: which request router a deployment's callers use, with
Ray Serve's field names and defaults.

As in Ray Serve, the class is resolved when the config is made (an import path
is imported then), so a wrong one is reported at ``@deployment`` time.
:meth:`RequestRouterConfig.router_spec` is what the controller publishes to
every caller; the default router publishes none (routers use their built-in
policy). ``record_routing_stats`` is called on every replica that defines it,
every ``request_routing_stats_period_s`` (``replica/routing_stats.py``).
``initial_backoff_s``, ``backoff_multiplier`` and ``max_backoff_s`` pace a
custom router's rounds when no replica it ranked has room (a freed slot or a
replica change ends the wait early); the built-in policy never polls: a waiting
request is handed the first slot that frees up.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from tandem._private.calls.custom_routing import RouterSpec, load_router_class
from tandem._private.calls.request_routers import RequestRouter
from tandem._private.calls.routing_mixins import PowerOfTwoChoicesRequestRouter

DEFAULT_REQUEST_ROUTER = "tandem.request_router:PowerOfTwoChoicesRequestRouter"
DEFAULT_ROUTING_STATS_PERIOD_S = 10.0
DEFAULT_ROUTING_STATS_TIMEOUT_S = 30.0


class RequestRouterConfig(BaseModel):
    """How callers of a deployment pick the replica for each request."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    request_router_class: str | Callable[..., Any] = DEFAULT_REQUEST_ROUTER
    request_router_kwargs: dict[str, Any] = Field(default_factory=dict)
    request_routing_stats_period_s: float = Field(default=DEFAULT_ROUTING_STATS_PERIOD_S, gt=0)
    request_routing_stats_timeout_s: float = Field(default=DEFAULT_ROUTING_STATS_TIMEOUT_S, gt=0)
    initial_backoff_s: float = Field(default=0.025, gt=0)
    backoff_multiplier: float = Field(default=2.0, gt=0)
    max_backoff_s: float = Field(default=0.5, gt=0)

    # Only the published form is kept: replicas that unpickle the deployment's options
    # need not import the router's module.
    _spec: RouterSpec | None = PrivateAttr(default=None)

    @field_validator("request_router_class")
    @classmethod
    def _importable_router(cls, value: Any) -> Any:
        load_router_class(value)  # ValueError: not a RequestRouter, or not importable
        return value

    @field_validator("request_router_kwargs")
    @classmethod
    def _json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be JSON-serializable ({exc})") from None
        return value

    def model_post_init(self, context: Any) -> None:
        router_class = load_router_class(self.request_router_class)
        if router_class is PowerOfTwoChoicesRequestRouter:
            return  # callers use their built-in policy, which is this one
        try:
            self._spec = RouterSpec.of(
                router_class,
                self.request_router_kwargs,
                self.initial_backoff_s,
                self.backoff_multiplier,
                self.max_backoff_s,
            )
        except Exception as exc:
            raise ValueError(
                f"request_router_class {router_class.__qualname__} cannot be sent to the "
                f"processes that route requests ({type(exc).__name__}: {exc}); define it at "
                "the top level of a module."
            ) from exc

    @property
    def router_class(self) -> type[RequestRouter]:
        return PowerOfTwoChoicesRequestRouter if self._spec is None else self._spec.load()

    def router_spec(self) -> RouterSpec | None:
        """What callers route with; None for the default router (their built-in policy)."""
        return self._spec
