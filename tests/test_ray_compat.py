"""Small parts of Ray Serve's API that code written for it relies on."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import pytest

import tandem as serve
from tandem.schema import ReplicaRank


def test_importing_tandem_makes_starlette_requests_reachable() -> None:
    # Ray Serve code writes ``import starlette`` and then uses starlette.requests.Request.
    code = "import starlette, tandem; print(starlette.requests.Request.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Request"


def test_replica_rank_is_an_object_with_ray_fields(backend: str) -> None:
    @serve.deployment(num_replicas=2)
    class Shard:
        def __call__(self) -> tuple[Any, int]:
            ctx = serve.get_replica_context()
            return ctx.rank, ctx.world_size

    handle = serve.run(Shard.bind(), name="ranks", backend=backend)
    seen = {}
    for _ in range(100):
        rank, world_size = handle.remote().result()
        assert isinstance(rank, ReplicaRank)
        assert world_size == 2
        seen[rank.rank] = rank
        if len(seen) == 2:
            break
    assert sorted(seen) == [0, 1]
    assert all(r.node_rank == 0 and r.local_rank == r.rank for r in seen.values())


def test_reconfigure_that_takes_rank_gets_it_without_user_config(backend: str) -> None:
    @serve.deployment
    class Ranked:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, int]] = []

        def reconfigure(self, user_config: Any, rank: ReplicaRank) -> None:
            self.calls.append((user_config, rank.rank))

        def __call__(self) -> list[tuple[Any, int]]:
            return self.calls

    handle = serve.run(Ranked.bind(), name="rk", backend=backend)
    assert handle.remote().result() == [(None, 0)]


def test_reconfigure_gets_rank_with_user_config_and_old_style_stays_working(
    backend: str,
) -> None:
    @serve.deployment(user_config={"x": 1})
    class WithRank:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def reconfigure(self, config: Any, rank: ReplicaRank) -> None:
            self.calls.append((config, rank.rank))

        def __call__(self) -> list[Any]:
            return self.calls

    @serve.deployment(user_config={"y": 2})
    class OldStyle:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def reconfigure(self, config: Any) -> None:
            self.calls.append(config)

        def __call__(self) -> list[Any]:
            return self.calls

    assert serve.run(
        WithRank.bind(), name="wr", route_prefix=None, backend=backend
    ).remote().result() == [({"x": 1}, 0)]
    assert serve.run(
        OldStyle.bind(), name="os", route_prefix=None, backend=backend
    ).remote().result() == [{"y": 2}]


def test_handle_options_take_rays_transport_options() -> None:
    @serve.deployment
    def echo(x: int) -> int:
        return x

    handle = serve.run(echo.bind(), name="opts", backend="local")
    for options in (
        {"_by_reference": False},
        {"_by_reference": True},
        {"_prefer_local_routing": True},
        {"request_serialization": "cloudpickle", "response_serialization": "pickle"},
    ):
        assert handle.options(**options).remote(3).result() == 3
    with pytest.raises(ValueError, match="request_serialization='msgpack' is not supported"):
        handle.options(request_serialization="msgpack")


def test_sync_constructor_finds_the_replicas_running_loop(backend: str) -> None:
    # Ray Serve runs a sync __init__ on the replica's loop: code written for it
    # starts background tasks there.
    @serve.deployment
    class Background:
        def __init__(self) -> None:
            self.loop = asyncio.get_running_loop()
            self.ticks = 0
            self.task = asyncio.get_event_loop().create_task(self._tick())

        async def _tick(self) -> None:
            while True:
                self.ticks += 1
                await asyncio.sleep(0.01)

        async def __call__(self) -> tuple[bool, int]:
            return self.loop is asyncio.get_running_loop(), self.ticks

    handle = serve.run(Background.bind(), name="bg", route_prefix=None, backend=backend)
    same_loop, _ = handle.remote().result()
    assert same_loop
    deadline = time.monotonic() + 30
    while handle.remote().result()[1] < 3:
        assert time.monotonic() < deadline, "the task made in __init__ never ran"
        time.sleep(0.01)


def test_async_constructor_is_awaited(backend: str) -> None:
    @serve.deployment
    class AsyncInit:
        async def __init__(self, value: int) -> None:
            await asyncio.sleep(0)
            self.value = value

        def __call__(self) -> int:
            return self.value

    handle = serve.run(AsyncInit.bind(7), name="ai", route_prefix=None, backend=backend)
    assert handle.remote().result() == 7
