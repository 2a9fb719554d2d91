"""The local backend: every replica is an object on this process's tandem loop.

A call is a coroutine hop (plus a thread-pool hop for sync methods), so this
is the fastest backend and the one for tests, notebooks and I/O-bound apps.

A worker thread still running a request its caller gave up on cannot be
killed here: stopping its replica leaves it behind (with a warning), and the
replacement replica has threads of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from tandem._private.backends.base import Backend, IgnoredOptions, ReplicaStartError
from tandem._private.calls.context import RequestMetadata
from tandem._private.calls.flow import Last, Opened
from tandem._private.calls.router import ReplicaConnection, ReplicaInfo
from tandem._private.replica.log_buffer import LogRead
from tandem._private.replica.replica import Replica, ReplicaFacts, ReplicaSpec

logger = logging.getLogger("tandem")


class LocalConnection:
    """Calls a replica in this process directly."""

    __slots__ = ("_replica", "replica_id")

    def __init__(self, replica: Replica) -> None:
        self.replica_id = replica.replica_id
        self._replica = replica

    async def call(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return await self._replica.call(meta, args, kwargs)

    def stream(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        return self._replica.stream(meta, args, kwargs)

    def http_request(
        self, meta: RequestMetadata, args: tuple[Any, ...]
    ) -> Awaitable[Last | Opened]:
        return self._replica.http_request(meta, args)

    def close(self) -> None:
        pass


class LocalBackend(Backend):
    name = "local"

    def __init__(self, runtime: Any = None) -> None:
        self._ignored = IgnoredOptions(self.name)
        # Set for an application in local testing mode that runs next to another
        # backend's runtime: its replicas' own calls go through this runtime.
        self.runtime = runtime

    async def start_replica(self, spec: ReplicaSpec) -> ReplicaInfo:
        self._ignored.runtime_env(spec)  # one process: no environment of its own
        self._ignored.placement(spec)
        replica = Replica(spec)
        if self.runtime is not None:
            replica.context = dataclasses.replace(replica.context, _runtime=self.runtime)
        replica.on_models_changed = lambda ids: self.events.models_changed(spec.replica_id, ids)
        try:
            await replica.start()
        except Exception as exc:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            await replica.stop(timeout_s=0)
            raise ReplicaStartError(spec.replica_id, exc, text) from exc
        except BaseException:  # cancelled while starting
            await replica.stop(timeout_s=0)
            raise
        return ReplicaInfo(spec.replica_id, replica, spec.options.max_ongoing_requests)

    async def stop_replica(self, info: ReplicaInfo, timeout_s: float) -> None:
        replica = _replica(info)
        await replica.stop(timeout_s)
        stuck = replica.abandoned_threads()
        if len(stuck) == 1:
            logger.warning(
                "A thread of replica %s is still running method %r after its caller gave up; "
                "it is abandoned.",
                info.replica_id,
                stuck[0],
            )
        elif stuck:
            logger.warning(
                "%d threads of replica %s are still running %s after their callers gave up; "
                "they are abandoned.",
                len(stuck),
                info.replica_id,
                _methods(stuck),
            )

    async def check_health(self, info: ReplicaInfo) -> None:
        await _replica(info).check_health()

    async def reconfigure(self, info: ReplicaInfo, user_config: Any) -> None:
        await _replica(info).reconfigure(user_config)

    async def set_rank(self, info: ReplicaInfo, rank: int, world_size: int) -> None:
        await _replica(info).set_rank(rank, world_size)

    def connect(self, info: ReplicaInfo) -> ReplicaConnection:
        return LocalConnection(_replica(info))

    def facts(self, info: ReplicaInfo) -> ReplicaFacts:
        return _replica(info).facts()  # read directly: refresh() has nothing to do

    async def logs(
        self, info: ReplicaInfo, after: int, limit: int, request_id: str | None = None
    ) -> LogRead:
        return _replica(info).log_buffer.read(after, limit, request_id)


def _replica(info: ReplicaInfo) -> Replica:
    replica = info.address
    assert isinstance(replica, Replica)
    return replica


def _methods(names: list[str]) -> str:
    distinct = sorted(set(names))
    return ("method " if len(distinct) == 1 else "methods ") + ", ".join(map(repr, distinct))
