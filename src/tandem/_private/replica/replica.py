"""The replica: one instance of a user's class (or function) and the rules around it.

It admits at most ``max_ongoing_requests`` requests at once (admission.py), runs
the user's methods, sync ones in its own threads and async ones on the event
loop, generators item by item (running.py), applies ``user_config`` through
``reconfigure``, answers health checks, failing them once requests their
callers gave up on wedge it (abandoned.py), logs as ``logging_config`` says
(logs.py), and drains before it stops, then unloads its multiplexed models. It
knows nothing about where it lives: the backends host it in the caller's
process, in a child process or in a Ray actor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tandem._private.app.options import DeploymentOptions
from tandem._private.calls.context import (
    HTTP_METHOD,
    DeploymentID,
    ReplicaContext,
    ReplicaRank,
    RequestMetadata,
    _replica_context,
)
from tandem._private.calls.deadlines import DeadlineScope
from tandem._private.calls.errors import ReplicaNotReached
from tandem._private.calls.flow import Last, Opened, begin
from tandem._private.calls.inbound import for_sync_code, has_stream
from tandem._private.replica.abandoned import AbandonedRequests, AbandonedRequestsError
from tandem._private.replica.admission import Admission, Slot
from tandem._private.replica.autoscaling_stats import AutoscalingStats, StatsWindow
from tandem._private.replica.grpc_calls import WithContext, failure, take_context
from tandem._private.replica.http_side import HTTPSide, load_bridge
from tandem._private.replica.log_buffer import LogBuffer, capture_logs
from tandem._private.replica.logs import ReplicaLogs
from tandem._private.replica.routing_stats import RoutingStats
from tandem._private.replica.running import (
    GENERATOR_TYPES,
    UserCode,
    close_quietly,
    run_inline,
)
from tandem._private.replica.serving import Serving
from tandem._private.replica.threads import contain
from tandem._private.stats import RequestStats
from tandem._private.user_metrics import STORE, MetricsReport
from tandem.exceptions import DeadlineExceededError, ReplicaUnavailableError

__all__ = ["AbandonedRequestsError", "Replica", "ReplicaSpec", "current_replica"]

logger = logging.getLogger("tandem")

# Unloading models on stop gets what is left of the drain's time, plus this much: the
# backends give a stopping replica graceful_shutdown_timeout_s + 5 s before they kill it.
UNLOAD_GRACE_S = 4.0


def current_replica() -> Replica | None:
    context = _replica_context.get()
    return None if context is None else context._replica


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything needed to build one replica, wherever it is built."""

    replica_id: str
    deployment_id: DeploymentID
    target: Any  # the user's class or function
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    options: DeploymentOptions
    rank: int = 0
    world_size: int = 1
    serves_http: bool = False  # the ingress of an application with a route prefix


@dataclass(frozen=True)
class ReplicaFacts:
    """What a backend knows of one replica: for status(), /metrics and autoscaling.

    Sent from replicas in other processes (it pickles); ``node`` is set by
    backends that place replicas on several machines.
    """

    pid: int | None = None
    node: str | None = None
    in_flight: int = 0
    abandoned: int = 0  # requests whose callers gave up, still holding a slot
    stats: RequestStats | None = None
    routing_stats: dict[str, Any] | None = None  # record_routing_stats()'s last dict
    user_metrics: MetricsReport | None = None  # tandem.metrics series the replica made
    # What record_autoscaling_stats returned over look_back_period_s (autoscaling_stats.py).
    autoscaling_stats: StatsWindow = ()
    # Direct ingress: the http.metrics.RequestCounts of the replica process's own proxy.
    proxy_counts: Any = None
    # (app, deployment, method) -> calls from the replica's process dropped before they
    # were sent, as their deadline passed (Runtime.deadline_drops); set by hosts.
    caller_drops: Mapping[tuple[str, str, str], int] | None = None


class Replica:
    """Hosts the user's object and serves calls to it (see the module docstring)."""

    def __init__(self, spec: ReplicaSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.replica_id = spec.replica_id
        self.deployment_id = spec.deployment_id
        self._options = spec.options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self.context = ReplicaContext(
            app_name=spec.deployment_id.app_name,
            deployment=spec.deployment_id.name,
            replica_id=spec.replica_id,
            rank=ReplicaRank.of(spec.rank),
            world_size=spec.world_size,
            _replica=self,
        )
        self._admission = Admission(spec.options.max_ongoing_requests, self._unavailable)
        self._abandoned = AbandonedRequests(self, clock, _SERVING)
        self._user = UserCode(spec.target, self.name, self._abandoned, self._unavailable)
        config = spec.options.logging_config
        self.logs = None if config is None else ReplicaLogs(config, self.context)
        level = None if config is None else config.level
        self.log_buffer = LogBuffer(self.context.app_name, self.name, self.replica_id, level)
        self.stats = RequestStats()
        is_ingress = hasattr(spec.target, "__tandem_ingress_app__")
        self._http = HTTPSide(self._user, is_ingress, self._unavailable)
        # Per-replica state of @multiplexed loaders, keyed by the loader.
        self.multiplex_caches: dict[Any, Any] = {}
        # Set by the backend: called with the model ids this replica holds when they change.
        self.on_models_changed: Callable[[frozenset[str]], None] | None = None
        self._reported_models: frozenset[str] = frozenset()
        # Per-replica queues and settings of @batch methods.
        self.batch_queues: dict[Any, Any] = {}
        self.batch_settings: dict[Any, Any] = {}
        # Called when the replica stops (e.g. to end @batch queues).
        self.closers: list[Callable[[], None]] = []
        self._routing_stats: RoutingStats | None = None
        self._autoscaling_stats: AutoscalingStats | None = None

    @property
    def servable(self) -> Any:
        return self._user.obj

    async def set_rank(self, rank: int, world_size: int) -> None:
        """A new place among the deployment's replicas (after scaling); a reconfigure
        that takes ``rank`` hears of a changed rank, as in Ray Serve."""
        changed = rank != self.context.rank.rank
        self.context = dataclasses.replace(
            self.context, rank=ReplicaRank.of(rank), world_size=world_size
        )
        if changed and self._wants_rank():
            await self.reconfigure(self._options.user_config)

    @property
    def in_flight(self) -> int:
        return self._admission.in_flight

    def facts(self) -> ReplicaFacts:
        """What the driver shows of this replica (status, /metrics, autoscaling)."""
        return ReplicaFacts(
            pid=os.getpid(),
            in_flight=self.in_flight,
            abandoned=self.abandoned,
            stats=self.stats,
            routing_stats=None if self._routing_stats is None else self._routing_stats.latest,
            user_metrics=STORE.report(self.replica_id),
            autoscaling_stats=(
                self._autoscaling_stats.window() if self._autoscaling_stats is not None else ()
            ),
        )

    @property
    def abandoned(self) -> int:
        """Requests their callers gave up on that still hold a slot (part of ``in_flight``)."""
        return self._abandoned.count

    def abandoned_threads(self) -> list[str]:
        """The methods worker threads still run for callers that gave up."""
        return self._abandoned.thread_methods()

    @property
    def name(self) -> str:
        return self.deployment_id.name

    def loaded_model_ids(self) -> frozenset[str]:
        ids: set[str] = set()
        for cache in self.multiplex_caches.values():
            ids.update(cache.model_ids())
        return frozenset(ids)

    def models_changed(self) -> None:
        """Tell whoever hosts this replica (its backend) which models it now holds."""
        ids = self.loaded_model_ids()
        if ids != self._reported_models:
            self._reported_models = ids
            if self.on_models_changed is not None:
                self.on_models_changed(ids)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Construct the user's object and apply its user_config; raises what they raise."""
        self._loop = asyncio.get_running_loop()
        capture_logs()  # this process's records logged in a replica go to its log_buffer
        if self.logs is not None:
            self.logs.open()  # first, so the constructor's records follow logging_config
        self._user.open(threads=self._admission.capacity + 1)
        if self.spec.serves_http:
            load_bridge()  # import the HTTP side now, not during the first request
        token = _replica_context.set(self.context)
        try:
            await self._user.construct(self.spec.init_args, self.spec.init_kwargs)
        finally:
            _replica_context.reset(token)
        if self._options.user_config is not None or self._wants_rank():
            await self.reconfigure(self._options.user_config)
        self._admission.open = True
        self._routing_stats = RoutingStats.started(
            self._options, self._user.hook("record_routing_stats"), self._invoke, self.replica_id
        )
        self._autoscaling_stats = AutoscalingStats.started(
            self._options.autoscaling,
            self._user.hook("record_autoscaling_stats"),
            self._invoke,
            self.replica_id,
        )

    async def reconfigure(self, user_config: Any) -> None:
        """Give the user's ``reconfigure`` the user_config (and ``rank=``, if it takes it)."""
        method = self._user.hook("reconfigure")
        if method is None:
            raise TypeError(
                f"Deployment {self.name!r} has a user_config but no reconfigure(self, config) "
                "method to receive it; add one or remove user_config."
            )
        if self._wants_rank():
            await self._invoke(method, user_config, rank=self.context.rank)
        else:
            await self._invoke(method, user_config)
        self._options = self._options.model_copy(update={"user_config": user_config})

    def _wants_rank(self) -> bool:
        """Whether the user's ``reconfigure`` has a ``rank`` parameter (Ray passes the
        rank only then, so older ``reconfigure(self, config)`` methods keep working)."""
        method = self._user.hook("reconfigure")
        if method is None:
            return False
        try:
            return "rank" in inspect.signature(method).parameters
        except (TypeError, ValueError):  # a builtin or C callable: no signature to read
            return False

    async def check_health(self) -> None:
        """Fail if abandoned requests outlived the grace period (health_check_timeout_s);
        else run the user's check_health (if any), bounded by health_check_timeout_s.

        The first part needs no slot and no worker thread: it works when every one is stuck.
        """
        if self._stopped:
            raise ReplicaUnavailableError(f"Replica {self.replica_id} is stopped.")
        grace = self._options.health_check_timeout_s
        self._abandoned.refuse_if_wedged(grace, self._loop, self._admission.busy)
        method = self._user.hook("check_health")
        if method is not None:
            await asyncio.wait_for(self._invoke(method), timeout=grace)

    async def _invoke(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a hook of the user's object as the replica (get_replica_context() works)."""
        token = _replica_context.set(self.context)
        try:
            return await self._user.invoke(fn, args, kwargs)
        finally:
            _replica_context.reset(token)

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking requests, wait for in-flight ones (bounded), unload the models,
        then destroy the object.

        Requests abandoned in worker threads are not waited for: nobody wants their results.
        """
        if self._stopped:
            return
        if self._routing_stats is not None:
            await self._routing_stats.close()
        if self._autoscaling_stats is not None:
            await self._autoscaling_stats.close()
        timeout = self._options.graceful_shutdown_timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        await self._admission.drain(timeout)
        self._stopped = True
        self._admission.refuse_waiters()
        await self._unload_models(max(timeout - (time.monotonic() - started), 0) + UNLOAD_GRACE_S)
        self._user.stop()
        for close in self.closers:
            close()
        self.closers.clear()
        self._user.destroy()
        if self.logs is not None:
            self.logs.close()

    async def _unload_models(self, timeout_s: float) -> None:
        """Unload every model of the @multiplexed caches, as eviction does."""
        caches = list(self.multiplex_caches.values())
        self.multiplex_caches.clear()
        if not caches:
            return
        token = _replica_context.set(self.context)
        try:
            await asyncio.wait_for(asyncio.gather(*(c.clear() for c in caches)), timeout_s)
        except asyncio.TimeoutError:
            logger.warning(
                "Replica %s did not finish unloading its models within %.0f s; stopping anyway.",
                self.replica_id,
                timeout_s,
            )
        finally:
            _replica_context.reset(token)

    # -- serving -----------------------------------------------------------

    async def call(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Serve one unary call."""
        method = self._user.method(meta.method_name)
        if method.is_generator:
            raise TypeError(
                f"Method {meta.method_name!r} of deployment {self.name!r} is a generator; "
                "call it through a handle with .options(stream=True)."
            )
        kwargs, grpc_context = take_context(method.fn, kwargs)
        slot = await self._slot(meta)
        with Serving(self.stats, self.logs, self.context, meta, meta.method_name, slot):
            try:
                # UserCode.run, unrolled: every call takes this path
                if method.is_async:
                    result = await method.fn(*args, **kwargs)
                elif has_stream(args, kwargs):  # read in a thread, never on the loop
                    args, kwargs = for_sync_code(args, kwargs, self._running_loop())
                    result = await self._user.run_in_thread(method.fn, args, kwargs, slot)
                elif method.trial is not None and method.trial.inline:
                    result = run_inline(method.trial, method.fn, args, kwargs)
                else:
                    result = await self._user.run_sync(method, args, kwargs, slot)
            except Exception as exc:
                if grpc_context is None:
                    raise
                raise failure(grpc_context, exc) from exc
            except (SystemExit, KeyboardInterrupt) as exc:
                raise contain(exc) from exc
            if type(result) in GENERATOR_TYPES:
                close_quietly(result)
                raise TypeError(
                    f"Method {meta.method_name!r} of deployment {self.name!r} returned a "
                    "generator; call it through a handle with .options(stream=True)."
                )
            return result if grpc_context is None else WithContext(grpc_context, result)

    async def stream(
        self, meta: RequestMetadata, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        """Serve one streaming call: yield what the user's generator yields, as it yields it.

        An HTTP request (method ``HTTP_METHOD``) is a streaming call too: it
        yields the ASGI messages of the response.
        """
        http = meta.method_name == HTTP_METHOD
        method = None if http else self._user.method(meta.method_name)
        if method is not None and not method.is_generator:
            raise TypeError(
                f"Method {meta.method_name!r} of deployment {self.name!r} is not a "
                "generator; call it without stream=True."
            )
        grpc_context = None
        if method is not None:
            kwargs, grpc_context = take_context(method.fn, kwargs)
        slot = await self._slot(meta)
        with Serving(
            self.stats, self.logs, self.context, meta, _label(meta.method_name), slot
        ) as serving:
            if method is None:
                serving.http = args[0].scope
                source = self._http.stream(args, slot)
            else:
                if not method.is_async and has_stream(args, kwargs):
                    args, kwargs = for_sync_code(args, kwargs, self._running_loop())
                source = self._user.iterate(method, args, kwargs, slot)
            try:
                async for item in source:
                    if http and serving.status is None:
                        serving.saw(item)
                    yield item
            except Exception as exc:
                if grpc_context is None:
                    raise
                raise failure(grpc_context, exc) from exc
            finally:
                await source.aclose()
            if grpc_context is not None:
                yield WithContext(grpc_context)  # what the method set, after its items

    async def http_request(self, meta: RequestMetadata, args: tuple[Any, ...]) -> Last | Opened:
        """Serve one HTTP request (``args``: its data): the whole response when the
        ingress answers with a plain one (most do: no stream in between), else its
        ASGI messages as a begun stream, which holds the request's slot until it ends."""
        slot = await self._slot(meta)
        serving = Serving(self.stats, self.logs, self.context, meta, "__call__", slot)
        serving.http = args[0].scope
        try:
            answered = await self._http.answer(args, slot)
        except BaseException as exc:
            serving.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if isinstance(answered, Last):
            serving.saw(answered)
            serving.__exit__(None, None, None)
            return answered
        return await begin(self._http_rest(meta, serving, answered))

    async def _http_rest(
        self, meta: RequestMetadata, serving: Serving, source: AsyncGenerator[Any, None]
    ) -> AsyncGenerator[Any, None]:
        """A streamed HTTP response's messages (``meta``: for AbandonedRequests)."""
        with serving:
            try:
                async for item in source:
                    if serving.status is None:
                        serving.saw(item)
                    yield item
            finally:
                await source.aclose()

    def _slot(self, meta: RequestMetadata) -> Awaitable[Slot]:
        """Wait for a slot: by the request's deadline, if it has one."""
        if meta.deadline is None:
            return self._admission.acquire(meta.priority)
        return self._acquire_by_deadline(meta)

    async def _acquire_by_deadline(self, meta: RequestMetadata) -> Slot:
        """A slot for a request with a deadline: one that arrives past it, or whose
        deadline passes while it waits, is dropped before it runs (and counted)."""
        assert meta.deadline is not None
        try:
            with DeadlineScope(meta.deadline, f"before deployment {self.name!r} could start it"):
                return await self._admission.acquire(meta.priority)
        except DeadlineExceededError:
            self.stats.series(_label(meta.method_name)).dropped += 1
            raise

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the replica has started"
        return self._loop

    def _unavailable(self) -> ReplicaUnavailableError:
        return ReplicaNotReached(
            f"Replica {self.replica_id} of deployment {self.name!r} is not serving requests "
            "(it is stopping or stopped)."
        )


def _label(method_name: str) -> str:
    """A request's method as messages and stats name it (HTTP requests call ``__call__``)."""
    return "__call__" if method_name == HTTP_METHOD else method_name


# The methods that serve a request: a cancelled task in one of them still serves it.
_SERVING = frozenset(
    {
        Replica.call.__code__,
        Replica.stream.__code__,
        Replica.http_request.__code__,
        Replica._http_rest.__code__,
    }
)
