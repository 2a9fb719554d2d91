"""Custom request routers (``request_router_config``) inside a caller's :class:`Router`.

The controller publishes a deployment's router in its replica set as a
:class:`RouterSpec` (the class, pickled, and its settings); each caller's
router builds one :class:`CustomRouting` from it, which owns the user's
:class:`RequestRouter`: it hands it the replicas as they change, asks it for
a replica per request, tells it what became of each request, and makes it
wait (backoff, the deployment's ``max_queued_requests``) as tandem's own
router would. A router that cannot be built, or raises, fails the requests
it was asked about with :class:`RequestRouterError`; the deployment and the
caller's other deployments go on. Deployments without a custom router never
come here.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import json
import logging
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from tandem._private.calls.context import HTTP_METHOD, DeploymentID, ReplicaID, RequestMetadata
from tandem._private.calls.request_routers import (
    PendingRequest,
    ReplicaResult,
    RequestRouter,
    RoutingMetadata,
    RunningReplica,
)
from tandem._private.calls.routing_mixins import FIFOMixin
from tandem._private.queues import wait_event
from tandem.exceptions import TandemError

logger = logging.getLogger("tandem")


class RequestRouterError(TandemError, RuntimeError):
    """A deployment's request router could not be built, or raised: the request was
    not sent to any replica."""


class Superseded(Exception):
    """The router a request waited in was replaced (a redeploy): route it anew."""


def load_router_class(value: Any) -> type[RequestRouter]:
    """The router class ``request_router_class`` names (a class, or ``'module:Class'``
    / ``'module.Class'``); ValueError says what is wrong."""
    cls = _import(value) if isinstance(value, str) else value
    if not (isinstance(cls, type) and issubclass(cls, RequestRouter)):
        raise ValueError(
            f"request_router_class must be a subclass of tandem.request_router.RequestRouter "
            f"(or its import path), got {cls!r}."
        )
    if inspect.isabstract(cls):
        raise ValueError(
            f"request_router_class {cls.__name__} does not implement "
            "'async def choose_replicas(self, candidate_replicas, pending_request)'."
        )
    return cls


def _import(path: str) -> Any:
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"request_router_class {path!r} must be an import path like 'module:Class'."
        )
    try:
        value: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(
            f"request_router_class {path!r} cannot be imported ({type(exc).__name__}: {exc}); "
            "it must name a module importable where tandem runs."
        ) from exc
    for part in attr.split("."):
        if not hasattr(value, part):
            raise ValueError(f"request_router_class {path!r}: {module_name!r} has no {attr!r}.")
        value = getattr(value, part)
    return value


@dataclass(frozen=True)
class RouterSpec:
    """A deployment's custom request router, as published to every caller."""

    name: str  # "module.Class", for messages
    payload: bytes = field(repr=False)  # the class, cloudpickled (by value if in __main__)
    kwargs: dict[str, Any] = field(default_factory=dict)  # for initialize_state
    initial_backoff_s: float = 0.025
    backoff_multiplier: float = 2.0
    max_backoff_s: float = 0.5
    # Equal for equal routers: a caller keeps its router (and its state) while it stays.
    key: str = ""

    @classmethod
    def of(
        cls,
        router_class: type[RequestRouter],
        kwargs: dict[str, Any],
        initial_backoff_s: float,
        backoff_multiplier: float,
        max_backoff_s: float,
    ) -> RouterSpec:
        payload = _pickled(router_class)
        settings = json.dumps(
            [kwargs, initial_backoff_s, backoff_multiplier, max_backoff_s],
            sort_keys=True,
            default=repr,
        )
        key = hashlib.sha256(payload + settings.encode()).hexdigest()[:16]
        name = f"{router_class.__module__}.{router_class.__qualname__}"
        return cls(
            name, payload, dict(kwargs), initial_backoff_s, backoff_multiplier, max_backoff_s, key
        )

    def load(self) -> type[RequestRouter]:
        router_class: type[RequestRouter] = cloudpickle.loads(self.payload)
        return router_class


def _pickled(router_class: type[RequestRouter]) -> bytes:
    """The class by value (with its module's code), as Ray Serve sends it: the processes
    that route need not be able to import the module it came from."""
    module = sys.modules.get(router_class.__module__)
    by_value = module is not None and module.__name__ not in ("__main__", "builtins")
    by_value = by_value and not router_class.__module__.startswith("tandem.")
    if not by_value:
        return bytes(cloudpickle.dumps(router_class))
    cloudpickle.register_pickle_by_value(module)
    try:
        return bytes(cloudpickle.dumps(router_class))
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def this_node_id() -> str:
    """This process's node, as ``RunningReplica.node_id`` names nodes."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return str(ray.util.get_node_ip_address())
    return socket.gethostname()


class CustomRouting:
    """One caller's custom router for one deployment (see the module docstring).

    ``check_gone`` raises if the deployment was deleted or failed;
    ``check_queue`` raises BackPressureError if that many waiting is too many.
    """

    def __init__(
        self,
        deployment_id: DeploymentID,
        spec: RouterSpec,
        check_gone: Callable[[], None],
        check_queue: Callable[[int], None],
    ) -> None:
        self.spec = spec
        self._deployment_id = deployment_id
        self._check_gone = check_gone
        self._check_queue = check_queue
        self._node_id = this_node_id()
        self._views: dict[str, RunningReplica] = {}
        self._waiting: set[int] = set()  # requests that had to wait, by id()
        self._changed = asyncio.Event()
        self._closed = False
        self._fifo: asyncio.Lock | None = None
        self.router: RequestRouter | None = None
        self.error: BaseException | None = None
        try:
            router = spec.load()(
                deployment_id=deployment_id,
                handle_source=None,
                self_node_id=self._node_id,
                prefer_local_node_routing=False,
                prefer_local_az_routing=False,
                self_availability_zone=None,
                initial_backoff_s=spec.initial_backoff_s,
                backoff_multiplier=spec.backoff_multiplier,
                max_backoff_s=spec.max_backoff_s,
            )
            router._link = self
            router.initialize_state(**spec.kwargs)
        except Exception as exc:
            self.error = exc
            logger.exception(
                "The request router %s of deployment %s could not be set up; requests to "
                "the deployment from this process fail until a redeploy fixes it.",
                spec.name,
                deployment_id,
            )
            return
        self.router = router
        if isinstance(router, FIFOMixin):
            self._fifo = asyncio.Lock()  # fair: waiters take it in the order they came

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Replaced: requests waiting here go back to the caller's router."""
        self._closed = True
        self.changed()
        if self.router is not None:  # routers that run their own loop wait on this one
            self.router._replicas_updated_event.set()

    def changed(self) -> None:
        """Something that may give a waiting request a replica happened: wake them."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def update(self, replicas: Iterable[Any]) -> None:
        """The caller's router's replicas (``RoutedReplica``) changed."""
        views = {}
        for routed in replicas:
            replica_id = routed.info.replica_id
            view = self._views.get(replica_id)
            if view is None or view._routed is not routed:
                node = getattr(routed.info.address, "node_ip", None) or self._node_id
                unique = replica_id.rpartition("#")[2]
                view = RunningReplica(routed, ReplicaID(unique, self._deployment_id), node)
            views[replica_id] = view
        self._views = views
        if self.router is not None:
            self._quietly(self.router.update_replicas, list(views.values()))
        self.changed()

    async def choose(
        self,
        meta: RequestMetadata,
        avoid: set[str] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Any, PendingRequest]:
        """The ``RoutedReplica`` the user's router picked for the request."""
        router = self.router
        if router is None:
            raise self._failed("could not be set up here", self.error)
        for replica_id in avoid or ():
            view = self._views.get(replica_id)
            if view is not None and view.replica_id in router.curr_replicas:
                self._quietly(router.on_replica_actor_died, view.replica_id)
        pending = PendingRequest(list(args), dict(kwargs), _metadata(meta))
        try:
            if self._fifo is None:
                chosen = await router._choose_replica_for_request(pending, is_retry=bool(avoid))
            else:
                async with self._fifo:
                    chosen = await router._choose_replica_for_request(pending, is_retry=bool(avoid))
        except (asyncio.CancelledError, TandemError, Superseded):
            raise
        except Exception as exc:
            raise self._failed("raised", exc) from exc
        finally:
            self._waiting.discard(id(pending))
        if not isinstance(chosen, RunningReplica):
            raise self._failed("chose no replica", TypeError(f"it returned {chosen!r}"))
        return chosen._routed, pending

    def sent(self, pending: PendingRequest, routed: Any) -> ReplicaID:
        """The request goes to ``routed``: tell the user's router (it may still refuse)."""
        view = self._views.get(routed.info.replica_id)
        router = self.router
        assert router is not None and view is not None
        try:
            router.on_send_request(view.replica_id)
            router.on_request_routed(
                pending, view.replica_id, ReplicaResult(view.replica_id, pending.metadata)
            )
        except Exception as exc:
            raise self._failed("raised in on_request_routed", exc) from exc
        return view.replica_id

    def finished(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """A request it routed ended: tell the user's router, and wake waiting requests."""
        router = self.router
        if router is not None:
            self._quietly(router.decrement_queue_len_cache, replica_id)
            self._quietly(router.on_request_completed, replica_id, internal_request_id)
        self.changed()

    # -- the RoutingLink the user's router waits through ----------------------

    async def wait(self, pending_request: PendingRequest, delay_s: float) -> None:
        self._raise_if_over()
        key = id(pending_request)
        if key not in self._waiting:
            self._check_queue(len(self._waiting))
            self._waiting.add(key)
        await wait_event(self._changed, delay_s)
        self._raise_if_over()

    def _raise_if_over(self) -> None:
        self._check_gone()
        if self._closed:
            raise Superseded

    # -- errors ----------------------------------------------------------------

    def stale_choice(self, replica_id: str) -> RequestRouterError:
        return self._failed(
            f"keeps choosing replica {replica_id}, which no longer runs (choose from "
            "candidate_replicas)",
            None,
        )

    def _failed(self, what: str, error: BaseException | None) -> RequestRouterError:
        detail = f" ({type(error).__name__}: {error})" if error is not None else ""
        return RequestRouterError(
            f"The request router {self.spec.name} of deployment "
            f"{self._deployment_id.name!r} of application {self._deployment_id.app_name!r} "
            f"{what}{detail}; the request was not sent. Fix the router (request_router_config) "
            "and redeploy."
        )

    def _quietly(self, hook: Callable[..., Any], *args: Any) -> None:
        """Call a hook of the user's router whose failure must not fail anything else."""
        try:
            hook(*args)
        except Exception:
            logger.exception(
                "The request router %s of deployment %s raised in %s.",
                self.spec.name,
                self._deployment_id,
                getattr(hook, "__name__", hook),
            )


def _metadata(meta: RequestMetadata) -> RoutingMetadata:
    return RoutingMetadata(
        request_id=meta.request_id,
        internal_request_id=RequestMetadata.new_request_id(),
        app_name=meta.app_name,
        call_method="__call__" if meta.method_name == HTTP_METHOD else meta.method_name,
        route=meta.route,
        multiplexed_model_id=meta.multiplexed_model_id,
        is_streaming=meta.stream,
    )
