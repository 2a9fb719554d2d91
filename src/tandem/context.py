"""``ray.serve.context`` names user code reaches for: ``from ray.serve.context import
_get_internal_replica_context`` becomes ``from tandem.context import ...``."""

from __future__ import annotations

from tandem._private.calls.context import ReplicaContext, current_replica_context

__all__ = ["ReplicaContext", "_get_internal_replica_context"]


def _get_internal_replica_context() -> ReplicaContext | None:
    """The context of the replica this code runs in; None outside a replica (unlike
    ``tandem.get_replica_context()``, which raises there)."""
    return current_replica_context()
