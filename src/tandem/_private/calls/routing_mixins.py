"""The request router mixins and the default router, for routers users write.

``FIFOMixin`` gives replicas to waiting requests in the order they arrived;
``LocalityMixin`` and ``MultiplexMixin`` keep indexes of the replicas (by node,
by loaded model) up to date and offer helpers that rank replicas or narrow the
candidates. :class:`PowerOfTwoChoicesRequestRouter` is tandem's default policy
in this API: a deployment that names it (or sets no router) is routed by the
router's built-in policy (``calls.router.PowerOfTwoChoices``), which does the
same without the API's overhead; subclasses of it run as custom routers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from tandem._private.calls.context import ReplicaID
from tandem._private.calls.request_routers import (
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

# A multiplexed request waits this long (to twice as long, at random) for a replica
# that holds its model before it settles for another (Ray Serve's default).
MULTIPLEXED_MATCHING_TIMEOUT_S = 1.0


class FIFOMixin:
    """Requests get replicas in the order they arrived: while the first waits, the
    others wait behind it (without it, each request is routed as soon as it can be)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


class LocalityMixin:
    """Knows which replicas run on this caller's node (and availability zone)."""

    _replica_id_set: set[ReplicaID]  # the RequestRouter's

    def __init__(
        self,
        self_node_id: str | None = None,
        prefer_local_node_routing: bool = False,
        prefer_local_az_routing: bool = False,
        self_availability_zone: str | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._self_node_id = self_node_id
        self._prefer_local_node_routing = prefer_local_node_routing
        self._prefer_local_az_routing = prefer_local_az_routing
        self._self_availability_zone = self_availability_zone
        self._same_node: set[ReplicaID] = set()
        self._same_az: set[ReplicaID] = set()

    def _replicas_changed(self, replicas: list[RunningReplica]) -> None:
        node, zone = self._self_node_id, self._self_availability_zone
        self._same_node = {r.replica_id for r in replicas if node is not None and r.node_id == node}
        self._same_az = {
            r.replica_id for r in replicas if zone is not None and r.availability_zone == zone
        }
        following = getattr(super(), "_replicas_changed", None)
        if following is not None:
            following(replicas)

    def _replica_dropped(self, replica_id: ReplicaID) -> None:
        self._same_node.discard(replica_id)
        self._same_az.discard(replica_id)
        following = getattr(super(), "_replica_dropped", None)
        if following is not None:
            following(replica_id)

    def apply_locality_routing(
        self, pending_request: PendingRequest | None = None
    ) -> set[ReplicaID]:
        """The replicas to try for the request: those on this node once (if preferred
        and any), then those in this zone once (likewise), then all."""
        if pending_request is None:
            return set(self._replica_id_set)
        context = pending_request.routing_context
        if self._prefer_local_node_routing and not context.tried_same_node and self._same_node:
            context.tried_same_node = True
            context.should_backoff = False
            return set(self._same_node)
        if self._prefer_local_az_routing and not context.tried_same_az and self._same_az:
            context.tried_same_az = True
            context.should_backoff = False
            return set(self._same_az)
        context.should_backoff = True
        return set(self._replica_id_set)

    def rank_replicas_via_locality(
        self, replicas: list[RunningReplica]
    ) -> list[list[RunningReplica]]:
        """Three ranks: on this node, in this availability zone, the others."""
        ranks: list[list[RunningReplica]] = [[], [], []]
        for replica in replicas:
            if replica.replica_id in self._same_node:
                ranks[0].append(replica)
            elif replica.replica_id in self._same_az:
                ranks[1].append(replica)
            else:
                ranks[2].append(replica)
        return ranks


class MultiplexMixin:
    """Knows which replicas hold which multiplexed models."""

    _replicas: dict[ReplicaID, RunningReplica]  # the RequestRouter's
    _replica_id_set: set[ReplicaID]
    _get_curr_time_s: Callable[[], float]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._multiplexed_model_id_to_replica_ids: dict[str, set[ReplicaID]] = {}
        # Models some request is already trying replicas without them for: others
        # asking for one wait for a holder instead of loading it elsewhere too.
        self._multiplexed_model_id_fallback_match: set[str] = set()

    def _replicas_changed(self, replicas: list[RunningReplica]) -> None:
        holders: dict[str, set[ReplicaID]] = {}
        for replica in replicas:
            for model_id in replica.multiplexed_model_ids:
                holders.setdefault(model_id, set()).add(replica.replica_id)
        self._multiplexed_model_id_to_replica_ids = holders
        following = getattr(super(), "_replicas_changed", None)
        if following is not None:
            following(replicas)

    def _replica_dropped(self, replica_id: ReplicaID) -> None:
        for ids in self._multiplexed_model_id_to_replica_ids.values():
            ids.discard(replica_id)
        following = getattr(super(), "_replica_dropped", None)
        if following is not None:
            following(replica_id)

    def _get_replica_ids_with_fewest_multiplexed_models(self) -> set[ReplicaID]:
        if not self._replicas:
            return set()
        fewest = min(len(r.multiplexed_model_ids) for r in self._replicas.values())
        return {
            replica_id
            for replica_id, replica in self._replicas.items()
            if len(replica.multiplexed_model_ids) == fewest
        }

    def apply_multiplex_routing(
        self, pending_request: PendingRequest | None = None
    ) -> set[ReplicaID]:
        """The replicas to try for the request's model: its holders, for a while (or
        those holding the fewest models, if none holds it); after that, those holding
        the fewest models once; then all."""
        if pending_request is None:
            return set(self._replica_id_set)
        context = pending_request.routing_context
        now = self._get_curr_time_s()
        if context.multiplexed_start_matching_time is None:
            context.multiplexed_start_matching_time = now
        model_id = pending_request.metadata.multiplexed_model_id
        timeout = random.uniform(MULTIPLEXED_MATCHING_TIMEOUT_S, 2 * MULTIPLEXED_MATCHING_TIMEOUT_S)
        context.should_backoff = True
        if now - context.multiplexed_start_matching_time < timeout:
            holders = self._multiplexed_model_id_to_replica_ids.get(model_id, set())
            first_try = not context.tried_first_multiplexed_models
            context.tried_first_multiplexed_models = True
            if first_try and holders:
                self._multiplexed_model_id_fallback_match.discard(model_id)
                return set(holders)
            if first_try and model_id in self._multiplexed_model_id_fallback_match:
                return set()  # another request is loading the model somewhere: wait for it
            self._multiplexed_model_id_fallback_match.add(model_id)
            return self._get_replica_ids_with_fewest_multiplexed_models()
        if not context.tried_fewest_multiplexed_models:
            context.tried_fewest_multiplexed_models = True
            return self._get_replica_ids_with_fewest_multiplexed_models()
        return set(self._replica_id_set)

    def rank_replicas_via_multiplex(
        self, replicas: list[RunningReplica], multiplexed_model_id: str
    ) -> list[list[RunningReplica]]:
        """Three ranks: holding the model, holding the fewest models, the others."""
        holders = self._multiplexed_model_id_to_replica_ids.get(multiplexed_model_id, set())
        fewest = self._get_replica_ids_with_fewest_multiplexed_models()
        ranks: list[list[RunningReplica]] = [[], [], []]
        for replica in replicas:
            if replica.replica_id in holders:
                ranks[0].append(replica)
            elif replica.replica_id in fewest:
                ranks[1].append(replica)
            else:
                ranks[2].append(replica)
        return ranks


class PowerOfTwoChoicesRequestRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Two replicas at random (among the model's holders for a multiplexed request);
    the request goes to the less loaded one with room."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request)
        else:
            ids = self.apply_locality_routing(pending_request)
        candidates = [self._replicas[i] for i in ids if i in self._replicas]
        if not candidates:
            return []
        return [random.sample(candidates, min(2, len(candidates)))]
