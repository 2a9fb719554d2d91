"""Autoscaling policies in the controller: the built-in one, and making a user's.

The built-in policy asks for ``total_num_requests / target_ongoing_requests``
replicas, as Ray Serve's does (the autoscaler then applies the factors, delays
and bounds to every policy's answer). :func:`make_policy` finds a policy
(``app/policy_import.py``) and makes a policy class once, with
``policy_kwargs``, as Ray Serve does.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

from tandem._private.app.autoscaling_config import AutoscalingConfig, AutoscalingPolicy
from tandem._private.app.policy_import import find_policy
from tandem._private.controller.autoscaling_context import AutoscalingContext

logger = logging.getLogger("tandem")


def cold_start_replicas(ctx: AutoscalingContext) -> int | None:
    """Replicas to start at once when requests wait and none runs (None otherwise).

    Every policy's answer is bypassed then, as in Ray Serve: a waiting request
    must not wait out ``upscale_delay_s`` or a policy that ignores load.
    """
    if ctx.current_num_replicas == 0 and ctx.total_num_requests > 0:
        return max(math.ceil(config_of(ctx).get_upscaling_factor()), ctx.target_num_replicas)
    return None


def config_of(ctx: AutoscalingContext) -> AutoscalingConfig:
    """The context's config (the defaults if a context made by hand has none)."""
    config = ctx.config
    return config if isinstance(config, AutoscalingConfig) else AutoscalingConfig()


def replica_queue_length_autoscaling_policy(
    ctx: AutoscalingContext,
) -> tuple[int | float, dict[str, Any]]:
    """The built-in policy: enough replicas for ``target_ongoing_requests`` each.

    Returns the raw number (a float); the autoscaler applies ``upscaling_factor``,
    ``downscaling_factor``, the delays and ``min_replicas``/``max_replicas``.
    """
    cold = cold_start_replicas(ctx)
    if cold is not None:
        return cold, ctx.policy_state
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    return ctx.total_num_requests / config_of(ctx).get_target_ongoing_requests(), {}


default_autoscaling_policy = replica_queue_length_autoscaling_policy


def is_built_in(policy: Callable[..., Any]) -> bool:
    return policy is default_autoscaling_policy


def resolve_policy(policy: AutoscalingPolicy) -> Callable[..., Any]:
    """The function or class ``policy`` names; ValueError saying what is wrong."""
    found = find_policy(policy)
    return default_autoscaling_policy if found is None else found


def make_policy(policy: AutoscalingPolicy, owner: str) -> Callable[..., Any]:
    """The callable to ask on every tick: the function, or one instance of the class
    (made now with ``policy_kwargs``, as Ray Serve makes it once per deployment)."""
    target = resolve_policy(policy)
    if inspect.isclass(target):
        logger.info(
            "Making autoscaling policy %s of %s with %s.", policy.label, owner, policy.policy_kwargs
        )
        return target(**policy.policy_kwargs)  # type: ignore[no-any-return]
    if policy.policy_kwargs:
        logger.warning(
            "policy_kwargs of autoscaling policy %s of %s are not used: it is a function, and "
            "policy_kwargs go to a policy class's constructor (as in Ray Serve).",
            policy.label,
            owner,
        )
    return target
