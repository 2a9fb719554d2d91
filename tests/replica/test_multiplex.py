"""``@serve.multiplexed`` and ``serve.get_multiplexed_model_id()``.

A per-replica LRU cache of models keyed by the request's model id: models load
once, the least recently used one is evicted (its ``aclose()`` awaited),
concurrent requests for a model being loaded share one load, failed loads are
not cached.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import tandem as serve
from tandem._private.app.options import DeploymentOptions
from tandem._private.calls.context import DeploymentID, RequestMetadata
from tandem._private.replica.replica import Replica, ReplicaSpec
from tandem.exceptions import ReplicaUnavailableError
from tandem.handle import DeploymentHandle


class _Model:
    def __init__(self, model_id: str, closed: list[str]) -> None:
        self.model_id = model_id
        self._closed = closed

    def predict(self, x: Any) -> str:
        return f"{self.model_id}:{x}"

    async def aclose(self) -> None:
        await asyncio.sleep(0)
        self._closed.append(self.model_id)


@serve.deployment
class _Multi:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.closed: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> _Model:
        self.loads.append(model_id)
        return _Model(model_id, self.closed)

    async def __call__(self, x: Any) -> str:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return model.predict(x)

    def stats(self) -> dict[str, list[str]]:
        return {"loads": list(self.loads), "closed": list(self.closed)}


def _call(handle: Any, model_id: str, *args: Any) -> Any:
    return handle.options(multiplexed_model_id=model_id).remote(*args).result(timeout_s=5)


def test_models_load_once_and_are_reused(backend: str) -> None:
    handle = serve.run(_Multi.bind(), backend=backend)
    for model_id in ["a", "b", "a", "b", "a"]:
        assert _call(handle, model_id, 7) == f"{model_id}:7"
    assert handle.stats.remote().result() == {"loads": ["a", "b"], "closed": []}


def test_least_recently_used_model_is_evicted_and_closed(backend: str) -> None:
    handle = serve.run(_Multi.bind(), backend=backend)
    for model_id in ["a", "b", "a", "c"]:
        assert _call(handle, model_id, 1) == f"{model_id}:1"
    # b was the least recently used when c arrived
    assert handle.stats.remote().result() == {"loads": ["a", "b", "c"], "closed": ["b"]}

    assert _call(handle, "a", 1) == "a:1"  # still loaded
    assert _call(handle, "c", 1) == "c:1"  # still loaded
    assert handle.stats.remote().result()["loads"] == ["a", "b", "c"]

    assert _call(handle, "b", 1) == "b:1"  # reloaded, evicting a (used before c)
    assert handle.stats.remote().result() == {
        "loads": ["a", "b", "c", "b"],
        "closed": ["b", "a"],
    }


def test_get_multiplexed_model_id(backend: str) -> None:
    @serve.deployment
    class Echo:
        def sync_id(self) -> str:
            return serve.get_multiplexed_model_id()

        async def async_id(self) -> str:
            return serve.get_multiplexed_model_id()

    handle = serve.run(Echo.bind(), backend=backend)
    assert handle.sync_id.remote().result() == ""
    assert handle.async_id.remote().result() == ""
    with_id = handle.options(multiplexed_model_id="model-42")
    assert with_id.sync_id.remote().result() == "model-42"
    assert with_id.async_id.remote().result() == "model-42"
    # options() returned a new handle; the original still sends no model id
    assert handle.async_id.remote().result() == ""


def test_get_multiplexed_model_id_outside_a_request_is_empty() -> None:
    assert serve.get_multiplexed_model_id() == ""


def test_model_id_travels_through_a_chain(backend: str) -> None:
    @serve.deployment
    class Downstream:
        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str) -> str:
            return f"model {model_id}"

        async def __call__(self) -> str:
            return await self.get_model(serve.get_multiplexed_model_id())

    @serve.deployment
    class Upstream:
        def __init__(self, down: Any) -> None:
            self.down = down

        async def __call__(self) -> str:
            model_id = serve.get_multiplexed_model_id()
            return await self.down.options(multiplexed_model_id=model_id).remote()

    handle = serve.run(Upstream.bind(Downstream.bind()), backend=backend)
    assert _call(handle, "x") == "model x"


def test_concurrent_requests_for_a_loading_model_share_one_load(backend: str) -> None:
    @serve.deployment(max_ongoing_requests=10)
    class SlowLoad:
        def __init__(self) -> None:
            self.loads = 0

        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str) -> str:
            self.loads += 1
            await asyncio.sleep(0.2)
            return f"loaded {model_id}"

        async def __call__(self) -> str:
            return await self.get_model(serve.get_multiplexed_model_id())

        def load_count(self) -> int:
            return self.loads

    handle = serve.run(SlowLoad.bind(), backend=backend)
    m = handle.options(multiplexed_model_id="m")
    responses = [m.remote() for _ in range(5)]
    assert [r.result(timeout_s=5) for r in responses] == ["loaded m"] * 5
    assert handle.load_count.remote().result() == 1


class _LoadFailed(Exception):
    pass


def test_failed_load_is_not_cached_and_reaches_caller(backend: str) -> None:
    @serve.deployment
    class Flaky:
        def __init__(self) -> None:
            self.attempts = 0

        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str) -> str:
            self.attempts += 1
            if self.attempts == 1:
                raise _LoadFailed(f"download of {model_id} failed")
            return f"model {model_id}"

        async def __call__(self) -> str:
            return await self.get_model(serve.get_multiplexed_model_id())

        def attempt_count(self) -> int:
            return self.attempts

    handle = serve.run(Flaky.bind(), backend=backend)
    with pytest.raises(_LoadFailed, match="download of m failed"):
        _call(handle, "m")
    assert _call(handle, "m") == "model m"
    assert _call(handle, "m") == "model m"
    assert handle.attempt_count.remote().result() == 2


@serve.multiplexed(max_num_models_per_replica=2)
async def _load_model(model_id: str) -> Any:
    _module_loads.append(model_id)
    return lambda x: f"{model_id}({x})"


_module_loads: list[str] = []


@serve.deployment
class _MultiModel:
    async def __call__(self, x: Any) -> str:
        model = await _load_model(serve.get_multiplexed_model_id())
        return model(x)


def test_module_level_multiplexed_function() -> None:
    # The seed's pattern; the load log lives in this process, so local backend only.
    _module_loads.clear()
    handle = serve.run(_MultiModel.bind(), backend="local")
    for model_id in ["a", "b", "a", "b"]:
        assert _call(handle, model_id, 3) == f"{model_id}(3)"
    assert _module_loads == ["a", "b"]
    assert _call(handle, "c", 1) == "c(1)"  # evicts a
    assert _call(handle, "b", 1) == "b(1)"
    assert _call(handle, "a", 1) == "a(1)"
    assert _module_loads == ["a", "b", "c", "a"]


@pytest.mark.parametrize("bad", [0, -2, "2", 1.5, True])
def test_invalid_max_num_models_raises_value_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_num_models_per_replica"):
        serve.multiplexed(max_num_models_per_replica=bad)


def test_non_async_loader_raises_type_error() -> None:
    with pytest.raises(TypeError, match="async"):

        @serve.multiplexed(max_num_models_per_replica=2)
        def load(model_id: str) -> str:
            return model_id

    with pytest.raises(TypeError, match="async"):

        class Model:
            @serve.multiplexed
            def get_model(self, model_id: str) -> str:
                return model_id


def test_concurrent_loads_of_different_models_respect_the_limit(backend: str) -> None:
    @serve.deployment(max_ongoing_requests=10)
    class SlowMulti:
        def __init__(self) -> None:
            self.loads: list[str] = []
            self.closed: list[str] = []

        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str) -> _Model:
            self.loads.append(model_id)
            await asyncio.sleep(0.2)
            return _Model(model_id, self.closed)

        async def __call__(self) -> str:
            model = await self.get_model(serve.get_multiplexed_model_id())
            return model.predict(0)

        def live_models(self) -> int:
            return len(self.loads) - len(self.closed)

    handle = serve.run(SlowMulti.bind(), backend=backend)
    assert _call(handle, "a") == "a:0"
    responses = [handle.options(multiplexed_model_id=m).remote() for m in ("b", "c")]
    assert [r.result(timeout_s=5) for r in responses] == ["b:0", "c:0"]
    assert handle.live_models.remote().result() <= 2


def test_cancelling_the_loading_request_does_not_fail_other_waiters(backend: str) -> None:
    @serve.deployment(max_ongoing_requests=10)
    class SlowLoad:
        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str) -> str:
            await asyncio.sleep(0.3)
            return f"loaded {model_id}"

        async def __call__(self) -> str:
            return await self.get_model(serve.get_multiplexed_model_id())

    handle = serve.run(SlowLoad.bind(), backend=backend).options(multiplexed_model_id="m")
    first = handle.remote()
    time.sleep(0.05)  # first is now loading "m"
    second = handle.remote()
    time.sleep(0.05)  # second now waits for that load
    first.cancel()
    assert second.result(timeout_s=3) == "loaded m"


# -- model-aware routing -------------------------------------------------------------------


@serve.deployment(num_replicas=2, max_ongoing_requests=4)
class TwoSlotModels:
    def __init__(self) -> None:
        self.loads = 0

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        self.loads += 1
        await asyncio.sleep(0.02)
        return model_id

    async def __call__(self, hold_s: float = 0.0) -> str:
        model = await self.get_model(serve.get_multiplexed_model_id())
        await asyncio.sleep(hold_s)
        return f"{model}@{serve.get_replica_context().replica_id}"

    def load_count(self) -> tuple[str, int]:
        return serve.get_replica_context().replica_id, self.loads


def _loads_per_replica(handle: DeploymentHandle) -> dict[str, int]:
    loads: dict[str, int] = {}
    deadline = time.monotonic() + 10
    while len(loads) < 2 and time.monotonic() < deadline:
        replica_id, count = handle.load_count.remote().result(timeout_s=5)
        loads[replica_id] = count
    return loads


def test_requests_go_to_replicas_that_hold_their_model(backend: str) -> None:
    handle = serve.run(TwoSlotModels.bind(), backend=backend, route_prefix=None)
    models = ["a", "b", "c", "d"]
    for i in range(80):
        model = models[i % 4]
        assert (
            handle.options(multiplexed_model_id=model)
            .remote()
            .result(timeout_s=5)
            .startswith(model)
        )
    loads = _loads_per_replica(handle)
    # Random routing would keep evicting; model-aware routing loads each model once.
    assert sum(loads.values()) <= 8, loads


def test_a_hot_model_spreads_to_a_second_replica_when_the_first_is_busy(backend: str) -> None:
    @serve.deployment(num_replicas=2, max_ongoing_requests=1)
    class Hot:
        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str) -> str:
            return model_id

        async def __call__(self) -> str:
            await self.get_model(serve.get_multiplexed_model_id())
            await asyncio.sleep(0.3)
            return serve.get_replica_context().replica_id

    handle = serve.run(Hot.bind(), backend=backend, route_prefix=None).options(
        multiplexed_model_id="hot"
    )
    handle.remote().result(timeout_s=5)  # one replica now holds "hot"
    responses = [handle.remote() for _ in range(4)]
    replicas = {r.result(timeout_s=10) for r in responses}
    assert len(replicas) == 2, "the busy holder's load did not spread to the other replica"


# -- stopping a replica unloads its models -----------------------------------


class _Recorded:
    """A model that notes its unloading in a file (replicas may live in other processes)."""

    def __init__(self, model_id: str, path: str) -> None:
        self.model_id = model_id
        self._path = path

    async def aclose(self) -> None:
        await asyncio.sleep(0)
        with open(self._path, "a") as notes:
            notes.write(f"{self.model_id}\n")


class _NoUnload:
    """A model without aclose(): dropped on stop, as on eviction."""


@serve.deployment
class _Unloading:
    def __init__(self, path: str) -> None:
        self.path = path

    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str) -> Any:
        return _NoUnload() if model_id == "plain" else _Recorded(model_id, self.path)

    async def __call__(self) -> str:
        await self.get_model(serve.get_multiplexed_model_id())
        return serve.get_multiplexed_model_id()


def test_stopping_a_replica_unloads_every_model_it_holds(backend: str, tmp_path: Path) -> None:
    notes = tmp_path / "unloaded"
    handle = serve.run(
        _Unloading.bind(str(notes)), name="unload", route_prefix=None, backend=backend
    )
    for model_id in ["a", "plain", "b"]:
        assert _call(handle, model_id) == model_id
    assert not notes.exists()
    serve.delete("unload")
    assert notes.read_text().split() == ["a", "b"]  # least recently used first


def _spec(target: type, **options: Any) -> ReplicaSpec:
    return ReplicaSpec(
        replica_id="app#Model#r1",
        deployment_id=DeploymentID(app_name="app", name="Model"),
        target=target,
        init_args=(),
        init_kwargs={},
        options=DeploymentOptions(**options),
    )


class _Busy:
    def __init__(self) -> None:
        self.closed: list[str] = []
        self.release = asyncio.Event()

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> _Model:
        return _Model(model_id, self.closed)

    async def __call__(self) -> str:
        model = await self.get_model(serve.get_multiplexed_model_id())
        await self.release.wait()
        return model.model_id

    async def ping(self) -> None:
        pass


def test_models_are_unloaded_after_the_replica_drained() -> None:
    async def scenario() -> None:
        replica = Replica(_spec(_Busy))
        await replica.start()
        busy: _Busy = replica.servable
        meta = RequestMetadata("r1", "app", "Model", multiplexed_model_id="a")
        request = asyncio.ensure_future(replica.call(meta, (), {}))
        while replica.loaded_model_ids() != {"a"}:
            await asyncio.sleep(0.005)
        stopping = asyncio.ensure_future(replica.stop(timeout_s=30))
        refused = False
        while not refused:  # the replica drains once it turns new requests away
            try:
                await replica.call(RequestMetadata("r2", "app", "Model", "ping"), (), {})
            except ReplicaUnavailableError:
                refused = True
            await asyncio.sleep(0.005)
        assert busy.closed == []  # the request in flight still uses its model
        busy.release.set()
        assert await request == "a"
        await stopping
        assert busy.closed == ["a"]

    asyncio.run(scenario())


class _Stubborn:
    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str) -> Any:
        return _Broken() if model_id == "broken" else _Model(model_id, self.closed)

    def __init__(self) -> None:
        self.closed: list[str] = []

    async def __call__(self) -> None:
        await self.get_model(serve.get_multiplexed_model_id())


class _Broken:
    async def aclose(self) -> None:
        raise RuntimeError("cannot unload")


def test_a_model_that_fails_to_unload_does_not_keep_the_others_loaded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> list[str]:
        replica = Replica(_spec(_Stubborn))
        await replica.start()
        stubborn: _Stubborn = replica.servable
        for model_id in ["broken", "a"]:
            meta = RequestMetadata(model_id, "app", "Model", multiplexed_model_id=model_id)
            await replica.call(meta, (), {})
        await replica.stop(timeout_s=5)
        return stubborn.closed

    assert asyncio.run(scenario()) == ["a"]
    assert "Unloading model 'broken' failed" in caplog.text
