"""Where replicas live. ``select_backend`` turns a backend name into an instance."""

from __future__ import annotations

import json
import os
from typing import Any

from tandem._private.backends.base import Backend

BACKEND_NAMES = ("local", "process", "ray")
DEFAULT_BACKEND = "process"
BACKEND_ENV_VAR = "TANDEM_BACKEND"
# The ray backend's job runtime_env, as JSON (set by tandem run --working-dir, ...).
RAY_RUNTIME_ENV_VAR = "TANDEM_RAY_RUNTIME_ENV"


def parse_runtime_env(text: str, source: str) -> dict[str, Any]:
    """A Ray runtime_env given as JSON text by ``source`` (named in the error)."""
    try:
        env = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{source} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(env, dict):
        raise ValueError(f"{source} must be a JSON object, got {text!r}")
    return env


def resolve_backend_name(requested: str | None) -> str:
    """The backend to use: the argument, else $TANDEM_BACKEND (read now), else the default."""
    name = (
        requested if requested is not None else os.environ.get(BACKEND_ENV_VAR) or DEFAULT_BACKEND
    )
    name = name.strip().lower()
    if name not in BACKEND_NAMES:
        source = "backend" if requested is not None else BACKEND_ENV_VAR
        raise ValueError(f"Unknown {source} {name!r}; choose one of: {', '.join(BACKEND_NAMES)}.")
    return name


def create_backend(name: str) -> Backend:
    if name == "local":
        from tandem._private.backends.local import LocalBackend

        return LocalBackend()
    if name == "process":
        from tandem._private.backends.process.backend import ProcessBackend

        return ProcessBackend()
    if name == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ImportError(
                'The ray backend needs Ray: pip install "tandem-serve[ray]".'
            ) from None
        from tandem._private.backends.ray.backend import RayBackend

        return RayBackend()
    raise ValueError(f"Unknown backend {name!r}; choose one of: {', '.join(BACKEND_NAMES)}.")


__all__ = ["BACKEND_NAMES", "Backend", "create_backend", "resolve_backend_name"]
