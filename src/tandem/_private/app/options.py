"""Deployment options: validated once, at decoration or ``.options()`` time.

The models here are the single source of truth for option names, defaults and
limits; the decorator, ``.options()`` and (later) config files all go through
:func:`validate_options`, so a bad value is reported the same way everywhere.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tandem._private.app.autoscaling_config import AutoscalingConfig
from tandem._private.app.backpressure import BackpressureConfig
from tandem._private.app.logging_config import LoggingConfig
from tandem._private.app.placement import (
    MAX_REPLICAS_PER_NODE_LIMIT,
    PlacementStrategy,
    check_bundles,
    check_placement,
)
from tandem._private.app.request_router_config import RequestRouterConfig

DEFAULT_MAX_ONGOING_REQUESTS = 5
DEFAULT_MAX_QUEUED_REQUESTS = -1
DEFAULT_HEALTH_CHECK_PERIOD_S = 10.0
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 30.0
DEFAULT_GRACEFUL_SHUTDOWN_WAIT_LOOP_S = 2.0
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActorOptions(_Strict):
    """``ray_actor_options``: what one replica asks of the machine or cluster."""

    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)
    memory: float | None = Field(default=None, ge=0)
    object_store_memory: float | None = Field(default=None, ge=0)
    resources: dict[str, float] | None = None
    accelerator_type: str | None = None
    runtime_env: dict[str, Any] | None = None

    @field_validator("runtime_env")
    @classmethod
    def _env_vars_are_strings(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        env_vars = (value or {}).get("env_vars")
        if env_vars is None:
            return value
        if not isinstance(env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
        ):
            raise ValueError(
                f"env_vars must map names to strings (quote numbers), got {env_vars!r}"
            )
        return value

    @field_validator("resources")
    @classmethod
    def _non_negative(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, amount in (value or {}).items():
            if amount < 0:
                raise ValueError(f"resource {key!r} must not be negative, got {amount}")
        return value


def _check_num_replicas(value: Any) -> Any:
    # Before pydantic's own checks, so 0, True, 2.5 or "2" get one clear message.
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)  # 2.0 is two replicas, as Ray Serve's own model takes it
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be an integer >= 1 or 'auto', got {value!r}")
    return value


# A fixed replica count, "auto" (autoscaling with default settings), or not set;
# the decorator, .options() and config files all take it this way.
NumReplicas = Annotated[int | Literal["auto"] | None, BeforeValidator(_check_num_replicas)]


def fill_auto(data: Any) -> Any:
    """Options (a dict) where ``num_replicas="auto"`` comes with an ``autoscaling_config``:
    the config's fields lie over those "auto" stands for (AutoscalingConfig.default()).

    As in Ray Serve, ``num_replicas="auto", autoscaling_config={"min_replicas": 2}``
    scales between 2 and the default maximum of 100; the fields given win.
    """
    if not isinstance(data, dict) or not _is_auto(data.get("num_replicas")):
        return data
    given = data.get("autoscaling_config")
    if isinstance(given, AutoscalingConfig):
        given = {name: getattr(given, name) for name in given.model_fields_set}
    if not isinstance(given, dict):
        return data  # None: "auto" alone; anything else: pydantic says what is wrong
    auto = AutoscalingConfig.default()
    filled = {name: getattr(auto, name) for name in auto.model_fields_set}
    return {**data, "autoscaling_config": {**filled, **given}}


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


class DeploymentOptions(_Strict):
    """Every option ``@deployment`` and ``.options()`` accept."""

    name: str | None = Field(default=None, min_length=1)
    version: str | None = None
    num_replicas: NumReplicas = None
    max_ongoing_requests: int = Field(default=DEFAULT_MAX_ONGOING_REQUESTS, ge=1)
    max_queued_requests: int = Field(default=DEFAULT_MAX_QUEUED_REQUESTS, ge=-1)
    autoscaling_config: AutoscalingConfig | None = None
    user_config: Any = None
    ray_actor_options: ActorOptions | None = None
    placement_group_bundles: Annotated[
        list[dict[str, float]] | None, BeforeValidator(check_bundles)
    ] = None
    placement_group_strategy: PlacementStrategy | None = None
    max_replicas_per_node: int | None = Field(
        default=None, ge=1, le=MAX_REPLICAS_PER_NODE_LIMIT, strict=True
    )
    health_check_period_s: float = Field(default=DEFAULT_HEALTH_CHECK_PERIOD_S, gt=0)
    health_check_timeout_s: float = Field(default=DEFAULT_HEALTH_CHECK_TIMEOUT_S, gt=0)
    graceful_shutdown_wait_loop_s: float = Field(
        default=DEFAULT_GRACEFUL_SHUTDOWN_WAIT_LOOP_S, ge=0
    )
    graceful_shutdown_timeout_s: float = Field(default=DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S, ge=0)
    logging_config: LoggingConfig | None = None
    request_router_config: RequestRouterConfig | None = None
    backpressure_config: BackpressureConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _auto_fills_autoscaling(cls, data: Any) -> Any:
        return fill_auto(data)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and ("#" in value or "/" in value):
            raise ValueError(f"must not contain '#' or '/', got {value!r}")
        return value

    @field_validator("user_config")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if value is None:
            return value
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be JSON-serializable ({exc})") from None
        return value

    @field_validator(
        "health_check_period_s",
        "health_check_timeout_s",
        "graceful_shutdown_wait_loop_s",
        "graceful_shutdown_timeout_s",
    )
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number of seconds, got {value!r}")
        return value

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> DeploymentOptions:
        if isinstance(self.num_replicas, int) and self.autoscaling_config is not None:
            raise ValueError(
                "num_replicas and autoscaling_config cannot both be set; "
                "use num_replicas='auto' or leave num_replicas out"
            )
        return self

    @model_validator(mode="after")
    def _placement(self) -> DeploymentOptions:
        actor = self.ray_actor_options
        check_placement(
            self.placement_group_bundles,
            self.placement_group_strategy,
            self.max_replicas_per_node,
            actor.model_dump(exclude_none=True) if actor is not None else {},
        )
        return self

    # -- derived -----------------------------------------------------------

    @property
    def autoscaling(self) -> AutoscalingConfig | None:
        if self.autoscaling_config is not None:
            return self.autoscaling_config
        if self.num_replicas == "auto":
            return AutoscalingConfig.for_auto()
        return None

    def initial_replicas(self) -> int:
        """How many replicas a deployment starts with."""
        auto = self.autoscaling
        if auto is None:
            return self.num_replicas if isinstance(self.num_replicas, int) else 1
        if auto.initial_replicas is not None:
            return auto.initial_replicas
        return auto.min_replicas

    def set_options(self) -> dict[str, Any]:
        """The options the user gave explicitly, as plain values."""
        return {key: getattr(self, key) for key in self.model_fields_set}


OPTION_NAMES = frozenset(DeploymentOptions.model_fields)
_REQUEST_ROUTER_FIELDS = frozenset(RequestRouterConfig.model_fields)


def validate_options(
    options: dict[str, Any], *, base: DeploymentOptions | None = None, owner: str = "deployment"
) -> DeploymentOptions:
    """Merge ``options`` over ``base`` and validate; raise ValueError naming the bad option."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if "route_prefix" in unknown:  # a deployment option in old Ray Serve versions
        raise ValueError(
            f"route_prefix is not an option of {owner}: a route prefix belongs to the "
            "application. Pass it to serve.run(app, route_prefix=...), or set route_prefix "
            "on the application in a config file."
        )
    routing = [name for name in unknown if name in _REQUEST_ROUTER_FIELDS]
    if routing:  # the request router's settings, given at the top level
        raise ValueError(
            f"{routing[0]} is not an option of {owner} itself: it belongs in "
            f"request_router_config, e.g. request_router_config=RequestRouterConfig("
            f"{routing[0]}=...) (from tandem.config import RequestRouterConfig)."
        )
    if unknown:
        raise ValueError(
            f"Unknown option {unknown[0]!r} for {owner}; valid options are: "
            + ", ".join(sorted(OPTION_NAMES))
            + "."
        )
    merged = dict(base.set_options()) if base is not None else {}
    merged.update(options)
    try:
        return DeploymentOptions.model_validate(merged)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, owner)) from None


def describe_validation_error(exc: ValidationError, owner: str, prefix: str = "") -> str:
    """One readable line per problem: which option (under ``prefix``, e.g.
    ``"logging_config."``), what was wrong, what was given."""
    lines = []
    for where, what, given in validation_problems(exc):
        if where:
            where = prefix + where
            shown = "" if "got " in what else f" (got {given!r})"
            lines.append(f"Invalid option {where!r} for {owner}: {what}{shown}.")
        else:
            lines.append(f"Invalid options for {owner}: {what}.")
    return " ".join(dict.fromkeys(lines))


def validation_problems(exc: ValidationError) -> list[tuple[str, str, Any]]:
    """(where, what, given) for each problem pydantic found: the field's path as
    ``a.b[0].c``, the message without pydantic's "Value error, ", and the value given.

    Every message tandem makes from a pydantic error (options, config files, builder
    arguments) reads its problems from here, so they name fields the same way.
    """
    problems = []
    for error in exc.errors():
        where = ""
        for part in error["loc"]:
            if isinstance(part, int):
                where += f"[{part}]"
            elif not part.startswith("function-"):  # a validator's name, not a field
                where += f".{part}"
        what = error["msg"].removeprefix("Value error, ")
        problems.append((where.lstrip("."), what, error.get("input")))
    return problems


def logging_config_of(value: Any, owner: str) -> LoggingConfig | None:
    """``value`` (None, a LoggingConfig or a dict of its fields) as a LoggingConfig;
    ValueError naming ``owner`` if it is not one."""
    if value is None or isinstance(value, LoggingConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(
            f"logging_config of {owner} must be a LoggingConfig or a dict of its fields, "
            f"got {type(value).__name__}."
        )
    try:
        return LoggingConfig.model_validate(value)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, owner, "logging_config.")) from None
