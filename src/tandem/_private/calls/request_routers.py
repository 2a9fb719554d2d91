"""The request router API users subclass (public as ``tandem.request_router``).

A custom router subclasses :class:`RequestRouter` and implements
``choose_replicas``: given the deployment's replicas (:class:`RunningReplica`)
and the request (:class:`PendingRequest`), it returns *ranks* of replicas,
most preferred first. The request goes to the least loaded replica with room
in the first rank that has one; when none has, tandem waits (the backoff, or
until a replica frees up or the replicas change) and asks again.

Load is what this caller knows: the requests it has in flight on each replica
(or what ``on_new_queue_len_info`` last reported). A router lives in each
process that calls the deployment; tandem builds it and hands it replica
updates (``update_replicas``) and request events (``on_request_routed``,
``on_request_completed``, ``on_replica_actor_died``) from
:mod:`tandem._private.calls.custom_routing`.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tandem._private.calls.context import DeploymentID, ReplicaID


@dataclass(frozen=True)
class RoutingMetadata:
    """What a router may know of a request (``PendingRequest.metadata``)."""

    request_id: str
    internal_request_id: str  # unique to this call (request_id is shared down a call chain)
    app_name: str
    call_method: str
    route: str = ""
    multiplexed_model_id: str = ""
    is_streaming: bool = False


@dataclass
class RequestRoutingContext:
    """Where the mixins' helpers are in widening their search for one request."""

    multiplexed_start_matching_time: float | None = None
    tried_fewest_multiplexed_models: bool = False
    tried_first_multiplexed_models: bool = False
    tried_same_node: bool = False
    tried_same_az: bool = False
    should_backoff: bool = False


@dataclass
class PendingRequest:
    """A request waiting for a replica; its arguments are already resolved."""

    args: list[Any]
    kwargs: dict[str, Any]
    metadata: RoutingMetadata
    created_at: float = field(default_factory=time.time)
    routing_context: RequestRoutingContext = field(default_factory=RequestRoutingContext)
    resolved: bool = True


@dataclass(frozen=True)
class ReplicaResult:
    """A request sent to a replica, as ``on_request_routed`` hears of it."""

    replica_id: ReplicaID
    metadata: RoutingMetadata


class _Routed(Protocol):
    """A replica as the caller's router tracks it (``calls.router.RoutedReplica``)."""

    info: Any  # ReplicaInfo
    in_flight: int


class RunningReplica:
    """A replica as a request router sees it. Built by tandem, not by routers."""

    __slots__ = ("_node_id", "_replica_id", "_routed")

    def __init__(self, routed: _Routed, replica_id: ReplicaID, node_id: str) -> None:
        self._routed = routed
        self._replica_id = replica_id
        self._node_id = node_id

    @property
    def replica_id(self) -> ReplicaID:
        return self._replica_id

    @property
    def node_id(self) -> str:
        """The node the replica runs on (replicas of the local and process backends
        run on the caller's node)."""
        return self._node_id

    @property
    def availability_zone(self) -> str | None:
        """Always None: tandem does not know availability zones."""
        return None

    @property
    def multiplexed_model_ids(self) -> set[str]:
        return set(self._routed.info.model_ids)

    @property
    def routing_stats(self) -> dict[str, Any]:
        """What the replica's ``record_routing_stats()`` last returned ({} before that)."""
        return dict(self._routed.info.routing_stats)

    @property
    def replica_metadata(self) -> dict[str, Any]:
        return {}

    @property
    def max_ongoing_requests(self) -> int:
        return int(self._routed.info.max_ongoing_requests)

    @property
    def is_cross_language(self) -> bool:
        return False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        """Requests this caller has in flight on the replica (known here: no round trip)."""
        return self._routed.in_flight

    def __repr__(self) -> str:
        return f"RunningReplica({self._replica_id})"


class RoutingLink(Protocol):
    """What a router needs from the caller's routing around it (custom_routing)."""

    @property
    def pending(self) -> int: ...

    async def wait(self, pending_request: PendingRequest, delay_s: float) -> None:
        """Until a replica may have room, or ``delay_s`` passed; raises if the deployment
        is gone or too many requests wait."""
        ...


class _Unlinked:
    """A router built outside tandem's routing (in a test): waiting is sleeping."""

    pending = 0

    async def wait(self, pending_request: PendingRequest, delay_s: float) -> None:
        await asyncio.sleep(delay_s)


class RequestRouter(ABC):
    """Base of every request router: subclasses implement :meth:`choose_replicas`.

    tandem constructs one in each process that calls the deployment, with
    keyword arguments only (mixins take theirs, the rest arrive here), then
    calls ``initialize_state(**request_router_kwargs)``.
    """

    def __init__(
        self,
        deployment_id: DeploymentID,
        handle_source: Any = None,
        self_actor_id: str | None = None,
        self_actor_handle: Any = None,
        use_replica_queue_len_cache: bool = False,
        get_curr_time_s: Callable[[], float] | None = None,
        create_replica_wrapper_func: Any = None,
        initial_backoff_s: float = 0.025,
        backoff_multiplier: float = 2.0,
        max_backoff_s: float = 0.5,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self._deployment_id = deployment_id
        self._handle_source = handle_source
        self._self_actor_id = self_actor_id
        self._get_curr_time_s = get_curr_time_s or time.time
        self.initial_backoff_s = initial_backoff_s
        self.backoff_multiplier = backoff_multiplier
        self.max_backoff_s = max_backoff_s
        self._replicas: dict[ReplicaID, RunningReplica] = {}
        self._replica_id_set: set[ReplicaID] = set()
        # Queue lengths reported through on_new_queue_len_info; without one, a replica's
        # load is the requests this caller has in flight on it.
        self._queue_len_cache: dict[ReplicaID, int] = {}
        self._updated_event: asyncio.Event | None = None
        self._link: RoutingLink = _Unlinked()

    # -- what subclasses implement or override ------------------------------

    def initialize_state(self, **kwargs: Any) -> None:  # noqa: B027
        """Called once after construction with ``request_router_kwargs``."""

    @abstractmethod
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks of replicas for the request, the most preferred rank first."""

    def on_request_routed(  # noqa: B027
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        """A request was sent to ``replica_id``."""

    def on_request_completed(  # noqa: B027
        self, replica_id: ReplicaID, internal_request_id: str
    ) -> None:
        """A request sent to ``replica_id`` ended (answered, failed or cancelled)."""

    @property
    def supports_rejection_protocol(self) -> bool:
        """Kept for Ray Serve routers: tandem replicas queue instead of rejecting."""
        return True

    # -- state tandem keeps up to date --------------------------------------

    @property
    def curr_replicas(self) -> dict[ReplicaID, RunningReplica]:
        return self._replicas

    @property
    def app_name(self) -> str:
        return self._deployment_id.app_name

    @property
    def num_pending_requests(self) -> int:
        """Requests of this caller waiting for a replica of the deployment."""
        return self._link.pending

    @property
    def _replicas_updated_event(self) -> asyncio.Event:
        """Set whenever the replicas change (routers that wait for replicas clear it)."""
        if self._updated_event is None:
            self._updated_event = asyncio.Event()
        return self._updated_event

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """The deployment's replicas now (tandem calls this as the controller publishes)."""
        self._replicas = {r.replica_id: r for r in replicas}
        self._replica_id_set = set(self._replicas)
        for gone in set(self._queue_len_cache) - self._replica_id_set:
            del self._queue_len_cache[gone]
        self._replicas_changed(replicas)
        self._replicas_updated_event.set()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Forget a replica that could not be reached, until the next update lists it."""
        self._replicas.pop(replica_id, None)
        self._replica_id_set.discard(replica_id)
        self._queue_len_cache.pop(replica_id, None)
        self._replica_dropped(replica_id)

    def on_replica_actor_unavailable(self, replica_id: ReplicaID) -> None:
        """Forget the queue length reported for the replica."""
        self._queue_len_cache.pop(replica_id, None)

    def on_new_queue_len_info(self, replica_id: ReplicaID, num_ongoing_requests: int) -> None:
        """Take ``num_ongoing_requests`` as the replica's load (kept up to date as this
        caller sends and completes requests) instead of this caller's own count."""
        self._queue_len_cache[replica_id] = num_ongoing_requests

    def on_send_request(self, replica_id: ReplicaID) -> None:
        if replica_id in self._queue_len_cache:
            self._queue_len_cache[replica_id] += 1

    def decrement_queue_len_cache(self, replica_id: ReplicaID) -> None:
        if replica_id in self._queue_len_cache:
            self._queue_len_cache[replica_id] = max(0, self._queue_len_cache[replica_id] - 1)

    def _replicas_changed(self, replicas: list[RunningReplica]) -> None:
        """Mixins keep their indexes here (each calls the next class's, in any order)."""
        following = getattr(super(), "_replicas_changed", None)
        if following is not None:
            following(replicas)

    def _replica_dropped(self, replica_id: ReplicaID) -> None:
        following = getattr(super(), "_replica_dropped", None)
        if following is not None:
            following(replica_id)

    # -- helpers for choose_replicas ----------------------------------------

    def select_available_replicas(
        self, candidates: list[RunningReplica] | None = None
    ) -> list[RunningReplica]:
        """The candidates (default: every replica) below their ``max_ongoing_requests``."""
        if candidates is None:
            candidates = list(self._replicas.values())
        return [r for r in candidates if self._queue_len(r) < r.max_ongoing_requests]

    def _queue_len(self, replica: RunningReplica) -> int:
        reported = self._queue_len_cache.get(replica.replica_id)
        return replica._routed.in_flight if reported is None else reported

    # -- backoff -------------------------------------------------------------

    def update_backoff_params(
        self,
        initial_backoff_s: float | None,
        backoff_multiplier: float | None,
        max_backoff_s: float | None,
    ) -> None:
        if initial_backoff_s is not None:
            self.initial_backoff_s = initial_backoff_s
        if backoff_multiplier is not None:
            self.backoff_multiplier = backoff_multiplier
        if max_backoff_s is not None:
            self.max_backoff_s = max_backoff_s

    def _compute_backoff_s(self, attempt: int) -> float:
        """Seconds to wait after ``attempt`` (from 0) rounds found no replica with room."""
        return float(
            min(self.initial_backoff_s * self.backoff_multiplier**attempt, self.max_backoff_s)
        )

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(self._compute_backoff_s(attempt))

    # -- the routing loop ----------------------------------------------------

    async def _choose_replica_for_request(
        self, pending_request: PendingRequest, *, is_retry: bool = False
    ) -> RunningReplica:
        """The replica for one request: ask :meth:`choose_replicas` for ranks, take the
        least loaded replica with room in the first rank that has one; else wait and
        ask again. Routers that pick replicas some other way override this."""
        attempt = 0
        while True:
            context = pending_request.routing_context
            before = (context.tried_same_node, context.tried_same_az)
            if self._replicas:
                ranks = await self.choose_replicas(
                    candidate_replicas=list(self._replicas.values()),
                    pending_request=pending_request,
                )
                for rank in _checked(ranks, type(self).__name__):
                    chosen = self._least_loaded_with_room(rank)
                    if chosen is not None:
                        return chosen
                if not context.should_backoff and before != (
                    context.tried_same_node,
                    context.tried_same_az,
                ):
                    continue  # the locality helper widened its scope: try that at once
            await self._link.wait(pending_request, self._compute_backoff_s(attempt))
            attempt += 1

    def _least_loaded_with_room(self, rank: Sequence[RunningReplica]) -> RunningReplica | None:
        best: RunningReplica | None = None
        best_load = 0
        for replica in rank:
            load = self._queue_len(replica)
            if load < replica.max_ongoing_requests and (best is None or load < best_load):
                best, best_load = replica, load
        return best


def _checked(ranks: Any, router: str) -> list[Sequence[RunningReplica]]:
    """``ranks`` if choose_replicas returned a list of lists of RunningReplica."""
    if isinstance(ranks, list | tuple) and all(
        isinstance(rank, list | tuple) and all(isinstance(r, RunningReplica) for r in rank)
        for rank in ranks
    ):
        return list(ranks)
    raise TypeError(
        f"{router}.choose_replicas must return a list of lists of RunningReplica (ranks, "
        f"the most preferred first), got {ranks!r}."
    )
