"""``@multiplexed``: a per-replica LRU cache of models, keyed by model id.

Concurrent requests for a model that is being loaded wait for that one load;
a load that raises is not cached; the least recently used model is evicted
(its ``aclose()`` awaited, if it has one) to make room for a new one. When
the replica stops, after it drained, every model it holds is unloaded the same
way (:meth:`ModelCache.clear`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tandem._private.replica.replica import current_replica
from tandem._private.stats import ModelStats

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

logger = logging.getLogger("tandem")


class ModelCache:
    """The loaded models of one loader in one replica."""

    def __init__(
        self,
        capacity: int,
        on_change: Callable[[], None] | None = None,
        stats: ModelStats | None = None,
    ) -> None:
        self.capacity = capacity
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Any]] = {}
        self._on_change = on_change or (lambda: None)
        self._stats = stats or ModelStats()  # the replica's, for /metrics

    def model_ids(self) -> list[str]:
        """Models loaded or being loaded: a request for one of these is best sent here."""
        return [*self._models, *(m for m in self._loading if m not in self._models)]

    async def get(self, model_id: str, load: Callable[[], Awaitable[Any]]) -> Any:
        self._stats.get_model_requests += 1
        if model_id in self._models:
            self._models.move_to_end(model_id)
            return self._models[model_id]
        loading = self._loading.get(model_id)
        if loading is None:
            # The load is a task of its own: a caller that is cancelled while it waits
            # leaves the load (and everyone else waiting for it) alone.
            loading = asyncio.ensure_future(self._load(model_id, load))
            loading.add_done_callback(_retrieve)
            self._loading[model_id] = loading
            self._on_change()
        return await asyncio.shield(loading)

    async def _load(self, model_id: str, load: Callable[[], Awaitable[Any]]) -> Any:
        try:
            # Make room first, counting loads in flight, so memory stays bounded.
            while (
                self.capacity > 0
                and self._models
                and len(self._models) + len(self._loading) > self.capacity
            ):
                await self._evict_oldest()
            started = time.perf_counter()
            try:
                model = await load()
            except BaseException:
                self._stats.loads.observe(time.perf_counter() - started, failed=True)
                raise
            self._stats.loads.observe(time.perf_counter() - started, failed=False)
        except BaseException:
            del self._loading[model_id]
            self._on_change()
            raise
        del self._loading[model_id]
        self._models[model_id] = model
        while self.capacity > 0 and len(self._models) > self.capacity:
            await self._evict_oldest()
        self._on_change()
        return model

    async def _evict_oldest(self) -> None:
        _, evicted = self._models.popitem(last=False)
        await self._unload(evicted)

    async def _unload(self, model: Any) -> None:
        started = time.perf_counter()
        failed = True
        try:
            await _unload(model)
            failed = False
        finally:
            self._stats.unloads.observe(time.perf_counter() - started, failed)

    async def clear(self) -> None:
        """Unload every model, oldest first, once the loads in flight end (the replica
        stops). A model that fails to unload is logged; the others still unload."""
        if self._loading:
            await asyncio.wait(list(self._loading.values()))
        while self._models:
            model_id, model = self._models.popitem(last=False)
            try:
                await self._unload(model)
            except Exception:
                logger.exception("Unloading model %r failed", model_id)
        self._on_change()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _unload(model: Any) -> None:
    close = getattr(model, "aclose", None)
    if close is not None and inspect.iscoroutinefunction(close):
        await close()


def multiplexed(func: F | None = None, *, max_num_models_per_replica: int = 3) -> Any:
    """Cache what an async loader returns, per replica, by model id (LRU).

    Decorate an ``async def`` method ``(self, model_id)`` or function
    ``(model_id)``; ``max_num_models_per_replica=-1`` means no limit.
    """
    if (
        isinstance(max_num_models_per_replica, bool)
        or not isinstance(max_num_models_per_replica, int)
        or (max_num_models_per_replica < 1 and max_num_models_per_replica != -1)
    ):
        raise ValueError(
            "max_num_models_per_replica must be an integer >= 1 (or -1 for no limit), "
            f"got {max_num_models_per_replica!r}."
        )

    def decorate(loader: F) -> F:
        if not inspect.iscoroutinefunction(loader):
            raise TypeError(
                f"@multiplexed needs an async function; make {loader.__name__!r} `async def`."
            )
        params = list(inspect.signature(loader).parameters)
        is_method = bool(params) and params[0] == "self"
        fallback: dict[Any, ModelCache] = {}

        @functools.wraps(loader)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            owner = args[0] if is_method else None
            rest = args[1:] if is_method else args
            model_id = rest[0] if rest else kwargs.get("model_id", "")
            if not isinstance(model_id, str) or not model_id:
                raise ValueError(
                    f"{loader.__name__}() needs a non-empty model id; send requests with "
                    "handle.options(multiplexed_model_id=...) or the serve_multiplexed_model_id "
                    "header and pass get_multiplexed_model_id()."
                )
            replica = current_replica()
            caches = replica.multiplex_caches if replica is not None else fallback
            key = (wrapper, id(owner))
            cache = caches.get(key)
            if cache is None:
                cache = caches[key] = ModelCache(
                    max_num_models_per_replica,
                    replica.models_changed if replica is not None else None,
                    replica.stats.models if replica is not None else None,
                )
            return await cache.get(model_id, lambda: loader(*args, **kwargs))

        return wrapper  # type: ignore[return-value]

    if func is not None:
        return decorate(func)
    return decorate
