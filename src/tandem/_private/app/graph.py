"""From a bound :class:`Application` to the list of deployments to run.

Walks the graph once: each node (by identity) becomes one deployment, nested
nodes in constructor arguments become handles, and name clashes are reported.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tandem._private.app.deployment import Application, Deployment
from tandem._private.app.logging_config import LoggingConfig
from tandem._private.app.options import DeploymentOptions
from tandem._private.app.spec import ApplicationSpec, DeploymentSpec
from tandem.handle import DeploymentHandle


def code_version(target: Any) -> tuple[str, ...] | None:
    """Names a class or function by its module, qualified name and source file's content.

    A module imported again (``tandem deploy``, ``--reload``) makes new class
    objects; if its file did not change, the code did not either, and running
    replicas can stay.
    """
    try:
        path = inspect.getsourcefile(target)
        if path is None:
            return None
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except (OSError, TypeError):
        return None
    return (str(target.__module__), str(target.__qualname__), digest)


def map_arguments(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` with ``leaf`` applied to all it holds, looking inside lists, tuples and dicts.

    These are the containers in which nested application nodes are found in bind()
    arguments (a named tuple counts as one value, like any other object); building
    the graph and overriding its options both walk arguments this way.
    """
    if isinstance(value, list):
        return [map_arguments(v, leaf) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(map_arguments(v, leaf) for v in value)
    if isinstance(value, dict):
        return {k: map_arguments(v, leaf) for k, v in value.items()}
    return leaf(value)


def build_application(
    root: Application,
    app_name: str,
    route_prefix: str | None,
    logging_config: LoggingConfig | None = None,
) -> ApplicationSpec:
    """Flatten the graph under ``root`` into deployment specs (see the module docstring).

    ``logging_config`` is the application's: deployments without one of their own
    take it (as Ray Serve's ``serve.run(logging_config=...)``).
    """
    if not isinstance(root, Application):
        raise TypeError(
            f"Expected an application (the result of Deployment.bind()), got {type(root).__name__}."
        )
    names: dict[int, str] = {}
    by_name: dict[str, Deployment[Any]] = {}
    specs: list[DeploymentSpec] = []

    def visit(node: Application, path: tuple[int, ...]) -> str:
        if id(node) in names:
            return names[id(node)]
        if id(node) in path:
            raise ValueError(f"The application graph has a cycle through {node.deployment.name!r}.")
        deps: list[str] = []

        def substitute(value: Any) -> Any:
            if isinstance(value, Application):
                child = visit(value, (*path, id(node)))
                if child not in deps:
                    deps.append(child)
                return DeploymentHandle(child, app_name)
            if isinstance(value, Deployment):
                raise TypeError(
                    f"Deployment {value.name!r} was passed to {node.deployment.name!r} without "
                    f".bind(); pass {value.name}.bind(...) instead."
                )
            return value

        args = map_arguments(node.args, substitute)
        kwargs = map_arguments(node.kwargs, substitute)
        name = node.deployment.name
        if name in by_name:
            if by_name[name].func_or_class is not node.deployment.func_or_class:
                raise ValueError(
                    f"Application {app_name!r} has two different deployments named {name!r}; "
                    f"give one a distinct name with {name}.options(name=...)."
                )
            # The same deployment bound again (other arguments): Model, Model_1, Model_2...
            suffix = 1
            while f"{name}_{suffix}" in by_name:
                suffix += 1
            name = f"{name}_{suffix}"
        by_name[name] = node.deployment
        names[id(node)] = name
        specs.append(
            DeploymentSpec(
                name=name,
                target=node.deployment.func_or_class,
                init_args=args,
                init_kwargs=kwargs,
                options=_with_logging(node.deployment.deployment_options, logging_config),
                dependencies=tuple(deps),
                code_version=code_version(node.deployment.func_or_class),
            )
        )
        return name

    ingress = visit(root, ())
    return ApplicationSpec(app_name, route_prefix, ingress, tuple(specs))


def _with_logging(options: DeploymentOptions, default: LoggingConfig | None) -> DeploymentOptions:
    if default is None or options.logging_config is not None:
        return options
    return options.model_copy(update={"logging_config": default})
