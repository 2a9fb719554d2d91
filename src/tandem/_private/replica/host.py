"""A replica hosted away from the driver: what a replica process and a replica actor share.

The process backend's worker and the ray backend's actor are thin adapters over
:class:`ReplicaHost`; each maps its own messages (control and peer messages, or
Ray actor methods) to it. The host takes the :class:`StartSpec` the driver
sent, applies the driver's import path, builds and starts the :class:`Replica`;
serves calls and streams, each under its caller's token, by which the caller
may cancel it (even before it arrived) and, for a stream, report what it read
(streams go on only while their caller keeps up: see ``calls.flow``); obeys
health checks, reconfigure, rank and stop; reports its facts (pid, in-flight
and abandoned requests, stats) and its news, by long poll (:meth:`watch`): the
models the replica holds and the requests waiting in this process's routers;
and publishes replica sets to those routers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import sys
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from tandem._private import tracing
from tandem._private.calls.context import HTTP_METHOD, DeploymentID, RequestMetadata
from tandem._private.calls.flow import Credit, Last
from tandem._private.calls.inbound import InboundQueues
from tandem._private.calls.router import ReplicaSet
from tandem._private.calls.runtime import Runtime
from tandem._private.queues import wait_event
from tandem._private.replica.log_buffer import LogRead
from tandem._private.replica.replica import Replica, ReplicaFacts, ReplicaSpec
from tandem._private.replica.source_files import restore, source_file
from tandem._private.user_metrics import STORE

# How often the host looks for changes in the requests waiting in its routers.
QUEUE_REPORT_S = 0.2
# A watch returns after this long even when nothing changed.
WATCH_TIMEOUT_S = 30.0
# A cancellation that arrives before its request is remembered this long...
EARLY_CANCEL_TTL_S = 60.0
# ...once this many are remembered (until then, none is forgotten).
EARLY_CANCEL_KEPT = 1000


@dataclass(frozen=True)
class StartSpec:
    """What the driver sends a host to start its replica."""

    # The ReplicaSpec, cloudpickled: unpickled only once ``sys_path`` applies, as
    # it refers to the user's modules.
    replica: bytes
    sys_path: list[str]  # the driver's
    directory: list[ReplicaSet]  # every deployment's replica set, for the replica's handles
    driver_path_first: bool  # see add_driver_path
    source_file: str | None = None  # where the deployment's class is (source_files.py)

    @classmethod
    def of(
        cls, spec: ReplicaSpec, directory: Iterable[ReplicaSet], driver_path_first: bool
    ) -> StartSpec:
        """The start spec of ``spec``, taken in the driver."""
        return cls(
            cloudpickle.dumps(spec),
            list(sys.path),
            list(directory),
            driver_path_first,
            source_file(spec.target),
        )


def add_driver_path(path: list[str], first: bool) -> None:
    """Let this process import what the driver imports, from the driver's ``sys.path``
    (entries that do not exist here are skipped).

    ``first``: the driver's entries go first, in the driver's order, and this
    process's others after them. A replica process does this: it runs the
    driver's interpreter on the driver's machine, so it should resolve every
    import as the driver does, including a module of the user's that shadows an
    installed package. Otherwise they are appended: a Ray actor's own entries
    come first, because they are where it really runs (the runtime_env's
    working_dir, py_modules and pip packages, the node's environment), which
    the driver's paths must not shadow.
    """
    wanted = [entry for entry in path if not entry or os.path.exists(entry)]
    if first:
        sys.path[:] = [*wanted, *(entry for entry in sys.path if entry not in wanted)]
    else:
        sys.path.extend(entry for entry in wanted if entry not in sys.path)


class ReplicaHost:
    """Hosts one :class:`Replica` for an adapter (see the module docstring).

    Builds nothing until :meth:`start`; :meth:`stop` ends what start began.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._replica: Replica | None = None
        # Requests running here by their caller's token, for cancel(); and
        # cancellations that overtook their request (token -> when they arrived).
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._cancelled_early: dict[str, float] = {}
        self._credits: dict[str, Credit] = {}  # streams served here, by token
        self._inbound = InboundQueues(runtime)  # their stream arguments (calls.inbound)
        # News for watch(): its version, and an event set (then replaced) when it changes.
        self._version = 0
        self._news = asyncio.Event()
        self._queued: dict[DeploymentID, int] = {}
        self._reporting: asyncio.Task[None] | None = None

    @property
    def replica(self) -> Replica:
        if self._replica is None:
            raise RuntimeError("This replica host has not been started yet.")
        return self._replica

    # -- lifecycle ---------------------------------------------------------

    async def start(self, spec: StartSpec) -> None:
        """Build the replica and start it; raises what its constructor raises."""
        add_driver_path(spec.sys_path, spec.driver_path_first)
        tracing.configure()  # after the driver's path: exporters may come from there
        for replica_set in spec.directory:
            self._runtime.publish(replica_set)
        replica_spec: ReplicaSpec = pickle.loads(spec.replica)
        restore(replica_spec.target, spec.source_file)
        replica = self._replica = Replica(replica_spec)
        replica.on_models_changed = lambda _ids: self._changed()
        await replica.start()
        self._reporting = asyncio.ensure_future(self._report_queues())

    async def stop(self, timeout_s: float) -> None:
        """Drain (up to ``timeout_s``) and destroy the replica."""
        reporting, self._reporting = self._reporting, None
        if reporting is not None:
            reporting.cancel()
            await asyncio.gather(reporting, return_exceptions=True)
        if self._replica is not None:
            await self._replica.stop(timeout_s)
        if tracing.SPANS is not None:  # this process may end without its exit handlers
            await asyncio.to_thread(tracing.flush)

    # -- requests ----------------------------------------------------------

    async def call(
        self,
        token: str | None,
        meta: RequestMetadata,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Serve one unary call; ``token`` (if any) lets its caller :meth:`cancel` it."""
        replica = self.replica
        args, kwargs, inbound = self._inbound.claim(args, kwargs)
        try:
            if token is None:  # cancelled by whoever runs it (the process wire does)
                return await replica.call(meta, args, kwargs)
            self._begin(token)
            try:
                return await replica.call(meta, args, kwargs)
            finally:
                self._running.pop(token, None)
        finally:
            if inbound is not None:
                await self._inbound.release(inbound)

    async def stream(
        self,
        token: str,
        meta: RequestMetadata,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> AsyncGenerator[Any, None]:
        """Serve one streaming call, as far ahead of its caller as it has credit:
        the caller reports what it read with :meth:`read`."""
        replica = self.replica
        args, kwargs, inbound = self._inbound.claim(args, kwargs)
        try:
            self._begin(token)
            credit = self._credits[token] = Credit()
            source: AsyncGenerator[Any, None] | None = None
            try:
                if meta.method_name == HTTP_METHOD and inbound is None:
                    # An HTTP request: most answers are whole, with no stream in between.
                    answered = await replica.http_request(meta, args)
                    if isinstance(answered, Last):
                        yield answered
                        return
                    source = answered.rest
                    yield answered.first
                    await credit.sent()
                else:
                    source = replica.stream(meta, args, kwargs)
                async for item in source:
                    yield item
                    await credit.sent()
            finally:
                self._running.pop(token, None)
                self._credits.pop(token, None)
                if source is not None:
                    await source.aclose()
        finally:
            if inbound is not None:
                await self._inbound.release(inbound)

    async def push(
        self, token: str, items: list[Any], end: bool, error: BaseException | None
    ) -> bool:
        """Items for the inbound argument ``token`` of a stream served here; returns
        once the stream has room for more (False: it ended, send no more)."""
        return await self._inbound.push(token, items, end, error)

    def read(self, token: str, count: int) -> None:
        """The caller of stream ``token`` read ``count`` more items (late reports are dropped)."""
        credit = self._credits.get(token)
        if credit is not None:
            credit.read(count)

    def cancel(self, token: str) -> None:
        """Cancel the request the caller knows as ``token``, even if it has not arrived yet."""
        task = self._running.get(token)
        if task is not None:
            task.cancel()
            return
        now = time.monotonic()
        self._cancelled_early[token] = now
        if len(self._cancelled_early) > EARLY_CANCEL_KEPT:
            self._cancelled_early = {
                t: at for t, at in self._cancelled_early.items() if now - at < EARLY_CANCEL_TTL_S
            }

    def _begin(self, token: str) -> None:
        if self._cancelled_early.pop(token, None) is not None:
            raise asyncio.CancelledError
        task = asyncio.current_task()
        assert task is not None
        self._running[token] = task

    # -- control -----------------------------------------------------------

    async def check_health(self) -> ReplicaFacts:
        """Raise if the replica is unhealthy; else its facts."""
        await self.replica.check_health()
        return self.facts()

    def facts(self) -> ReplicaFacts:
        """What the driver shows of this replica (status, metrics)."""
        replica = self._replica
        facts = ReplicaFacts(pid=os.getpid()) if replica is None else replica.facts()
        # The process is the replica's alone: its metrics made outside the replica
        # (e.g. at module level) are reported with it too.
        return dataclasses.replace(
            facts,
            user_metrics=STORE.report_all(),
            caller_drops=self._runtime.deadline_drops() or None,
        )

    def logs(self, after: int, limit: int, request_id: str | None) -> LogRead:
        """The replica's recent log lines (``Backend.logs``)."""
        replica = self._replica
        if replica is None:
            return LogRead([], 0)
        return replica.log_buffer.read(after, limit, request_id)

    async def reconfigure(self, user_config: Any) -> None:
        await self.replica.reconfigure(user_config)

    async def set_rank(self, rank: int, world_size: int) -> None:
        await self.replica.set_rank(rank, world_size)

    def publish(self, replica_set: ReplicaSet) -> None:
        """A deployment's replica set changed: tell this process's routers."""
        self._runtime.publish(replica_set)

    # -- news --------------------------------------------------------------

    async def watch(self, version: int) -> tuple[int, dict[str, Any]]:
        """Once there is news after ``version`` (or WATCH_TIMEOUT_S passed): the
        version now, the model ids the replica holds and the requests waiting in
        this process's routers per deployment."""
        if version == self._version:
            await wait_event(self._news, WATCH_TIMEOUT_S)
        replica = self._replica
        models = replica.loaded_model_ids() if replica is not None else frozenset()
        return self._version, {"models": models, "queued": dict(self._queued)}

    def _changed(self) -> None:
        self._version += 1
        news, self._news = self._news, asyncio.Event()
        news.set()

    async def _report_queues(self) -> None:
        while True:
            await asyncio.sleep(QUEUE_REPORT_S)
            queued = self._runtime.all_queued()
            if queued != self._queued:
                self._queued = queued
                self._changed()
