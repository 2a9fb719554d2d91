"""The ray backend: every replica is a Ray actor, placed by Ray across a cluster.

The controller and the HTTP proxy stay in the driver (the ``tandem run``
process); only the replicas move. Each replica is a :class:`ReplicaActor`
created with the deployment's ``ray_actor_options`` (num_cpus, num_gpus,
memory, resources, accelerator_type, runtime_env). Routers in the driver and
in every actor call replica actors directly (see ray_connection.py); the
driver publishes replica sets to every actor.

Ray is connected on first use, as :class:`RayOptions` say (``tandem run
--address/--working-dir/--runtime-env-json`` build them): to the cluster at the
address (else $RAY_ADDRESS), else to a new local Ray of tandem's own, with the
job's runtime_env, which every replica inherits.
A Ray session this backend started ends with ``tandem.shutdown()``; one the
user started (``ray.init`` before ``tandem.run``) is left running.

This module imports Ray; nothing else in tandem's core does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import traceback
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from tandem._private import tracing
from tandem._private.backends import RayOptions
from tandem._private.backends.base import Backend, BackendEvents, ReplicaStartError
from tandem._private.backends.process.frames import RemoteTraceback, picklable_starlette
from tandem._private.backends.ray import placement
from tandem._private.backends.ray.actor import ReplicaActor
from tandem._private.backends.ray.connection import RayAddress, RayConnection, unwrap
from tandem._private.backends.ray.session import connect_ray
from tandem._private.calls.context import DeploymentID
from tandem._private.calls.router import ReplicaConnection, ReplicaInfo, ReplicaSet
from tandem._private.replica.host import StartSpec
from tandem._private.replica.log_buffer import LogRead
from tandem._private.replica.replica import ReplicaFacts, ReplicaSpec
from tandem.exceptions import ReplicaUnavailableError

logger = logging.getLogger("tandem")

# Concurrent actor tasks per replica: enough for max_ongoing_requests from many
# callers plus the control calls; the replica itself enforces max_ongoing_requests.
MAX_CONCURRENCY = 10_000
# A replica waiting this long for the cluster's resources is reported in the log.
PENDING_WARNING_S = 10.0
# How long stopping a replica waits for Ray to report its actor dead.
STOP_WAIT_S = 5.0


@functools.cache
def _remote_replica() -> Any:
    """The replica actor class as Ray knows it (made on first use, not at import)."""
    return ray.remote(ReplicaActor)


@dataclass
class _Actor:
    replica_id: str
    handle: Any
    stopping: bool = False
    report: ReplicaFacts = field(default_factory=ReplicaFacts)
    queued: dict[DeploymentID, int] = field(default_factory=dict)
    watcher: asyncio.Task[None] | None = None
    address: RayAddress | None = None
    group: Any = None  # its placement group (placement_group_bundles), removed with it


class RayBackend(Backend):
    name = "ray"

    def __init__(self, options: RayOptions | None = None) -> None:
        self._options = options or RayOptions()
        self._actors: dict[str, _Actor] = {}
        self._directory: dict[DeploymentID, ReplicaSet] = {}
        self._started_ray = False

    def prepare(self) -> None:
        # In the caller's thread (usually the main one), where Ray wants to be started.
        if self._started_ray:
            return
        options = self._options
        if ray.is_initialized():
            if options.runtime_env or options.address:
                logger.warning(
                    "The Ray address and runtime_env given to tandem are ignored: Ray was "
                    "already started in this process. Pass them to your own ray.init() instead."
                )
            return
        connect_ray(options.address, options.runtime_env or None)
        self._started_ray = True

    async def open(self, events: BackendEvents) -> None:
        picklable_starlette()
        await super().open(events)
        self.prepare()  # if prepare() was not called (it is, by tandem.run)

    async def close(self) -> None:
        actors = list(self._actors.values())
        if not ray.is_initialized():  # Ray went first (its actors went with it)
            self._actors.clear()
            return
        for actor in actors:
            actor.stopping = True
            ray.kill(actor.handle, no_restart=True)
        await asyncio.gather(*(self._gone(actor) for actor in actors))
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    # -- replicas ----------------------------------------------------------

    async def start_replica(self, spec: ReplicaSpec) -> ReplicaInfo:
        options = _actor_options(spec)
        _refuse_unschedulable(spec, options)
        group = placement.create_group(spec)
        try:
            handle = _remote_replica().options(**options, **placement.in_group(group)).remote()
        except BaseException:
            placement.remove_group(group)
            raise
        actor = _Actor(spec.replica_id, handle, group=group)
        self._actors[spec.replica_id] = actor
        start = StartSpec.of(spec, self._directory.values(), driver_path_first=False)
        started = handle.start.remote(start)
        try:
            pid, node_ip = await _wait_for_start(started, spec, options)
        except BaseException as exc:
            actor.stopping = True
            ray.kill(handle, no_restart=True)
            self._forget(actor)
            if isinstance(exc, Exception):
                raise _start_error(spec.replica_id, exc) from exc
            raise
        address = RayAddress(handle, pid, node_ip)
        actor.address = address
        actor.watcher = asyncio.ensure_future(self._watch(actor))
        return ReplicaInfo(spec.replica_id, address, spec.options.max_ongoing_requests)

    async def _watch(self, actor: _Actor) -> None:
        """Keep a ``watch`` pending on the actor: news of its models and queues, and its death."""
        version = 0
        while True:
            try:
                version, news = await actor.handle.watch.remote(version)
            except RayError as error:
                if self._actors.get(actor.replica_id) is actor and not actor.stopping:
                    self._forget(actor)
                    logger.warning(
                        "Replica %s (pid %s) died: %s",
                        actor.replica_id,
                        actor.address.pid if actor.address else "?",
                        type(error).__name__,
                    )
                    self.events.replica_exited(actor.replica_id)
                return
            actor.queued = news["queued"]
            self.events.models_changed(actor.replica_id, news["models"])

    async def _gone(self, actor: _Actor) -> None:
        """Wait (a little) until Ray reports the actor dead, then forget it."""
        watcher = actor.watcher
        if watcher is not None:
            await asyncio.wait([watcher], timeout=STOP_WAIT_S)
        self._forget(actor)

    def _forget(self, actor: _Actor) -> None:
        if self._actors.get(actor.replica_id) is actor:
            del self._actors[actor.replica_id]
        group, actor.group = actor.group, None
        placement.remove_group(group)
        watcher = actor.watcher
        if watcher is not None and not watcher.done() and watcher is not _current_task():
            watcher.cancel()

    async def stop_replica(self, info: ReplicaInfo, timeout_s: float) -> None:
        actor = self._actors.get(info.replica_id)
        if actor is None:
            return
        actor.stopping = True
        if not ray.is_initialized():
            self._forget(actor)
            return
        try:
            await asyncio.wait_for(actor.handle.stop.remote(timeout_s), timeout_s + 5)
        except (asyncio.TimeoutError, RayError):
            pass
        ray.kill(actor.handle, no_restart=True)
        await self._gone(actor)

    async def check_health(self, info: ReplicaInfo) -> None:
        actor = self._actor(info)
        actor.report = await self._control(actor, actor.handle.health.remote())

    async def refresh(self, info: ReplicaInfo) -> None:
        actor = self._actors.get(info.replica_id)
        if actor is not None:
            try:
                actor.report = await self._control(actor, actor.handle.report.remote())
            except ReplicaUnavailableError:
                pass

    async def logs(
        self, info: ReplicaInfo, after: int, limit: int, request_id: str | None = None
    ) -> LogRead:
        actor = self._actor(info)
        result: LogRead = await self._control(
            actor, actor.handle.logs.remote(after, limit, request_id)
        )
        return result

    async def reconfigure(self, info: ReplicaInfo, user_config: Any) -> None:
        actor = self._actor(info)
        await self._control(actor, actor.handle.reconfigure.remote(user_config))

    async def set_rank(self, info: ReplicaInfo, rank: int, world_size: int) -> None:
        actor = self._actor(info)
        await self._control(actor, actor.handle.rank.remote(rank, world_size))

    async def _control(self, actor: _Actor, ref: Any) -> Any:
        try:
            return await ref
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except RayError as error:
            translated = unwrap(error, actor.replica_id)
            raise translated from translated.__cause__

    def _actor(self, info: ReplicaInfo) -> _Actor:
        actor = self._actors.get(info.replica_id)
        if actor is None:
            raise ReplicaUnavailableError(f"Replica {info.replica_id} is not running.")
        return actor

    def connect(self, info: ReplicaInfo) -> ReplicaConnection:
        return RayConnection(info)

    def publish(self, replica_set: ReplicaSet) -> None:
        if replica_set.state == "deleted":
            self._directory.pop(replica_set.deployment_id, None)
        else:
            self._directory[replica_set.deployment_id] = replica_set
        for actor in self._actors.values():
            if actor.address is not None:  # started: later ones get the directory at start
                actor.handle.publish.remote(replica_set)

    def queued(self, deployment_id: DeploymentID) -> int:
        return sum(actor.queued.get(deployment_id, 0) for actor in self._actors.values())

    def facts(self, info: ReplicaInfo) -> ReplicaFacts:
        actor = self._actors.get(info.replica_id)
        facts = actor.report if actor is not None else ReplicaFacts()
        address = info.address
        if isinstance(address, RayAddress):  # where Ray put it, which the actor cannot see
            facts = dataclasses.replace(facts, pid=address.pid, node=address.node_ip)
        return facts


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def _actor_options(spec: ReplicaSpec) -> dict[str, Any]:
    """Ray actor options for a replica, from the deployment's ray_actor_options."""
    options: dict[str, Any] = {
        "max_concurrency": MAX_CONCURRENCY,
        "max_restarts": 0,  # the controller replaces dead replicas itself
        "name": f"tandem:{spec.replica_id}",
    }
    requested = spec.options.ray_actor_options
    if requested is not None:
        options.update(requested.model_dump(exclude_none=True))
    options.setdefault("num_cpus", 1)  # as Ray Serve: a replica reserves one CPU by default
    per_node = placement.per_node_resource(spec)
    if per_node:
        options["resources"] = {**options.get("resources", {}), **per_node}
    traced = tracing.worker_env()
    if traced:  # an actor on another node sets up tracing as the driver did
        runtime_env = dict(options.get("runtime_env") or {})
        runtime_env["env_vars"] = {**traced, **(runtime_env.get("env_vars") or {})}
        options["runtime_env"] = runtime_env
    return options


def _refuse_unschedulable(spec: ReplicaSpec, options: dict[str, Any]) -> None:
    """Fail at once when no node of the cluster could ever hold the replica."""
    wanted: dict[str, float] = {
        "CPU": options.get("num_cpus", 0),
        "GPU": options.get("num_gpus", 0),
        "memory": options.get("memory", 0),
        **options.get("resources", {}),
    }
    if options.get("accelerator_type"):
        wanted[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    wanted = {k: v for k, v in wanted.items() if v and not placement.is_implicit(k)}
    demands = [demand for demand in placement.node_demands(spec, wanted) if demand]
    grouped = spec.options.placement_group_bundles is not None
    if not demands and not grouped:
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
    for demand in demands:
        if any(all(node.get(k, 0) >= v for k, v in demand.items()) for node in nodes):
            continue
        largest = {k: max((node.get(k, 0) for node in nodes), default=0) for k in demand}
        what, option = (
            ("in one placement group bundle", "placement_group_bundles")
            if grouped and spec.options.placement_group_strategy != "STRICT_PACK"
            else ("on one node for its placement group (STRICT_PACK)", "placement_group_bundles")
            if grouped
            else ("per replica", "ray_actor_options")
        )
        error = ValueError(
            f"Deployment {spec.deployment_id.name!r} asks for {_describe(demand)} {what}, "
            f"but no node of the Ray cluster has that much (the most any node has: "
            f"{_describe(largest)}). Lower {option} or add nodes that have it."
        )
        raise ReplicaStartError(spec.replica_id, error, str(error))
    reason = placement.nodes_short(spec, len(nodes))
    if reason is not None:
        error = ValueError(reason)
        raise ReplicaStartError(spec.replica_id, error, reason)


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in resources.items())


async def _wait_for_start(ref: Any, spec: ReplicaSpec, options: dict[str, Any]) -> Any:
    """The result of the actor's ``start``, logging while the cluster has no room for it."""
    started = asyncio.ensure_future(_awaitable(ref))
    waited = 0.0
    try:
        while True:
            done, _ = await asyncio.wait([started], timeout=PENDING_WARNING_S)
            if done:
                return started.result()
            waited += PENDING_WARNING_S
            wanted = _wanted(spec, options)
            logger.warning(
                "Replica %s has waited %.0f s for the Ray cluster to place it (it asks for "
                "%s; free now: %s). Lower its ray_actor_options, add nodes, or for a local Ray "
                "started by tandem, set TANDEM_RAY_NUM_CPUS.",
                spec.replica_id,
                waited,
                wanted,
                _describe(_free_resources()),
            )
    finally:
        started.cancel()  # given up (cancelled): nobody will want its outcome


def _wanted(spec: ReplicaSpec, options: dict[str, Any]) -> dict[str, Any]:
    """What a replica asks of the cluster, as the user said it (for messages)."""
    keys = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")
    wanted = {k: v for k, v in options.items() if k in keys}
    asked = wanted.pop("resources", {})
    resources = {k: v for k, v in asked.items() if not placement.is_implicit(k)}
    if resources:
        wanted["resources"] = resources
    for name in ("placement_group_bundles", "placement_group_strategy", "max_replicas_per_node"):
        if getattr(spec.options, name) is not None:
            wanted[name] = getattr(spec.options, name)
    return wanted


def _free_resources() -> dict[str, float]:
    free: dict[str, float] = ray.available_resources()  # type: ignore[no-untyped-call]
    return {
        k: v for k, v in free.items() if not k.startswith("node:") and k != "object_store_memory"
    }


async def _awaitable(ref: Any) -> Any:
    return await ref


def _start_error(replica_id: str, exc: Exception) -> ReplicaStartError:
    if isinstance(exc, RayTaskError | RayActorError | GetTimeoutError):
        error = unwrap(exc, replica_id)
        cause = error.__cause__
        text = cause.text if isinstance(cause, RemoteTraceback) else str(error)
        return ReplicaStartError(replica_id, error, text)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ReplicaStartError(replica_id, exc, text)
