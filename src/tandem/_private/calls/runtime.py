"""The per-process runtime: tandem's event loop thread and the routers on it.

Every process that calls deployments (the driver, and each replica process or
actor) has one runtime. It owns a dedicated event loop thread (or, in a Ray
actor, adopts the actor's own event loop), the latest
replica set of every deployment (as the controller publishes them), and one
router per deployment; handles send their requests through it. In the driver
it also holds the controller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

from tandem._private.calls.context import DeploymentID, RequestMetadata, _replica_context
from tandem._private.calls.control_plane import ControlPlane
from tandem._private.calls.deadlines import DeadlineScope
from tandem._private.calls.errors import ReplicaNotReached
from tandem._private.calls.flow import Last, Opened, begin, chained
from tandem._private.calls.router import ReplicaConnection, ReplicaInfo, ReplicaSet, Router
from tandem.exceptions import DeploymentUnavailableError

T = TypeVar("T")

# A request that never started on a replica is tried on others, this many times in all.
MAX_ATTEMPTS = 5
RETRY_DELAY_S = 0.02


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Runtime:
    """See the module docstring. Build with :meth:`open`; end with :meth:`close`."""

    def __init__(self, connect: Callable[[ReplicaInfo], ReplicaConnection]) -> None:
        self._connect = connect
        self.loop = _new_event_loop()
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._directory: dict[DeploymentID, ReplicaSet] = {}
        self._routers: dict[DeploymentID, Router] = {}
        self.controller: ControlPlane | None = None
        self.backend_name = ""
        self.http: Any = None  # the HTTP server, in the process that serves HTTP
        # In a replica process: asks the driver what tandem.status() says there.
        self.driver_status: Callable[[], Coroutine[Any, Any, Any]] | None = None
        # In a replica process: its replica, which this process's routers prefer.
        self._local_replica: str | None = None

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """Start the loop thread."""
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self._thread_id = threading.get_ident()
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="tandem-loop", daemon=True)
        self._thread.start()
        ready.wait()

    def adopt_running_loop(self) -> None:
        """Use the event loop running this thread instead of a thread of our own.

        For hosts that bring their own loop (a Ray actor); :meth:`close` then
        leaves that loop alone.
        """
        self.loop.close()
        self.loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()

    def close(self) -> None:
        """Cancel whatever still runs on the loop, then stop the loop thread."""
        if self._thread is None:
            return

        async def cancel_all() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(timeout=10)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()
        self._thread = None

    @property
    def is_open(self) -> bool:
        return (self._thread is not None or self._thread_id is not None) and not (
            self.loop.is_closed()
        )

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread_id

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop from another thread and wait for its result."""
        if self.on_loop_thread():
            coro.close()
            raise RuntimeError(
                "This blocking tandem call cannot run on tandem's event loop; "
                "call it from ordinary (non-async) code."
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- membership --------------------------------------------------------

    def prefer(self, replica_id: str) -> None:
        """Send calls to ``replica_id`` (hosted in this process) whenever it has room."""
        self._local_replica = replica_id
        for router in self._routers.values():
            router.prefer(replica_id)

    def publish(self, replica_set: ReplicaSet) -> None:
        """Record a deployment's replica set and hand it to its router (on the loop)."""
        self._directory[replica_set.deployment_id] = replica_set
        router = self._routers.get(replica_set.deployment_id)
        if router is not None:
            router.update(replica_set)
        if replica_set.state == "deleted":
            self._directory.pop(replica_set.deployment_id, None)
            self._routers.pop(replica_set.deployment_id, None)

    def queued(self, deployment_id: DeploymentID) -> int:
        """Requests from this process waiting for a replica of the deployment."""
        router = self._routers.get(deployment_id)
        return router.queued if router is not None else 0

    def all_queued(self) -> dict[DeploymentID, int]:
        """Waiting requests per deployment, for the deployments that have any."""
        return {key: r.queued for key, r in self._routers.items() if r.queued}

    def deadline_drops(self) -> dict[tuple[str, str, str], int]:
        """(app, deployment, method) -> calls from this process dropped before they were
        sent, as their deadline passed (for /metrics)."""
        return {
            (key.app_name, key.name, method): count
            for key, router in self._routers.items()
            for method, count in router.expired.items()
        }

    def knows(self, deployment_id: DeploymentID) -> bool:
        return deployment_id in self._directory

    def router(self, deployment_id: DeploymentID) -> Router:
        router = self._routers.get(deployment_id)
        if router is None:
            replica_set = self._directory.get(deployment_id)
            if replica_set is None:
                raise DeploymentUnavailableError(
                    f"There is no deployment {deployment_id.name!r} in application "
                    f"{deployment_id.app_name!r}; check the names, or whether the "
                    "application was deleted."
                )
            router = Router(deployment_id, self._connect, prefer=self._local_replica)
            router.update(replica_set)
            self._routers[deployment_id] = router
        return router

    # -- requests (coroutines that run on the loop) ------------------------

    async def call(
        self,
        deployment_id: DeploymentID,
        meta: RequestMetadata,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        pending: type | None = None,
    ) -> Any:
        """One unary request; ``pending`` is the type of arguments to await first, if any."""
        with self._deadline_scope(meta, deployment_id):
            if pending is not None:
                args, kwargs = await resolve_arguments(args, kwargs, pending)
            router = self.router(deployment_id)
            tried: set[str] = set()
            while True:
                routed = await router.assign(meta, tried, args, kwargs)
                try:
                    sent = time.monotonic()
                    result = await routed.connection.call(meta, args, kwargs)
                    routed.answered_in(time.monotonic() - sent)
                    return result
                except ReplicaNotReached as error:
                    await _before_retry(tried, routed.info.replica_id, error)
                finally:
                    router.release(routed)

    async def stream(
        self,
        deployment_id: DeploymentID,
        meta: RequestMetadata,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        pending: type | None = None,
    ) -> AsyncGenerator[Any, None]:
        """One streaming request; see :meth:`call`."""
        with self._deadline_scope(meta, deployment_id):
            if pending is not None:
                args, kwargs = await resolve_arguments(args, kwargs, pending)
            router = self.router(deployment_id)
            tried: set[str] = set()
            while True:
                routed = await router.assign(meta, tried, args, kwargs)
                started = False
                try:
                    async for item in routed.connection.stream(meta, args, kwargs):
                        started = True
                        yield item
                    return
                except ReplicaNotReached as error:
                    if started:
                        raise
                    await _before_retry(tried, routed.info.replica_id, error)
                finally:
                    router.release(routed)

    async def http_request(
        self, deployment_id: DeploymentID, meta: RequestMetadata, args: tuple[Any, ...]
    ) -> Last | Opened:
        """One HTTP request: its whole response, or its ASGI messages as a begun stream
        (which holds its replica until it ends). Retried as :meth:`stream` is; the
        deadline holds until the answer begins (the proxy's own timer holds after)."""
        with self._deadline_scope(meta, deployment_id):
            router = self.router(deployment_id)
            tried: set[str] = set()
            while True:
                routed = await router.assign(meta, tried, args, {})
                try:
                    sent = time.monotonic()
                    answered = await routed.connection.http_request(meta, args)
                except ReplicaNotReached as error:
                    router.release(routed)
                    await _before_retry(tried, routed.info.replica_id, error)
                    continue
                except BaseException:
                    router.release(routed)
                    raise
                if isinstance(answered, Last):
                    routed.answered_in(time.monotonic() - sent)
                    router.release(routed)
                    return answered
                rest = chained(answered, functools.partial(router.release, routed))
                return await begin(rest)

    def _deadline_scope(
        self, meta: RequestMetadata, deployment_id: DeploymentID
    ) -> DeadlineScope | contextlib.nullcontext[None]:
        """The scope a call to ``deployment_id`` runs in: its deadline's, if it has one.
        A call made past its deadline is dropped (and counted) at once."""
        if meta.deadline is None:
            return _NO_DEADLINE
        if meta.deadline <= time.time():
            self.router(deployment_id).count_expired(meta.method_name)
        return DeadlineScope(meta.deadline, f"before deployment {deployment_id.name!r} answered")


_NO_DEADLINE = contextlib.nullcontext()


async def _before_retry(tried: set[str], replica_id: str, error: ReplicaNotReached) -> None:
    """A request never started on ``replica_id``: back off, or give up after MAX_ATTEMPTS."""
    tried.add(replica_id)
    if len(tried) >= MAX_ATTEMPTS:
        raise error
    await asyncio.sleep(RETRY_DELAY_S * len(tried))


async def resolve_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], pending: type
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Replace top-level arguments of type ``pending`` (responses) with their results."""
    args = tuple([await cast(Awaitable[Any], a) if isinstance(a, pending) else a for a in args])
    kwargs = {
        k: await cast(Awaitable[Any], v) if isinstance(v, pending) else v for k, v in kwargs.items()
    }
    return args, kwargs


# The runtime of this process, set while tandem runs here.
_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The runtime calls from here go through: the replica's own, if it has one (see
    :func:`current_runtime`), else this process's."""
    context = _replica_context.get()
    runtime = _runtime if context is None or context._runtime is None else context._runtime
    if runtime is None:  # shutdown() unsets the runtime before closing it
        raise DeploymentUnavailableError(
            "tandem is not running in this process; start an application with tandem.run() first."
        )
    return runtime


def current_runtime() -> Runtime | None:
    """This process's runtime, or, in a replica of an application run in local testing
    mode next to another backend's runtime, that application's own runtime."""
    context = _replica_context.get()
    return _runtime if context is None or context._runtime is None else context._runtime


def set_runtime(runtime: Runtime | None) -> None:
    global _runtime
    _runtime = runtime
