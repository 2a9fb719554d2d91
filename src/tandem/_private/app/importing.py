"""Finding applications by import path, and calling builder functions.

``module:attribute`` (or ``module.attribute``) names either a bound
:class:`Application` or a builder: a function that takes arguments and returns
one. If the builder's single parameter is annotated with a pydantic model, the
arguments are validated into that model first.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

from pydantic import BaseModel, ValidationError

from tandem._private.app.deployment import Application, Deployment
from tandem._private.app.options import validation_problems


def import_attribute(import_path: str, reload: bool = False) -> Any:
    """Import ``module:attr`` / ``module.attr``; errors say what to fix."""
    if ":" in import_path:
        module_name, _, attr = import_path.partition(":")
    elif "." in import_path:
        module_name, _, attr = import_path.rpartition(".")
    else:
        raise ValueError(
            f"Import path {import_path!r} must look like 'module:app' (e.g. 'hello:app')."
        )
    if not module_name or not attr:
        raise ValueError(f"Import path {import_path!r} must look like 'module:app'.")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the working directory import
    try:
        if reload and module_name in sys.modules:
            module = importlib.reload(sys.modules[module_name])
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ValueError(
                f"Cannot import module {module_name!r} (from {import_path!r}); run from the "
                "directory that contains it, or add that directory to PYTHONPATH."
            ) from exc
        raise
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ValueError(
                f"Module {module_name!r} has no attribute {attr!r} (from {import_path!r})."
            ) from None
    return value


def build_app(target: Any, args: dict[str, Any], import_path: str) -> Application:
    """An application from what an import path named, calling it if it is a builder."""
    if isinstance(target, Application):
        if args:
            raise ValueError(
                f"{import_path!r} is an application, not a builder function, so it takes no "
                f"arguments (got {', '.join(sorted(args))})."
            )
        return target
    if isinstance(target, Deployment):
        raise ValueError(
            f"{import_path!r} is a deployment that was not bound; point at "
            f"{target.name}.bind(...) (an application) or a builder function."
        )
    if not callable(target):
        raise ValueError(
            f"{import_path!r} is a {type(target).__name__}, not an application or a builder "
            "function."
        )
    app = target(_builder_argument(target, args, import_path))
    if not isinstance(app, Application):
        raise ValueError(
            f"The builder {import_path!r} returned a {type(app).__name__}; it must return an "
            "application (Deployment.bind(...))."
        )
    return app


def _builder_argument(builder: Any, args: dict[str, Any], import_path: str) -> Any:
    params = list(inspect.signature(builder).parameters.values())
    if len(params) != 1:
        raise ValueError(
            f"The builder {import_path!r} must take exactly one parameter (the arguments), "
            f"it takes {len(params)}."
        )
    annotation = params[0].annotation
    if isinstance(annotation, str):
        try:
            annotation = inspect.get_annotations(builder, eval_str=True).get(params[0].name)
        except Exception:
            annotation = None
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        try:
            return annotation.model_validate(args)
        except ValidationError as exc:
            problems = "; ".join(f"{where}: {what}" for where, what, _ in validation_problems(exc))
            raise ValueError(
                f"Invalid arguments for builder {import_path!r}: {problems}."
            ) from None
    return args


def parse_cli_args(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``key=value`` words from the command line as a dict."""
    args: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"Builder arguments must be key=value, got {pair!r}.")
        args[key] = value
    return args
