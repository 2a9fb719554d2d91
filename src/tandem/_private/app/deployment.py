"""Deployments and applications: the graph a user builds with ``bind``.

Pure data. Nothing here starts a replica or touches the network; ``run`` hands
an :class:`Application` to the controller, which does that.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from tandem._private.app.options import DeploymentOptions, validate_options

T = TypeVar("T")


class Deployment(Generic[T]):
    """A class or function with its deployment options; ``bind`` it to build an application."""

    def __init__(self, func_or_class: T, options: DeploymentOptions) -> None:
        if not (
            inspect.isclass(func_or_class)
            or inspect.isfunction(func_or_class)
            or inspect.ismethod(func_or_class)
            or callable(func_or_class)
        ):
            raise TypeError(
                f"@deployment takes a class or a function, got {type(func_or_class).__name__}."
            )
        self._target = func_or_class
        self._options = options

    # -- introspection -----------------------------------------------------

    @property
    def name(self) -> str:
        return str(
            self._options.name or getattr(self._target, "__name__", type(self._target).__name__)
        )

    @property
    def func_or_class(self) -> T:
        return self._target

    @property
    def deployment_options(self) -> DeploymentOptions:
        return self._options

    @property
    def num_replicas(self) -> int | str | None:
        return self._options.num_replicas

    @property
    def max_ongoing_requests(self) -> int:
        return self._options.max_ongoing_requests

    @property
    def max_queued_requests(self) -> int:
        return self._options.max_queued_requests

    @property
    def user_config(self) -> Any:
        return self._options.user_config

    @property
    def ray_actor_options(self) -> dict[str, Any] | None:
        opts = self._options.ray_actor_options
        return None if opts is None else opts.model_dump(exclude_none=True)

    # -- building ----------------------------------------------------------

    def options(self, **options: Any) -> Deployment[T]:
        """A copy of this deployment with some options changed."""
        owner = f"deployment {self.name!r}"
        return Deployment(self._target, validate_options(options, base=self._options, owner=owner))

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """An application node: this deployment with its constructor arguments."""
        return Application(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"Deployment {self.name!r} cannot be called directly; use "
            f"{self.name}.bind(...) to build an application and tandem.run() to start it."
        )

    def __repr__(self) -> str:
        return f"Deployment(name={self.name!r})"


class Application:
    """A bound deployment: a node of the application graph.

    A node found in another node's constructor arguments (at the top level or
    inside lists, tuples and dicts) becomes a ``DeploymentHandle`` when the
    application runs. The same node bound into several parents is one deployment.
    """

    def __init__(self, deployment: Deployment[Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self._deployment = deployment
        self._args = args
        self._kwargs = kwargs

    @property
    def deployment(self) -> Deployment[Any]:
        return self._deployment

    @property
    def args(self) -> tuple[Any, ...]:
        return self._args

    @property
    def kwargs(self) -> dict[str, Any]:
        return self._kwargs

    def __repr__(self) -> str:
        return f"Application({self._deployment.name!r})"


@overload
def deployment(_func_or_class: T) -> Deployment[T]: ...


@overload
def deployment(_func_or_class: None = None, **options: Any) -> Callable[[T], Deployment[T]]: ...


def deployment(_func_or_class: Any = None, **options: Any) -> Any:
    """Turn a class or function into a :class:`Deployment`.

    Used bare (``@deployment``) or with options (``@deployment(num_replicas=2)``);
    the options are Ray Serve's: ``name``, ``num_replicas``, ``max_ongoing_requests``,
    ``max_queued_requests``, ``autoscaling_config``, ``user_config``,
    ``ray_actor_options``, ``placement_group_bundles``, ``placement_group_strategy``,
    ``max_replicas_per_node`` (these three only apply on the ray backend),
    ``health_check_period_s``, ``health_check_timeout_s``,
    ``graceful_shutdown_wait_loop_s``, ``graceful_shutdown_timeout_s``, ``logging_config``
    (a dict or a :class:`LoggingConfig`).
    """

    if _func_or_class is not None:
        target = _func_or_class
        owner = f"deployment {options.get('name') or getattr(target, '__name__', '?')!r}"
        return Deployment(target, validate_options(options, owner=owner))
    # Validate once, now, so a bad option fails at the decorator line.
    validated = validate_options(options, owner=f"deployment {options.get('name') or '?'!r}")

    def wrap(target: Any) -> Deployment[Any]:
        return Deployment(target, validated)

    return wrap
