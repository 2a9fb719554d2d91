"""The router with routing policies passed in: exact choices, no real replicas."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from tandem._private.calls.context import DeploymentID, RequestMetadata
from tandem._private.calls.router import (
    PowerOfTwoChoices,
    ReplicaInfo,
    ReplicaSet,
    RoutedReplica,
    Router,
)

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


class LastById:
    """A policy of a test's own: always the replica with the greatest id."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def choose(self, candidates: Sequence[RoutedReplica], meta: RequestMetadata) -> RoutedReplica:
        self.seen.append(sorted(c.info.replica_id for c in candidates))
        return max(candidates, key=lambda c: c.info.replica_id)


def _meta(model: str = "") -> RequestMetadata:
    return RequestMetadata("r1", "app", "Model", multiplexed_model_id=model)


def _replicas(*ids: str, room: int = 2, models: dict[str, frozenset[str]] | None = None) -> Any:
    models = models or {}
    infos = tuple(ReplicaInfo(i, i, room, models.get(i, frozenset())) for i in ids)
    return ReplicaSet(DEPLOYMENT, infos, version=1)


def test_the_router_asks_its_policy_among_replicas_with_room() -> None:
    async def scenario() -> None:
        policy = LastById()
        router = Router(DEPLOYMENT, _Line, policy=policy)
        router.update(_replicas("a", "b", "c", room=1))
        chosen = [(await router.assign(_meta())).info.replica_id for _ in range(3)]
        assert chosen == ["c", "b", "a"]  # each one full after one request
        assert policy.seen == [["a", "b", "c"], ["a", "b"], ["a"]]

    asyncio.run(scenario())


def test_power_of_two_choices_prefers_the_less_loaded_and_the_model_holders() -> None:
    async def scenario() -> None:
        router = Router(DEPLOYMENT, _Line, policy=PowerOfTwoChoices(random.Random(7)))
        router.update(_replicas("a", "b", room=10, models={"b": frozenset({"m"})}))
        busy = await router.assign(_meta())  # two replicas: both are always the two sampled
        for _ in range(5):
            other = await router.assign(_meta())
            assert other.info.replica_id != busy.info.replica_id
            router.release(other)
        for _ in range(5):
            holder = await router.assign(_meta("m"))
            assert holder.info.replica_id == "b"
            router.release(holder)

    asyncio.run(scenario())
