"""What ``tandem run``'s flags mean: the options they lay over a config's (HTTP and
gRPC), and the Ray settings that make the ray backend.

Errors are ValueError (ImportError for a missing extra) saying what to fix; the
command prints them without a traceback.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tandem._private.grpc.options import gRPCOptions
from tandem._private.http.options import HTTPOptions

if TYPE_CHECKING:
    from tandem._private.backends import Backend


def http_options_with(options: HTTPOptions, **flags: Any) -> HTTPOptions:
    """The config's http_options with the flags given laid over them."""
    return options.model_copy(update={k: v for k, v in flags.items() if v is not None})


def grpc_options_with(options: gRPCOptions, **flags: Any) -> gRPCOptions:
    """The config's grpc_options with the flags given laid over them (validated)."""
    given = {name: value for name, value in flags.items() if value is not None}
    if not given:
        return options
    return gRPCOptions.model_validate({**options.model_dump(exclude_unset=True), **given})


def ray_settings(
    backend: str | None, address: str | None, working_dir: str | None, env_json: str | None
) -> str | Backend | None:
    """Check the Ray options; return the backend they imply (the ray backend, made with
    them), else ``backend`` as given. ValueError (or ImportError without Ray) says what
    is wrong."""
    given = [
        flag
        for flag, value in (
            ("--address", address),
            ("--working-dir", working_dir),
            ("--runtime-env-json", env_json),
        )
        if value is not None
    ]
    if not given:
        return backend
    if backend not in (None, "ray"):
        raise ValueError(
            f"{given[0]} is an option of the ray backend; it needs --backend ray, not {backend}."
        )
    from tandem._private.backends import RayOptions, create_backend, parse_runtime_env

    runtime_env: dict[str, Any] = {}
    if env_json is not None:
        runtime_env = parse_runtime_env(env_json, "--runtime-env-json")
    if working_dir is not None:
        if os.path.isdir(working_dir):
            working_dir = os.path.abspath(working_dir)
        elif "://" not in working_dir:
            raise ValueError(
                f"--working-dir {working_dir!r} is not a directory here (nor a remote URI "
                "such as s3://bucket/code.zip)."
            )
        runtime_env["working_dir"] = working_dir
    return create_backend("ray", RayOptions(address=address, runtime_env=runtime_env))
