"""Custom request routers (``request_router_config``) and routing stats.

The applications run on every backend: a router picks as it ranks, in the
driver and in replicas that call other deployments; ``record_routing_stats``
reaches ``RunningReplica.routing_stats`` in every caller; ``request_router_kwargs``
reach ``initialize_state``; a failing router fails only the requests it was asked
about. The router's own mechanics (mixins, FIFO, backpressure, hooks) are tested
with fake connections, as in test_router.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import tandem as serve
from helpers import wait_for
from tandem._private.api import http_url
from tandem._private.calls.context import DeploymentID, RequestMetadata
from tandem._private.calls.custom_routing import RequestRouterError
from tandem._private.calls.router import ReplicaInfo, ReplicaSet, Router
from tandem._private.replica.routing_stats import RoutingStats
from tandem.config import RequestRouterConfig
from tandem.exceptions import BackPressureError
from tandem.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    PowerOfTwoChoicesRequestRouter,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

# -- routers the tests deploy (module level: every backend imports them by name) ---------


class PreferLast(RequestRouter):
    """First rank: the replica with the greatest id; then the others."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Any = None
    ) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        return [ordered[-1:], ordered[:-1]]


class NamedByStats(RequestRouter):
    """Only replicas whose routing stats name them: a request waits for the stats."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Any = None
    ) -> list[list[RunningReplica]]:
        return [
            [
                r
                for r in candidate_replicas
                if r.routing_stats.get("me") == r.replica_id.to_full_id_str()
            ]
        ]


class AtLeastServed(RequestRouter):
    """Only replicas whose stats say they served at least the request's argument."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Any = None
    ) -> list[list[RunningReplica]]:
        wanted = pending_request.args[0]
        return [[r for r in candidate_replicas if r.routing_stats.get("served", -1) >= wanted]]


class Picky(RequestRouter):
    """Needs its kwargs; refuses requests to the method ``refused``."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Any = None
    ) -> list[list[RunningReplica]]:
        if pending_request.metadata.call_method == "refused":
            raise ValueError("no replica for you")
        if self.kwargs != {"answer": 42, "names": ["a"]}:
            raise ValueError(f"unexpected kwargs {self.kwargs}")
        return [candidate_replicas]


class BrokenAtStart(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        raise RuntimeError("cannot start")

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Any = None
    ) -> list[list[RunningReplica]]:
        return [candidate_replicas]


def _router(cls: Any, **settings: Any) -> RequestRouterConfig:
    return RequestRouterConfig(request_router_class=cls, **settings)


def _replica_id() -> str:
    return serve.get_replica_context().replica_id


# -- on every backend -----------------------------------------------------------------


@pytest.mark.parametrize("as_path", [False, True], ids=["class", "import-path"])
def test_requests_go_to_the_first_rank_with_room(backend: str, as_path: bool) -> None:
    cls = f"{__name__}:PreferLast" if as_path else PreferLast

    @serve.deployment(num_replicas=3, max_ongoing_requests=1, request_router_config=_router(cls))
    class Where:
        def __call__(self) -> str:
            return _replica_id()

        async def hold(self) -> Any:
            yield _replica_id()
            await asyncio.Event().wait()  # until the caller cancels

    handle = serve.run(Where.bind(), backend=backend, route_prefix=None)
    served = {handle.remote().result() for _ in range(6)}
    assert len(served) == 1  # the first rank, every time it has room
    (preferred,) = served
    held = handle.options(stream=True).hold.remote()
    assert next(held) == preferred  # it is full now (max_ongoing_requests=1)
    others = {handle.remote().result() for _ in range(4)}
    assert len(others) == 1 and preferred not in others  # the next rank
    held.cancel()
    assert wait_for(lambda: handle.remote().result() == preferred, timeout_s=30)


def test_routing_stats_reach_routers_in_the_driver_and_in_replicas(backend: str) -> None:
    stats = _router(NamedByStats, request_routing_stats_period_s=0.1)

    @serve.deployment(num_replicas=2, request_router_config=stats)
    class Named:
        def __call__(self) -> str:
            return _replica_id()

        def record_routing_stats(self) -> dict[str, Any]:
            return {"me": _replica_id()}

    @serve.deployment
    class Caller:
        def __init__(self, named: Any) -> None:
            self.named = named

        async def __call__(self) -> str:
            return await self.named.remote()

    handle = serve.run(Named.bind(), backend=backend, name="named", route_prefix=None)
    # Without stats the router ranks no replica: an answer means the stats arrived.
    assert handle.remote().result(timeout_s=30).startswith("named#Named#")
    caller = serve.run(Caller.bind(Named.bind()), backend=backend, name="via", route_prefix=None)
    assert caller.remote().result(timeout_s=30).startswith("via#Named#")


def test_routing_stats_follow_the_replica_and_routers_see_arguments(backend: str) -> None:
    @serve.deployment(
        request_router_config=_router(AtLeastServed, request_routing_stats_period_s=0.05)
    )
    class Counter:
        def __init__(self) -> None:
            self.served = 0

        def __call__(self, at_least: int) -> int:
            self.served += 1
            return self.served

        async def record_routing_stats(self) -> dict[str, Any]:
            return {"served": self.served}

    handle = serve.run(Counter.bind(), backend=backend, route_prefix=None)
    # Request k is routable only once the stats show k requests served.
    for k in range(3):
        assert handle.remote(k).result(timeout_s=30) == k + 1


def test_an_http_request_is_routed_by_the_custom_router(backend: str) -> None:
    @serve.deployment(
        request_router_config=_router(NamedByStats, request_routing_stats_period_s=0.1)
    )
    class Front:
        def __call__(self) -> str:
            return _replica_id()

        def record_routing_stats(self) -> dict[str, Any]:
            return {"me": _replica_id()}

    serve.run(Front.bind(), backend=backend, name="front", route_prefix="/front")
    response = httpx.get(f"{http_url()}/front", timeout=30)
    assert response.status_code == 200 and response.text.startswith("front#Front#")


def test_kwargs_reach_initialize_state_and_a_raising_router_fails_only_its_request(
    backend: str,
) -> None:
    config = _router(Picky, request_router_kwargs={"answer": 42, "names": ["a"]})

    @serve.deployment(num_replicas=2, request_router_config=config)
    class Model:
        def __call__(self) -> str:
            return "ok"

        def refused(self) -> str:
            return "never"

    handle = serve.run(Model.bind(), backend=backend, route_prefix=None)
    assert handle.remote().result() == "ok"  # Picky refuses all if its kwargs are wrong
    with pytest.raises(RequestRouterError) as failure:
        handle.refused.remote().result()
    message = str(failure.value)
    assert "Picky" in message and "ValueError: no replica for you" in message
    assert "'Model'" in message and "not sent" in message
    assert [handle.remote().result() for _ in range(3)] == ["ok"] * 3
    assert serve.status().applications["default"].deployments["Model"].status == "HEALTHY"


def test_a_router_that_cannot_start_fails_requests_until_a_redeploy_fixes_it(
    backend: str,
) -> None:
    @serve.deployment(request_router_config=_router(BrokenAtStart))
    class Model:
        def __call__(self) -> str:
            return "ok"

    handle = serve.run(Model.bind(), backend=backend, route_prefix=None)
    for _ in range(2):
        with pytest.raises(RequestRouterError, match="could not be set up here.*cannot start"):
            handle.remote().result()
    assert serve.status().applications["default"].deployments["Model"].status == "HEALTHY"
    fixed = _router(Picky, request_router_kwargs={"answer": 42, "names": ["a"]})
    handle = serve.run(
        Model.options(request_router_config=fixed).bind(), backend=backend, route_prefix=None
    )
    assert wait_for(lambda: _answers(handle), timeout_s=30)


def _answers(handle: Any) -> bool:
    try:
        return bool(handle.remote().result() == "ok")
    except RequestRouterError:
        return False


# -- the config -----------------------------------------------------------------------


def test_the_default_router_is_the_built_in_policy() -> None:
    assert RequestRouterConfig().router_spec() is None
    by_path = "tandem.request_router:PowerOfTwoChoicesRequestRouter"
    assert RequestRouterConfig(request_router_class=by_path).router_spec() is None
    assert _router(PowerOfTwoChoicesRequestRouter).router_spec() is None
    assert _router(PreferLast).router_spec() is not None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("no_such_module_here:Router", "cannot be imported"),
        (f"{__name__}:NoSuchRouter", "has no 'NoSuchRouter'"),
        ("Router", "import path like 'module:Class'"),
        (dict, "subclass of tandem.request_router.RequestRouter"),
        (RequestRouter, "does not implement"),
    ],
)
def test_a_router_class_that_cannot_route_is_refused_at_deployment_time(
    value: Any, words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        serve.deployment(request_router_config=RequestRouterConfig(request_router_class=value))


def test_request_router_kwargs_must_be_json() -> None:
    with pytest.raises(ValueError, match="JSON-serializable"):
        _router(PreferLast, request_router_kwargs={"f": object()})


def test_backoff_settings_reach_the_router() -> None:
    config = _router(PreferLast, initial_backoff_s=0.05, backoff_multiplier=3, max_backoff_s=1)
    router = _router_of(config)
    waits = [router._compute_backoff_s(attempt) for attempt in range(5)]
    assert waits == pytest.approx([0.05, 0.15, 0.45, 1.0, 1.0])


# -- the router's mechanics, with fake connections --------------------------------------

DEPLOYMENT = DeploymentID(app_name="app", name="Model")


class _Line:
    def __init__(self, info: ReplicaInfo) -> None:
        self.replica_id = info.replica_id

    async def call(self, meta: RequestMetadata, args: Any, kwargs: Any) -> Any:
        return None

    def stream(self, meta: RequestMetadata, args: Any, kwargs: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _set(
    config: RequestRouterConfig, *ids: str, room: int = 1, queued: int = -1, version: int = 1
) -> ReplicaSet:
    infos = tuple(ReplicaInfo(i, None, room) for i in ids)
    spec = config.router_spec()
    return ReplicaSet(DEPLOYMENT, infos, queued, version=version, request_router=spec)


def _meta(method: str = "__call__") -> RequestMetadata:
    return RequestMetadata("r1", "app", "Model", method_name=method)


def _router_of(config: RequestRouterConfig, *ids: str) -> Any:
    router = Router(DEPLOYMENT, _Line)
    router.update(_set(config, *(ids or ("a",))))
    assert router._custom is not None
    return router._custom.router


class Recording(RequestRouter):
    """Every replica in one rank; records what it hears."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.asked: list[str] = []
        self.routed: list[tuple[str, str]] = []
        self.completed: list[tuple[str, str]] = []

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Any = None
    ) -> list[list[RunningReplica]]:
        self.asked.append(pending_request.metadata.internal_request_id)
        return [sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)]

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        self.routed.append((replica_id.unique_id, pending_request.metadata.internal_request_id))

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self.completed.append((replica_id.unique_id, internal_request_id))


class FifoRecording(FIFOMixin, Recording):
    pass


def test_the_router_hears_of_each_request_it_routed_and_its_end() -> None:
    async def scenario() -> None:
        router = Router(DEPLOYMENT, _Line)
        router.update(_set(_router(Recording), "a", "b"))
        first = await router.assign(_meta())
        second = await router.assign(_meta())
        assert (first.info.replica_id, second.info.replica_id) == ("a", "b")
        user = router._custom.router
        router.release(second)
        router.release(first)
        assert [r for r, _ in user.routed] == ["a", "b"]
        assert sorted(user.completed) == sorted(user.routed)
        assert router._replicas["a"].in_flight == router._replicas["b"].in_flight == 0

    asyncio.run(scenario())


def test_a_replica_not_reached_is_dropped_from_the_routers_replicas() -> None:
    async def scenario() -> None:
        router = Router(DEPLOYMENT, _Line)
        router.update(_set(_router(Recording), "a", "b"))
        retried = await router.assign(_meta(), avoid={"a"})  # "a" could not be reached
        assert retried.info.replica_id == "b"
        assert [r.unique_id for r in router._custom.router.curr_replicas] == ["b"]

    asyncio.run(scenario())


@pytest.mark.parametrize("fifo", [True, False])
def test_fifo_routes_waiting_requests_in_arrival_order(fifo: bool) -> None:
    async def scenario() -> None:
        router = Router(DEPLOYMENT, _Line)
        router.update(_set(_router(FifoRecording if fifo else Recording), "a", room=1))
        busy = await router.assign(_meta())
        user = router._custom.router
        waiting = [asyncio.ensure_future(router.assign(_meta())) for _ in range(3)]
        await asyncio.sleep(0.05)  # let all three ask (and wait)
        askers = set(user.asked[1:])
        # FIFO: only the first waiting request asks the router; without it, all do.
        assert len(askers) == (1 if fifo else 3)
        router.release(busy)
        order = []
        for _ in range(3):
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            (task,) = done
            order.append(waiting.index(task))
            waiting[waiting.index(task)] = asyncio.ensure_future(asyncio.sleep(3600))
            router.release(task.result())
        if fifo:
            assert order == [0, 1, 2]
        for task in waiting:
            task.cancel()

    asyncio.run(scenario())


def test_waiting_requests_count_against_max_queued_requests() -> None:
    async def scenario() -> None:
        router = Router(DEPLOYMENT, _Line)
        router.update(_set(_router(Recording), "a", room=1, queued=1))
        busy = await router.assign(_meta())
        waiting = asyncio.ensure_future(router.assign(_meta()))
        await asyncio.sleep(0.05)
        assert router.queued == 1
        with pytest.raises(BackPressureError, match="max_queued_requests=1"):
            await router.assign(_meta())
        router.release(busy)
        router.release(await waiting)
        assert router.queued == 0

    asyncio.run(scenario())


def test_a_router_returning_no_ranks_is_a_clear_error() -> None:
    class NotRanks(RequestRouter):
        async def choose_replicas(
            self, candidate_replicas: Any, pending_request: Any = None
        ) -> Any:
            return candidate_replicas[0]

    async def scenario() -> None:
        router = Router(DEPLOYMENT, _Line)
        router.update(_set(_router(NotRanks), "a"))
        with pytest.raises(RequestRouterError, match="must return a list of lists"):
            await router.assign(_meta())
        assert router._replicas["a"].in_flight == 0

    asyncio.run(scenario())


def test_a_router_that_keeps_choosing_a_replica_that_left_is_a_clear_error() -> None:
    class Sticky(RequestRouter):
        kept: Any = None

        def update_replicas(self, replicas: list[RunningReplica]) -> None:
            super().update_replicas(replicas)
            self.kept = self.kept or replicas[0]

        async def _choose_replica_for_request(self, pending_request: Any, **kw: Any) -> Any:
            return self.kept  # even once it left: a bug of the router's

        async def choose_replicas(
            self, candidate_replicas: Any, pending_request: Any = None
        ) -> Any:
            return [candidate_replicas]

    async def scenario() -> None:
        config = _router(Sticky)
        router = Router(DEPLOYMENT, _Line)
        router.update(_set(config, "a"))
        router.update(_set(config, "b", version=2))
        with pytest.raises(RequestRouterError, match="keeps choosing replica a"):
            await router.assign(_meta())

    asyncio.run(scenario())


def test_a_subclass_of_the_default_router_routes_to_the_less_loaded() -> None:
    class Pow2(PowerOfTwoChoicesRequestRouter):
        pass

    async def scenario() -> None:
        router = Router(DEPLOYMENT, _Line)
        router.update(_set(_router(Pow2), "a", "b", room=10))
        busy = await router.assign(_meta())
        for _ in range(5):  # two replicas: both are always the two sampled
            other = await router.assign(_meta())
            assert other.info.replica_id != busy.info.replica_id
            router.release(other)

    asyncio.run(scenario())


class Tokens(RequestRouter):
    """The capacity-queue pattern of Ray Serve's guide: a token per free slot, taken
    before routing (overriding the routing loop) and given back when the request ends."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.taken: dict[str, int] = {}
        self.tokens: dict[str, str] = {}

    @property
    def supports_rejection_protocol(self) -> bool:
        return False

    async def _choose_replica_for_request(
        self, pending_request: Any, *, is_retry: bool = False
    ) -> RunningReplica:
        attempt = 0
        while True:
            while not self._replicas:
                self._replicas_updated_event.clear()
                await self._replicas_updated_event.wait()
            for replica_id, replica in sorted(self._replicas.items(), key=lambda i: i[0].unique_id):
                taken = self.taken.get(replica_id.unique_id, 0)
                if taken < replica.max_ongoing_requests:
                    self.taken[replica_id.unique_id] = taken + 1
                    self.tokens[pending_request.metadata.internal_request_id] = replica_id.unique_id
                    return replica
            await self._backoff(attempt)
            attempt += 1

    async def choose_replicas(self, candidate_replicas: Any, pending_request: Any = None) -> Any:
        return [candidate_replicas]  # not used: the routing loop is this router's own

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self.taken[self.tokens.pop(internal_request_id)] -= 1


def test_a_router_may_own_the_routing_loop_and_release_on_completion() -> None:
    async def scenario() -> None:
        config = _router(Tokens, initial_backoff_s=0.001)
        router = Router(DEPLOYMENT, _Line)
        router.update(_set(config))
        first = asyncio.ensure_future(router.assign(_meta()))
        await asyncio.sleep(0.01)
        assert not first.done()  # no replica yet: it waits for the replicas to change
        router.update(_set(config, "a", "b", version=2))
        a = await first
        b = await router.assign(_meta())
        assert (a.info.replica_id, b.info.replica_id) == ("a", "b")
        third = asyncio.ensure_future(router.assign(_meta()))
        await asyncio.sleep(0.01)
        assert not third.done()  # every token is taken
        router.release(a)
        assert (await third).info.replica_id == "a"
        assert router._custom.router.taken == {"a": 1, "b": 1}

    asyncio.run(scenario())


# -- the mixins, on replicas of the test's own ---------------------------------------


class Mux(MultiplexMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: Any, pending_request: Any = None) -> Any:
        return [candidate_replicas]


class Local(LocalityMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: Any, pending_request: Any = None) -> Any:
        return [candidate_replicas]


def _replicas(models: dict[str, set[str]], nodes: dict[str, str] | None = None) -> list[Any]:
    found = []
    for name, held in models.items():
        info = SimpleNamespace(
            replica_id=name, max_ongoing_requests=5, model_ids=frozenset(held), routing_stats={}
        )
        routed = SimpleNamespace(info=info, in_flight=0)
        node = (nodes or {}).get(name, "n1")
        found.append(RunningReplica(routed, ReplicaID(name, DEPLOYMENT), node))
    return found


def _pending(model: str = "") -> PendingRequest:
    from tandem._private.calls.request_routers import RoutingMetadata

    return PendingRequest([], {}, RoutingMetadata("r", "i", "app", "__call__", "", model))


def _ids(replicas: Any) -> list[str]:
    return sorted(
        r.unique_id if isinstance(r, ReplicaID) else r.replica_id.unique_id for r in replicas
    )


def test_multiplex_mixin_ranks_holders_then_the_emptiest_then_the_rest() -> None:
    router = Mux(deployment_id=DEPLOYMENT)
    replicas = _replicas({"a": {"m1"}, "b": {"m2", "m3"}, "c": set(), "d": set()})
    router.update_replicas(replicas)
    ranks = router.rank_replicas_via_multiplex(replicas=replicas, multiplexed_model_id="m1")
    assert [_ids(rank) for rank in ranks] == [["a"], ["c", "d"], ["b"]]


def test_multiplex_routing_tries_holders_then_the_emptiest_then_all() -> None:
    now = [100.0]
    router = Mux(deployment_id=DEPLOYMENT, get_curr_time_s=lambda: now[0])
    router.update_replicas(_replicas({"a": {"m1"}, "b": {"m2", "m3"}, "c": set()}))
    pending = _pending("m1")
    assert _ids(router.apply_multiplex_routing(pending)) == ["a"]
    assert _ids(router.apply_multiplex_routing(pending)) == ["c"]  # the holder was busy
    now[0] += 10  # past the matching timeout
    assert _ids(router.apply_multiplex_routing(pending)) == ["c"]
    assert _ids(router.apply_multiplex_routing(pending)) == ["a", "b", "c"]
    assert _ids(router.apply_multiplex_routing(None)) == ["a", "b", "c"]
    # A model nobody holds: the emptiest replicas at once.
    assert _ids(router.apply_multiplex_routing(_pending("new"))) == ["c"]


def test_locality_mixin_prefers_this_node_once_then_all() -> None:
    router = Local(deployment_id=DEPLOYMENT, self_node_id="n1", prefer_local_node_routing=True)
    replicas = _replicas({"a": set(), "b": set(), "c": set()}, nodes={"b": "n2", "c": "n3"})
    router.update_replicas(replicas)
    ranks = router.rank_replicas_via_locality(replicas=replicas)
    assert [_ids(rank) for rank in ranks] == [["a"], [], ["b", "c"]]
    pending = _pending()
    assert _ids(router.apply_locality_routing(pending)) == ["a"]
    assert not pending.routing_context.should_backoff  # widening: no wait before the next
    assert _ids(router.apply_locality_routing(pending)) == ["a", "b", "c"]
    assert pending.routing_context.should_backoff


def test_replicas_of_one_machine_are_on_the_routers_node() -> None:
    router = _router_of(_router(Local), "a", "b")
    (first, *_) = router.rank_replicas_via_locality(list(router.curr_replicas.values()))
    assert _ids(first) == ["a", "b"]


def test_the_public_module_names_what_ray_serves_does() -> None:
    import tandem.context
    import tandem.request_router

    assert sorted(tandem.request_router.__all__) == [
        "FIFOMixin",
        "LocalityMixin",
        "MultiplexMixin",
        "PendingRequest",
        "PowerOfTwoChoicesRequestRouter",
        "ReplicaID",
        "ReplicaResult",
        "RequestRouter",
        "RunningReplica",
    ]
    assert tandem.context._get_internal_replica_context() is None  # outside a replica


def test_replica_ids_read_as_in_ray_serve() -> None:
    replica_id = ReplicaID.from_full_id_str("app#Model#1a2b3c")
    assert replica_id == ReplicaID("1a2b3c", DeploymentID(app_name="app", name="Model"))
    assert replica_id.to_full_id_str() == "app#Model#1a2b3c"
    assert str(replica_id) == "Replica(id='1a2b3c', deployment='Model', app='app')"
    assert {replica_id: 1}[ReplicaID.from_full_id_str("app#Model#1a2b3c")] == 1


# -- record_routing_stats in the replica -----------------------------------------------


def test_a_failing_record_routing_stats_keeps_the_last_stats() -> None:
    results: list[Any] = [{"load": 1.0}, ValueError("broken"), "not a dict", {"load": 2.0}]

    async def record() -> Any:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    async def hang() -> Any:
        await asyncio.Event().wait()

    async def scenario() -> None:
        stats = RoutingStats(record, period_s=10, timeout_s=1, replica_id="r")
        assert stats.latest is None
        for expected in [1.0, 1.0, 1.0, 2.0]:
            await stats.record_once()
            assert stats.latest == {"load": expected}
        slow = RoutingStats(hang, period_s=10, timeout_s=0.01, replica_id="r")
        await slow.record_once()
        assert slow.latest is None

    asyncio.run(scenario())


def test_a_replica_whose_stats_fail_serves_on(backend: str) -> None:
    @serve.deployment(
        request_router_config=_router(PreferLast, request_routing_stats_period_s=0.05)
    )
    class Model:
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self) -> int:
            return self.calls

        def record_routing_stats(self) -> dict[str, Any]:
            self.calls += 1
            raise RuntimeError("no stats today")

    handle = serve.run(Model.bind(), backend=backend, route_prefix=None)
    assert wait_for(lambda: handle.remote().result() >= 3, timeout_s=30)  # called on schedule
