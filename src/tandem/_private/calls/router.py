"""Routing: which replica of a deployment serves the next request from this caller.

One :class:`Router` per (caller process, deployment). It keeps its own count of
requests in flight on each replica, sends a request only to a replica below
``max_ongoing_requests``, queues up to ``max_queued_requests`` callers when all
are busy (beyond that: ``BackPressureError``), and takes new replica sets as the
controller publishes them, without dropping queued requests.

Its queue is served by priority (``RequestMetadata.priority``, higher first), then
in order of arrival. A request with a deadline goes to a replica whose recent
answers to this caller came within the time it has left, when some replica's did
not (``PowerOfTwoChoices``).

A deployment with a custom request router (``request_router_config``) has it
published in its replica set; its requests are then routed by that router
(``calls.custom_routing``) instead of the built-in policy.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tandem._private.calls.context import DeploymentID, ReplicaID, RequestMetadata
from tandem._private.calls.custom_routing import CustomRouting, RouterSpec, Superseded
from tandem._private.calls.deadlines import passed
from tandem._private.calls.flow import Last, Opened
from tandem._private.queues import Waiter
from tandem.exceptions import BackPressureError, DeploymentUnavailableError

# A custom router that keeps choosing replicas that are gone fails the request after this.
MAX_STALE_CHOICES = 100
# How much a replica's newest answer time moves its running estimate (RoutedReplica.latency_s).
LATENCY_WEIGHT = 0.2


@dataclass(frozen=True)
class ReplicaInfo:
    """How to reach one replica; ``address`` means something only to its backend."""

    replica_id: str
    address: Any
    max_ongoing_requests: int
    model_ids: frozenset[str] = frozenset()
    # What the replica's record_routing_stats() last returned (custom routers read it).
    routing_stats: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ReplicaSet:
    """A deployment's replicas as the controller last published them."""

    deployment_id: DeploymentID
    replicas: tuple[ReplicaInfo, ...] = ()
    max_queued_requests: int = -1
    # "running" while the deployment exists; "deleted" or "failed" end every wait.
    state: str = "running"
    message: str = ""
    version: int = 0
    request_router: RouterSpec | None = None  # None: the built-in policy


class ReplicaConnection(Protocol):
    """A caller's line to one replica: carries calls and streamed results."""

    replica_id: str

    async def call(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any: ...

    def stream(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]: ...

    def http_request(
        self, meta: RequestMetadata, args: tuple[Any, ...]
    ) -> Awaitable[Last | Opened]:
        """One HTTP request: its whole response, or its ASGI messages as a begun stream."""

    def close(self) -> None:
        """Release the connection (the router no longer sends anything over it)."""


@dataclass
class RoutedReplica:
    """A replica as one router sees it: its connection and this caller's load on it."""

    info: ReplicaInfo
    connection: ReplicaConnection
    in_flight: int = 0
    retired: bool = False  # left the replica set; closed once its requests are done
    # How long its recent answers to this caller took (0 until the first): a moving average.
    latency_s: float = 0.0

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.info.max_ongoing_requests

    def answered_in(self, seconds: float) -> None:
        """A call sent to this replica was answered ``seconds`` after it was sent."""
        latency = self.latency_s
        self.latency_s = seconds if not latency else latency + LATENCY_WEIGHT * (seconds - latency)


@dataclass
class _Ticket(RoutedReplica):
    """One request a custom router routed: released through its router, which hears of it."""

    shared: RoutedReplica | None = None
    routing: CustomRouting | None = None
    replica_id: ReplicaID | None = None
    internal_request_id: str = ""


class RoutingPolicy(Protocol):
    """Which of the replicas with room serves a request (one per router)."""

    def choose(self, candidates: Sequence[RoutedReplica], meta: RequestMetadata) -> RoutedReplica:
        """One of ``candidates`` (never empty; each has room)."""
        ...


@dataclass
class PowerOfTwoChoices:
    """Pick two replicas with room at random; send to the one with fewer in flight."""

    rng: random.Random = field(default_factory=random.Random)

    def choose(self, candidates: Sequence[RoutedReplica], meta: RequestMetadata) -> RoutedReplica:
        if meta.deadline is not None and len(candidates) > 1:
            candidates = likely_in_time(candidates, meta.deadline)
        model = meta.multiplexed_model_id
        if model and len(candidates) > 1:
            # Replicas that hold the model first; else those holding the fewest models
            # (most likely to have a free slot), so a hot model spreads when its
            # holders are busy instead of evicting someone else's.
            holders = [c for c in candidates if model in c.info.model_ids]
            if holders:
                candidates = holders
            else:
                fewest = min(len(c.info.model_ids) for c in candidates)
                candidates = [c for c in candidates if len(c.info.model_ids) == fewest]
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(range(len(candidates)), 2)
        first, second = candidates[a], candidates[b]
        return first if first.in_flight <= second.in_flight else second


def likely_in_time(candidates: Sequence[RoutedReplica], deadline: float) -> Sequence[RoutedReplica]:
    """The candidates whose recent answers came within the time left before ``deadline``
    (all of them if each did, or none is known yet); if none did, the quickest."""
    left = deadline - time.time()
    in_time = [c for c in candidates if c.latency_s <= left]
    if len(in_time) == len(candidates):
        return candidates
    return in_time or [min(candidates, key=lambda c: c.latency_s)]


class Router:
    """Assigns requests to replicas of one deployment (see the module docstring)."""

    def __init__(
        self,
        deployment_id: DeploymentID,
        connect: Callable[[ReplicaInfo], ReplicaConnection],
        policy: RoutingPolicy | None = None,
        prefer: str | None = None,
    ) -> None:
        self.deployment_id = deployment_id
        self._connect = connect
        self._policy: RoutingPolicy = policy or PowerOfTwoChoices()
        self._replicas: dict[str, RoutedReplica] = {}
        # The replica in this caller's own process (direct ingress), taken first when it has room.
        self._prefer = prefer
        self._local: RoutedReplica | None = None
        self._replica_set = ReplicaSet(deployment_id)
        self._known = False
        # Requests waiting for a replica, in the order they are served (queues.Waiter):
        # each is handed a replica, or None to look again.
        self._queue: list[Waiter[RoutedReplica | None]] = []
        self._arrivals = itertools.count()
        self._custom: CustomRouting | None = None
        self._custom_used = False  # then release() may get a custom router's tickets
        # Calls whose deadline passed while they waited here, by method (for /metrics).
        self.expired: dict[str, int] = {}

    @property
    def queued(self) -> int:
        custom = self._custom
        return len(self._queue) + (custom.pending if custom is not None else 0)

    def update(self, replica_set: ReplicaSet) -> None:
        """Take a newly published replica set; keeps counts for replicas that stay."""
        if self._known and replica_set.version < self._replica_set.version:
            return
        self._known = True
        self._replica_set = replica_set
        current = {}
        for info in replica_set.replicas:
            routed = self._replicas.get(info.replica_id)
            if routed is None:
                routed = RoutedReplica(info, self._connect(info))
            else:
                routed.info = info
            current[info.replica_id] = routed
        for replica_id, routed in self._replicas.items():
            if replica_id not in current:
                routed.retired = True
                if not routed.in_flight:
                    routed.connection.close()
        self._replicas = current
        self._local = current.get(self._prefer) if self._prefer is not None else None
        if replica_set.request_router is not None or self._custom is not None:
            self._update_custom(replica_set.request_router)
        self._wake(len(self._queue))

    def prefer(self, replica_id: str) -> None:
        """Take replica ``replica_id`` first whenever it has room (see ``Runtime.prefer``)."""
        self._prefer = replica_id
        self._local = self._replicas.get(replica_id)

    def _update_custom(self, spec: RouterSpec | None) -> None:
        custom = self._custom
        if custom is not None and (spec is None or spec.key != custom.spec.key):
            custom.close()
            custom = self._custom = None
        if spec is None:
            return
        if custom is None:
            custom = self._custom = CustomRouting(
                self.deployment_id, spec, self._raise_if_gone, self._raise_if_queue_full
            )
            self._custom_used = True
        custom.update(self._replicas.values())

    async def assign(
        self,
        meta: RequestMetadata,
        avoid: set[str] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> RoutedReplica:
        """Wait for a replica with room and count the request against it.

        Replicas in ``avoid`` (ids) are skipped while others have room. The
        caller must call :meth:`release` with the result when the request ends.
        ``args`` and ``kwargs`` are the request's, for a custom router to see.
        """
        if self._custom is not None:
            return await self._assign_custom(meta, avoid, args, kwargs or {})
        if avoid:
            return await self._assign_avoiding(meta, avoid)
        local = self._local
        if (
            local is not None
            and not self._queue
            and local.in_flight < local.info.max_ongoing_requests
            and self._replica_set.state == "running"
        ):
            local.in_flight += 1
            return local
        if len(self._replicas) == 1 and not self._queue:
            # One replica (the common case): no choice to make.
            (only,) = self._replicas.values()
            if (
                only.in_flight < only.info.max_ongoing_requests
                and self._replica_set.state == "running"
            ):
                only.in_flight += 1
                return only
        while True:
            self._raise_if_gone()
            if not self._queue:
                candidates = [r for r in self._replicas.values() if r.has_room]
                if candidates:
                    chosen = self._policy.choose(candidates, meta)
                    chosen.in_flight += 1
                    return chosen
            self._raise_if_queue_full(len(self._queue))
            waiter: Waiter[RoutedReplica | None] = Waiter(meta.priority, next(self._arrivals))
            bisect.insort(self._queue, waiter)
            try:
                handed = await waiter.future
            except asyncio.CancelledError:
                self._queue.remove(waiter)
                if passed(meta.deadline):
                    self.count_expired(meta.method_name)
                future = waiter.future
                if future.done() and not future.cancelled():
                    given = future.result()
                    if given is not None:
                        self.release(given)  # handed a place but leaving: pass it on
                    else:
                        self._wake(1)
                raise
            self._queue.remove(waiter)
            if handed is not None:
                return handed  # a finishing request handed its place straight to us
            # Woken because the replica set changed: look again.
            self._raise_if_gone()
            candidates = [r for r in self._replicas.values() if r.has_room]
            if candidates:
                chosen = self._policy.choose(candidates, meta)
                chosen.in_flight += 1
                return chosen
            # Lost the race; go round and queue again (behind those of its priority).

    async def _assign_avoiding(self, meta: RequestMetadata, avoid: set[str]) -> RoutedReplica:
        self._raise_if_gone()
        others = [
            r for r in self._replicas.values() if r.has_room and r.info.replica_id not in avoid
        ]
        if others:
            chosen = self._policy.choose(others, meta)
            chosen.in_flight += 1
            return chosen
        return await self.assign(meta)

    async def _assign_custom(
        self,
        meta: RequestMetadata,
        avoid: set[str] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> RoutedReplica:
        stale = 0
        while True:
            self._raise_if_gone()
            custom = self._custom
            if custom is None:  # the deployment went back to the built-in policy
                return await self.assign(meta, avoid)
            try:
                chosen, pending = await custom.choose(meta, avoid, args, kwargs)
            except Superseded:
                continue  # its router was replaced while it waited: ask the new one
            except asyncio.CancelledError:
                if passed(meta.deadline):
                    self.count_expired(meta.method_name)
                raise
            shared = self._replicas.get(chosen.info.replica_id)
            if shared is not chosen:  # the replica left while the router chose it
                stale += 1
                if stale >= MAX_STALE_CHOICES:
                    raise custom.stale_choice(chosen.info.replica_id)
                await asyncio.sleep(0)
                continue
            shared.in_flight += 1
            try:
                replica_id = custom.sent(pending, shared)
            except BaseException:
                self.release(shared)
                raise
            return _Ticket(
                shared.info,
                shared.connection,
                shared=shared,
                routing=custom,
                replica_id=replica_id,
                internal_request_id=pending.metadata.internal_request_id,
            )

    def release(self, routed: RoutedReplica) -> None:
        if self._custom_used and type(routed) is not RoutedReplica:
            # A request a custom router routed: count it off its replica, then tell it.
            assert isinstance(routed, _Ticket) and routed.shared is not None
            self.release(routed.shared)
            if routed.routing is not None and routed.replica_id is not None:
                routed.routing.finished(routed.replica_id, routed.internal_request_id)
            return
        routed.in_flight -= 1
        if not routed.retired and routed.has_room:
            # Hand the place to the first waiter directly: no race, no extra look.
            for waiter in self._queue:
                if not waiter.future.done():
                    routed.in_flight += 1
                    waiter.future.set_result(routed)
                    return
        elif routed.retired and not routed.in_flight:
            routed.connection.close()
        self._wake(1)

    def count_expired(self, method: str) -> None:
        """A call to ``method`` was dropped here: its deadline passed before it was sent."""
        self.expired[method] = self.expired.get(method, 0) + 1

    def _wake(self, count: int) -> None:
        """Wake the first ``count`` waiters not woken yet, to look at the replicas again."""
        for waiter in self._queue:
            if count <= 0:
                return
            if not waiter.future.done():
                waiter.future.set_result(None)
                count -= 1

    def _raise_if_queue_full(self, queued: int) -> None:
        limit = self._replica_set.max_queued_requests
        if limit != -1 and queued >= limit:
            raise BackPressureError(
                f"Deployment {self.deployment_id.name!r} of application "
                f"{self.deployment_id.app_name!r} has {queued} requests queued "
                f"(max_queued_requests={limit}); retry later or raise the limit."
            )

    def _raise_if_gone(self) -> None:
        state = self._replica_set.state
        if state == "running":
            return
        what = "was deleted" if state == "deleted" else "failed"
        raise DeploymentUnavailableError(
            f"Deployment {self.deployment_id.name!r} of application "
            f"{self.deployment_id.app_name!r} {what}"
            + (f": {self._replica_set.message}" if self._replica_set.message else ".")
        )
