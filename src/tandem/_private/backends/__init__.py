"""Where replicas live: the backend names, and ``create_backend`` to make one.

The backend seam itself is :mod:`tandem._private.backends.base`; each backend is
a module (``local``) or a package (``process``, ``ray``) of its own, imported
only when it is created, so the core never loads Ray.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from tandem._private.backends.base import Backend

BACKEND_NAMES = ("local", "process", "ray")
DEFAULT_BACKEND = "process"
BACKEND_ENV_VAR = "TANDEM_BACKEND"


@dataclass(frozen=True)
class RayOptions:
    """How the ray backend joins Ray (``tandem run --address/--working-dir/...``).

    ``address`` None means $RAY_ADDRESS (Ray's own variable, read when Ray is
    joined), else a local Ray of tandem's own; ``runtime_env`` is the job's.
    """

    address: str | None = None
    runtime_env: dict[str, Any] = field(default_factory=dict)


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


def create_backend(name: str, ray_options: RayOptions | None = None) -> Backend:
    """A new, unopened backend; ``ray_options`` only apply to (and only with) ``ray``."""
    if ray_options is not None and name != "ray":
        raise ValueError(f"Ray options apply to the ray backend, not to the {name} backend.")
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

        return RayBackend(ray_options or RayOptions())
    raise ValueError(f"Unknown backend {name!r}; choose one of: {', '.join(BACKEND_NAMES)}.")


__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "RayOptions",
    "create_backend",
    "parse_runtime_env",
    "resolve_backend_name",
]
