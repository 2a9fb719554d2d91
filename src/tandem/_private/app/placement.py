"""Placement options: ``placement_group_bundles``, ``placement_group_strategy`` and
``max_replicas_per_node``, checked as Ray Serve checks them.

Only the ray backend applies them (backends/ray/placement.py); the others warn
that they do not. The checks hold on every backend, so an application that
deploys locally deploys on Ray too.
"""

from __future__ import annotations

import math
from typing import Any, Literal

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
DEFAULT_STRATEGY: PlacementStrategy = "PACK"
MAX_REPLICAS_PER_NODE_LIMIT = 100
# What a replica actor reserves when ray_actor_options does not say (as Ray Serve).
DEFAULT_REPLICA_CPUS = 1.0

_EXAMPLE = '[{"CPU": 1}, {"GPU": 1}]'


def check_bundles(value: Any) -> Any:
    """A non-empty list of non-empty dicts of resource name -> non-negative number."""
    if value is None:
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be a non-empty list of resource dicts such as {_EXAMPLE}")
    for index, bundle in enumerate(value):
        if not isinstance(bundle, dict) or not bundle:
            raise ValueError(
                f"bundle {index} must be a non-empty dict of resources such as {{'CPU': 1}}, "
                f"got {bundle!r}"
            )
        for name, amount in bundle.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"bundle {index} has a resource name that is no string: {name!r}")
            if (
                isinstance(amount, bool)
                or not isinstance(amount, (int, float))
                or not math.isfinite(amount)
                or amount < 0
            ):
                raise ValueError(
                    f"resource {name!r} of bundle {index} must be a non-negative number, "
                    f"got {amount!r}"
                )
        if not any(bundle.values()):
            raise ValueError(f"bundle {index} reserves nothing (every amount is 0): {bundle!r}")
    return value


def check_placement(
    bundles: list[dict[str, float]] | None,
    strategy: str | None,
    max_replicas_per_node: int | None,
    actor: dict[str, Any],
) -> None:
    """The rules that tie the placement options together and to ``ray_actor_options``."""
    if bundles is None:
        if strategy is not None:
            raise ValueError(
                "placement_group_strategy needs placement_group_bundles; set both or neither"
            )
        return
    if max_replicas_per_node is not None:
        raise ValueError(
            "max_replicas_per_node cannot be set together with placement_group_bundles; "
            "use one or the other"
        )
    wanted = replica_resources(actor)
    first = bundles[0]
    short = {name: amount for name, amount in wanted.items() if first.get(name, 0) < amount}
    if short:
        needs = ", ".join(f"{name}={amount:g}" for name, amount in short.items())
        raise ValueError(
            f"the replica runs in the first placement group bundle, which must hold what "
            f"ray_actor_options ask for ({needs}), but it is {first!r}; add them to bundle 0 "
            "or lower ray_actor_options (num_cpus defaults to 1)"
        )


def replica_resources(actor: dict[str, Any]) -> dict[str, float]:
    """The resources a replica actor asks for, by Ray's names (CPU, GPU, memory, custom)."""
    cpus = actor.get("num_cpus")
    wanted: dict[str, float] = {
        "CPU": DEFAULT_REPLICA_CPUS if cpus is None else cpus,
        "GPU": actor.get("num_gpus") or 0,
        "memory": actor.get("memory") or 0,
        **(actor.get("resources") or {}),
    }
    return {name: float(amount) for name, amount in wanted.items() if amount}
