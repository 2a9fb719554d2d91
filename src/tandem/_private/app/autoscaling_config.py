"""``AutoscalingConfig`` and ``AutoscalingPolicy``: when and how far a deployment
scales, and which function decides, with Ray Serve's field names, defaults and
checks. The controller's autoscaler applies them (``controller/autoscaling.py``).

A policy given by import path is only checked for its form here; the controller
imports it (this module may not import user code: the options models import it).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from enum import Enum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

# The built-in policy (scale on ongoing requests), as Ray Serve names it under tandem.
DEFAULT_POLICY_PATH = "tandem.autoscaling_policy:default_autoscaling_policy"
# Ray Serve's names of the built-in policies, which a config file written for it may hold.
RAY_POLICY_MODULE = "ray.serve.autoscaling_policy"

# Field names older Ray Serve releases read, which code and docs written for them
# still use. Ray Serve 2.60 drops them without a word (the target silently stays 2);
# tandem reads them as the field they became, with a DeprecationWarning naming it.
_RENAMED_FIELDS = {"target_num_ongoing_requests_per_replica": "target_ongoing_requests"}
_RENAMED_POLICY_FIELDS = {"name": "policy_function"}


def _map_renamed(data: Any, renamed: dict[str, str]) -> Any:
    if not isinstance(data, dict) or not any(old in data for old in renamed):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        if new in data:
            raise ValueError(f"{old!r} is the old name of {new!r}; give only {new!r}")
        warnings.warn(
            f"{old!r} is the old name of {new!r}; write {new!r} (read as it here).",
            DeprecationWarning,
            stacklevel=2,
        )
        data[new] = data.pop(old)
    return data


def import_path_of(fn: Callable[..., Any]) -> str:
    """``module:qualified_name`` of a function or class (how a config file names it)."""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}:{name}"


class AggregationFunction(str, Enum):
    """How samples over ``look_back_period_s`` become one number (Ray Serve's enum)."""

    MEAN = "mean"  # the time-weighted average
    MAX = "max"  # the peak
    MIN = "min"  # the trough


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingPolicy(_Strict):
    """Which function decides a deployment's (or an application's) replica count.

    ``policy_function`` is a callable or an import path (``module:name``): a
    function ``(ctx) -> (target_replicas, policy_state)``, or a class that the
    controller makes once with ``policy_kwargs`` and then calls like that function.
    """

    policy_function: str | Callable[..., Any] = DEFAULT_POLICY_PATH
    policy_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return _map_renamed(data, _RENAMED_POLICY_FIELDS)

    @field_validator("policy_function", mode="before")
    @classmethod
    def _function(cls, value: Any) -> Any:
        if isinstance(value, str):
            module, colon, attr = value.partition(":")
            if not colon:
                module, _, attr = value.rpartition(".")
            if not module or not attr:
                raise ValueError(
                    f"must be a callable or an import path like 'module:function', got {value!r}"
                )
            return value
        if not callable(value):
            raise ValueError(
                "must be a callable or an import path like 'module:function', "
                f"got {type(value).__name__}"
            )
        return value

    @field_validator("policy_kwargs")
    @classmethod
    def _json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be JSON-serializable ({exc})") from None
        return value

    @field_serializer("policy_function")
    def _as_path(self, value: str | Callable[..., Any]) -> str:
        return value if isinstance(value, str) else import_path_of(value)

    def __hash__(self) -> int:
        return hash((self._as_path(self.policy_function), json.dumps(self.policy_kwargs)))

    def is_default_policy_function(self) -> bool:
        return self.policy_function == DEFAULT_POLICY_PATH

    @property
    def label(self) -> str:
        """How logs and status name the policy."""
        return self._as_path(self.policy_function)


class AutoscalingConfig(_Strict):
    """When and how far to scale a deployment (the names and defaults of Ray Serve)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    metrics_interval_s: float = Field(default=10.0, gt=0)
    look_back_period_s: float = Field(default=30.0, gt=0)
    smoothing_factor: float = Field(default=1.0, gt=0)
    upscale_smoothing_factor: float | None = Field(default=None, gt=0)
    downscale_smoothing_factor: float | None = Field(default=None, gt=0)
    upscaling_factor: float | None = Field(default=None, gt=0)
    downscaling_factor: float | None = Field(default=None, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    # The wait before going from one replica to none (None: downscale_delay_s).
    downscale_to_zero_delay_s: float | None = Field(default=None, ge=0)
    aggregation_function: AggregationFunction = AggregationFunction.MEAN
    policy: AutoscalingPolicy = Field(default_factory=AutoscalingPolicy)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return _map_renamed(data, _RENAMED_FIELDS)

    @field_validator("aggregation_function", mode="before")
    @classmethod
    def _aggregation(cls, value: Any) -> Any:
        if isinstance(value, AggregationFunction):
            return value
        try:
            return AggregationFunction(str(value).lower())
        except ValueError:
            choices = ", ".join(repr(f.value) for f in AggregationFunction)
            raise ValueError(f"must be one of {choices}, got {value!r}") from None

    @field_serializer("aggregation_function")
    def _aggregation_name(self, value: AggregationFunction) -> str:
        return value.value  # a plain string, so dumps write YAML and JSON

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed "
                f"max_replicas ({self.max_replicas})"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                f"({self.min_replicas}) and max_replicas ({self.max_replicas})"
            )
        if self.look_back_period_s <= self.metrics_interval_s:
            # Ray Serve warns (and says it will refuse this later): a window no longer
            # than the interval between samples holds too few of them to decide on.
            warnings.warn(
                f"look_back_period_s ({self.look_back_period_s:g}) should be greater than "
                f"metrics_interval_s ({self.metrics_interval_s:g}); Ray Serve will refuse "
                "this in a future release.",
                FutureWarning,
                stacklevel=2,
            )
        return self

    @classmethod
    def default(cls) -> AutoscalingConfig:
        """The configuration ``num_replicas="auto"`` stands for (Ray Serve's name)."""
        return cls(min_replicas=1, max_replicas=100, target_ongoing_requests=2.0)

    @classmethod
    def for_auto(cls) -> AutoscalingConfig:
        return cls.default()

    def get_upscaling_factor(self) -> float:
        return self.upscaling_factor or self.upscale_smoothing_factor or self.smoothing_factor

    def get_downscaling_factor(self) -> float:
        return self.downscaling_factor or self.downscale_smoothing_factor or self.smoothing_factor

    def get_target_ongoing_requests(self) -> float:
        return self.target_ongoing_requests
