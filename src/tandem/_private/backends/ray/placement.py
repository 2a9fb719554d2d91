"""Where Ray puts a replica actor: its placement group, and at most
``max_replicas_per_node`` replicas of a deployment on one node.

A replica of a deployment with ``placement_group_bundles`` gets a placement
group of its own, made of those bundles with ``placement_group_strategy``
(PACK unless set), and runs in bundle 0; the tasks and actors it starts go into
the group too. The group is removed when the replica is.

``max_replicas_per_node`` is enforced by Ray's scheduler, through an implicit
resource: every node has one unit of each resource whose name starts with
Ray's implicit prefix, and each replica of the deployment asks for
``1 / max_replicas_per_node`` of the deployment's own.
"""

from __future__ import annotations

from typing import Any

import ray
from ray._raylet import IMPLICIT_RESOURCE_PREFIX  # type: ignore[attr-defined]
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tandem._private.app.placement import DEFAULT_STRATEGY
from tandem._private.replica.replica import ReplicaSpec


def per_node_resource(spec: ReplicaSpec) -> dict[str, float]:
    """The share of the node's implicit resource one replica takes (max_replicas_per_node)."""
    most = spec.options.max_replicas_per_node
    if most is None:
        return {}
    deployment = spec.deployment_id
    return {f"{IMPLICIT_RESOURCE_PREFIX}{deployment.app_name}:{deployment.name}": 1.0 / most}


def is_implicit(resource: str) -> bool:
    """Every node has it (so no node lacks it)."""
    return resource.startswith(IMPLICIT_RESOURCE_PREFIX)


def create_group(spec: ReplicaSpec) -> PlacementGroup | None:
    """A new placement group for the replica, if its deployment asks for one."""
    bundles = spec.options.placement_group_bundles
    if bundles is None:
        return None
    group: PlacementGroup = placement_group(
        [dict(bundle) for bundle in bundles],
        strategy=spec.options.placement_group_strategy or DEFAULT_STRATEGY,
        name=f"tandem:{spec.replica_id}",
    )
    return group


def in_group(group: PlacementGroup | None) -> dict[str, Any]:
    """The actor options that put a replica in bundle 0 of its group."""
    if group is None:
        return {}
    strategy = PlacementGroupSchedulingStrategy(
        placement_group=group,
        placement_group_bundle_index=0,
        placement_group_capture_child_tasks=True,
    )
    return {"scheduling_strategy": strategy}


def remove_group(group: PlacementGroup | None) -> None:
    """Give the group's resources back (after its replica's actor was killed)."""
    if group is not None and ray.is_initialized():
        remove_placement_group(group)


def node_demands(spec: ReplicaSpec, actor: dict[str, float]) -> list[dict[str, float]]:
    """What some node must hold, each, for the replica ever to be placed.

    ``actor``: what the actor asks for. In a placement group it takes that from
    bundle 0 (checked when the options were), so the bundles are what count.
    """
    bundles = spec.options.placement_group_bundles
    if bundles is None:
        return [actor]
    if spec.options.placement_group_strategy == "STRICT_PACK":
        total: dict[str, float] = {}
        for bundle in bundles:
            for name, amount in bundle.items():
                total[name] = total.get(name, 0) + amount
        return [total]
    return [dict(bundle) for bundle in bundles]


def nodes_short(spec: ReplicaSpec, alive_nodes: int) -> str | None:
    """Why STRICT_SPREAD could never place the replica's group on this cluster, if so."""
    bundles = spec.options.placement_group_bundles
    if spec.options.placement_group_strategy != "STRICT_SPREAD" or bundles is None:
        return None
    if len(bundles) <= alive_nodes:
        return None
    return (
        f"Deployment {spec.deployment_id.name!r} asks for {len(bundles)} placement group "
        f"bundles on distinct nodes (STRICT_SPREAD), but the Ray cluster has {alive_nodes} "
        "node(s). Use fewer bundles, another placement_group_strategy, or add nodes."
    )
