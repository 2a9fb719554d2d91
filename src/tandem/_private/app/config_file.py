"""Config files in Ray Serve's schema, validated with pydantic.

A file names applications by import path, with builder ``args`` and
per-deployment overrides; :func:`load_config` reads and validates one, and
:func:`build_applications` imports and builds every application before
anything is deployed, so a bad file changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tandem._private.app.autoscaling_config import AutoscalingConfig, AutoscalingPolicy
from tandem._private.app.backpressure import BackpressureConfig
from tandem._private.app.deployment import Application, Deployment
from tandem._private.app.external_scaler import autoscaled, check_external_scaler
from tandem._private.app.graph import build_application, map_arguments
from tandem._private.app.importing import build_app, import_attribute
from tandem._private.app.logging_config import LoggingConfig
from tandem._private.app.options import (
    ActorOptions,
    NumReplicas,
    fill_auto,
    validate_options,
    validation_problems,
)
from tandem._private.app.policy_import import check_policies, policies_of
from tandem._private.app.routes import normalize_route_prefix, prefix_owner
from tandem._private.grpc.options import gRPCOptions
from tandem._private.http.options import HTTPOptions


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeploymentOverride(_Model):
    """Options that replace those in the code, for one deployment (by name)."""

    name: str = Field(min_length=1)
    num_replicas: NumReplicas = None
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    max_queued_requests: int | None = Field(default=None, ge=-1)
    backpressure_config: BackpressureConfig | None = None
    user_config: Any = None
    autoscaling_config: AutoscalingConfig | None = None
    ray_actor_options: ActorOptions | None = None
    health_check_period_s: float | None = Field(default=None, gt=0)
    health_check_timeout_s: float | None = Field(default=None, gt=0)
    graceful_shutdown_wait_loop_s: float | None = Field(default=None, ge=0)
    graceful_shutdown_timeout_s: float | None = Field(default=None, ge=0)
    logging_config: dict[str, Any] | None = None
    request_router_config: dict[str, Any] | None = None
    placement_group_bundles: list[dict[str, float]] | None = None
    placement_group_strategy: str | None = None
    max_replicas_per_node: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _auto_fills_autoscaling(cls, data: Any) -> Any:
        return fill_auto(data)

    def autoscales(self) -> bool:
        """Whether this override turns autoscaling on (Ray Serve's is_autoscaling_configured)."""
        return self.num_replicas == "auto" or self.autoscaling_config is not None

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.model_fields_set if k != "name"}


class ApplicationConfig(_Model):
    name: str = Field(default="default", min_length=1)
    route_prefix: str | None = "/"
    import_path: str = Field(min_length=1)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    args: dict[str, Any] = Field(default_factory=dict)
    deployments: list[DeploymentOverride] = Field(default_factory=list)
    logging_config: LoggingConfig | None = None
    """The application's deployments that set no logging_config of their own take this."""
    external_scaler_enabled: bool = False
    """Replica counts are set from outside, through the control endpoint's scale request;
    then no deployment of the application may autoscale."""
    autoscaling_policy: AutoscalingPolicy | None = None
    """An application-level policy: it decides for all the autoscaled deployments at once."""

    @model_validator(mode="after")
    def _unique_deployments(self) -> ApplicationConfig:
        names = [d.name for d in self.deployments]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"deployment {name!r} is listed twice")
        # The overrides now; what the code sets is checked once it is imported.
        check_external_scaler(
            self.name,
            self.external_scaler_enabled,
            [d.name for d in self.deployments if d.autoscales()],
        )
        # Here, not at deploy time, so a bad prefix fails the whole file before anything runs.
        self.route_prefix = normalize_route_prefix(self.route_prefix)
        return self


class ServeConfig(_Model):
    """A whole config file."""

    proxy_location: Literal["Disabled", "HeadOnly", "EveryNode"] = "EveryNode"
    http_options: HTTPOptions = Field(default_factory=HTTPOptions)
    grpc_options: gRPCOptions = Field(default_factory=gRPCOptions)
    """The gRPC proxy (Ray Serve's gRPCOptionsSchema); servicer functions are imported
    when the file is served, not when it is read."""
    logging_config: LoggingConfig | None = None
    """The default of every application that sets no logging_config of its own."""
    target_capacity: float | None = None
    """Ray Serve's gradual-rollout knob; tandem has none yet, so it must be left out."""
    applications: list[ApplicationConfig] = Field(min_length=1)

    @field_validator("target_capacity")
    @classmethod
    def _no_target_capacity(cls, value: float | None) -> float | None:
        if value is not None:
            raise ValueError(
                "tandem does not support target_capacity yet; leave it out (every "
                "deployment runs at its full num_replicas or autoscaling range)"
            )
        return value

    def app_logging(self, app: ApplicationConfig) -> LoggingConfig | None:
        """The logging_config an application's deployments default to."""
        return app.logging_config or self.logging_config

    @model_validator(mode="after")
    def _unique_apps(self) -> ServeConfig:
        for index, app in enumerate(self.applications):
            earlier = self.applications[:index]
            if any(other.name == app.name for other in earlier):
                raise ValueError(f"application name {app.name!r} is used twice")
            owner = prefix_owner(
                app.route_prefix, app.name, ((a.name, a.route_prefix) for a in earlier)
            )
            if owner is not None:
                raise ValueError(
                    f"route_prefix {app.route_prefix!r} is used by both {owner!r} and {app.name!r}"
                )
        return self


def validate_config(data: Any, source: str = "config") -> ServeConfig:
    """Validate parsed config data; ValueError lists each bad field with its path."""
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"  {where or '(top level)'}: {what}" for where, what, _ in validation_problems(exc)
        ]
        raise ValueError(f"Invalid {source}:\n" + "\n".join(problems)) from None


def load_config(path: str | Path) -> ServeConfig:
    """Read and validate a YAML or JSON config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"Cannot read config file {str(path)!r}: {exc.strerror}.") from None
    try:
        data = yaml.safe_load(text) if path.suffix != ".json" else json.loads(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"Config file {str(path)!r} is not valid YAML/JSON: {exc}") from None
    return validate_config(data, f"config file {str(path)!r}")


def is_config_path(target: str) -> bool:
    return target.endswith((".yaml", ".yml", ".json"))


def build_applications(
    config: ServeConfig, reload: bool = False
) -> list[tuple[ApplicationConfig, Application]]:
    """Import and build every application of ``config``, with its overrides applied."""
    built = []
    for index, app_config in enumerate(config.applications):
        target = import_attribute(app_config.import_path, reload=reload)
        app = build_app(target, app_config.args, app_config.import_path)
        overrides = {d.name: d.options() for d in app_config.deployments}
        try:
            app = apply_overrides(app, overrides, app_config.name, app_config.runtime_env)
            # Every autoscaling policy is found now, so a bad one fails the whole file.
            spec = build_application(app, app_config.name, None)
            check_external_scaler(
                spec.name,
                app_config.external_scaler_enabled,
                autoscaled((d.name, d.options) for d in spec.deployments),
            )
            whole = app_config.autoscaling_policy
            check_policies(
                [*policies_of(spec), *([(f"application {spec.name!r}", whole)] if whole else [])],
                reload=reload,
            )
            built.append((app_config, app))
        except ValueError as exc:
            raise ValueError(f"applications[{index}] ({app_config.name!r}): {exc}") from None
    return built


def apply_overrides(
    root: Application,
    overrides: dict[str, dict[str, Any]],
    app_name: str,
    runtime_env: dict[str, Any] | None = None,
) -> Application:
    """A copy of the graph under ``root`` where named deployments get new options,
    and every deployment inherits the application's ``runtime_env``."""
    if not overrides and not runtime_env:
        return root
    found: set[str] = set()
    copies: dict[int, Application] = {}

    def copy(value: Any) -> Any:
        if isinstance(value, Application):
            if id(value) not in copies:
                deployment = value.deployment
                if deployment.name in overrides:
                    found.add(deployment.name)
                    deployment = _with_overrides(deployment, overrides[deployment.name])
                if runtime_env:
                    deployment = _with_runtime_env(deployment, runtime_env)
                copies[id(value)] = deployment.bind(
                    *map_arguments(value.args, copy), **map_arguments(value.kwargs, copy)
                )
            return copies[id(value)]
        return value

    result = copy(root)
    missing = sorted(set(overrides) - found)
    if missing:
        raise ValueError(
            f"Application {app_name!r} has no deployment named {missing[0]!r} "
            "(the config file overrides it)."
        )
    return result  # type: ignore[no-any-return]


def _with_overrides(deployment: Deployment[Any], overrides: dict[str, Any]) -> Deployment[Any]:
    """The deployment with config-file options laid over the code's.

    A file that sets num_replicas drops the code's autoscaling_config, and the
    other way round, as a user editing the file would expect.
    """
    options = deployment.deployment_options.set_options()
    if isinstance(overrides.get("num_replicas"), int):
        options.pop("autoscaling_config", None)
    autoscaled = overrides.get("autoscaling_config") is not None
    if (autoscaled or overrides.get("num_replicas") == "auto") and isinstance(
        options.get("num_replicas"), int
    ):
        options.pop("num_replicas")
    options.update(overrides)
    return Deployment(
        deployment.func_or_class,
        validate_options(options, owner=f"deployment {deployment.name!r}"),
    )


def _with_runtime_env(deployment: Deployment[Any], runtime_env: dict[str, Any]) -> Deployment[Any]:
    """The deployment with its application's runtime_env under its own.

    The deployment's own fields win; ``env_vars`` are merged name by name.
    """
    options = deployment.deployment_options.set_options()
    current = options.get("ray_actor_options")
    actor = current.model_dump(exclude_unset=True) if current is not None else {}
    own = dict(actor.get("runtime_env") or {})
    merged = {**runtime_env, **own}
    if "env_vars" in runtime_env and "env_vars" in own:
        merged["env_vars"] = {**runtime_env["env_vars"], **own["env_vars"]}
    actor["runtime_env"] = merged
    options["ray_actor_options"] = actor
    return Deployment(
        deployment.func_or_class,
        validate_options(options, owner=f"deployment {deployment.name!r}"),
    )
