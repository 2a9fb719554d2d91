"""Autoscaling policies named by import path: finding them, and checking an
application's before any of it starts.

``tandem.autoscaling_policy`` names and Ray Serve's ``ray.serve.autoscaling_policy``
names of the built-in policy need no import: :func:`find_policy` answers None
for them (the controller has the function). A path that cannot be imported, or
a policy class that would not take its ``policy_kwargs``, is a ValueError
saying which deployment or application it belongs to; nothing is made or called.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from tandem._private.app.autoscaling_config import RAY_POLICY_MODULE, AutoscalingPolicy
from tandem._private.app.importing import import_attribute
from tandem._private.app.spec import ApplicationSpec

PUBLIC_MODULE = "tandem.autoscaling_policy"
BUILT_IN_NAMES = frozenset(
    {"default_autoscaling_policy", "replica_queue_length_autoscaling_policy"}
)


def find_policy(policy: AutoscalingPolicy, reload: bool = False) -> Callable[..., Any] | None:
    """The function or class ``policy`` names (None: the built-in policy)."""
    target = policy.policy_function
    if not isinstance(target, str):
        return target
    module, colon, attr = target.partition(":")
    if not colon:
        module, _, attr = target.rpartition(".")
    if module in (PUBLIC_MODULE, RAY_POLICY_MODULE):
        if attr in BUILT_IN_NAMES:
            return None
        raise ValueError(
            f"Autoscaling policy {target!r}: tandem's built-in policies are "
            f"{', '.join(sorted(BUILT_IN_NAMES))} (Prometheus-based policies are not provided)."
        )
    try:
        found = import_attribute(target, reload=reload)
    except ValueError as exc:
        raise ValueError(f"Autoscaling policy {target!r}: {exc}") from None
    if not callable(found):
        raise ValueError(
            f"Autoscaling policy {target!r} is a {type(found).__name__}, not a function or class."
        )
    return found  # type: ignore[no-any-return]


def policies_of(spec: ApplicationSpec) -> list[tuple[str, AutoscalingPolicy]]:
    """(whose, policy) of every autoscaled deployment, and of the application."""
    policies = [
        (f"deployment {d.name!r}", auto.policy)
        for d in spec.deployments
        if (auto := d.options.autoscaling) is not None
    ]
    if spec.autoscaling_policy is not None:
        policies.append((f"application {spec.name!r}", spec.autoscaling_policy))
    return policies


def check_policies(policies: Iterable[tuple[str, AutoscalingPolicy]], reload: bool = False) -> None:
    """Raise ValueError if a policy cannot be found, or a policy class would not take
    its ``policy_kwargs`` (see the module docstring)."""
    for whose, policy in policies:
        try:
            target = find_policy(policy, reload=reload)
        except ValueError as exc:
            raise ValueError(f"{exc} (the autoscaling policy of {whose})") from None
        if not inspect.isclass(target):
            continue
        try:
            inspect.signature(target).bind(**policy.policy_kwargs)
        except TypeError as exc:
            raise ValueError(
                f"Autoscaling policy {policy.label} of {whose} does not take its "
                f"policy_kwargs {policy.policy_kwargs}: {exc}."
            ) from None
        except ValueError:
            pass  # no signature to read (a builtin): making it will tell
