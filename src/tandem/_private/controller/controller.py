"""The controller: target state versus running state, for every deployment.

It deploys applications (starting replicas in dependency order, so a parent's
constructor can already call its children), updates them in place, deletes
them, and publishes each deployment's replica set to the routers. A deploy is
a transaction: if a replica of it fails to start, ``run()`` raises and nothing
of the new version is left behind. Once a deployment runs, the reconciliation
loop (:mod:`.reconcile`) keeps it at its target and never gives up on it.

The pieces: the records of what runs (:mod:`.records`), starting, stopping and
publishing replicas (:mod:`.replicas`), health checks (:mod:`.health`), the
route table (:mod:`.routes`) and status (:mod:`.describe`, :mod:`.status`).

It runs on the runtime's event loop. :meth:`Controller.open` starts the loop;
:meth:`Controller.close` stops every application and awaits every task the
controller started. One lock serializes deploys and deletes: a deploy that
waits for slow constructors delays another application's deploy or delete
(not the reconciliation of running deployments, which takes no lock).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tandem._private.app.external_scaler import (
    ExternalScalerDisabledError,
    autoscaled,
    check_external_scaler,
    disabled_message,
)
from tandem._private.app.options import DeploymentOptions
from tandem._private.app.policy_import import check_policies, policies_of
from tandem._private.app.spec import ApplicationSpec, DeploymentSpec
from tandem._private.backends.base import Backend
from tandem._private.calls.context import DeploymentID
from tandem._private.calls.router import ReplicaSet
from tandem._private.controller.autoscaling import Autoscaler
from tandem._private.controller.describe import (
    dropped_series,
    each_replica,
    proxy_counts,
    render_status,
    replica_rows,
    request_series,
    user_metric_reports,
)
from tandem._private.controller.logs import recent_logs
from tandem._private.controller.overview import overview
from tandem._private.controller.reconcile import Reconciler
from tandem._private.controller.records import ApplicationRecord, DeploymentRecord, ReplicaRecord
from tandem._private.controller.replicas import Fleet, StartFailed, deploy_error
from tandem._private.controller.routes import RouteTable, check_prefix_free
from tandem._private.controller.status import ApplicationState, Status
from tandem._private.stats import ReplicaRow
from tandem.exceptions import DeploymentFailedError


class Controller:
    """See the module docstring."""

    def __init__(
        self,
        backend: Backend,
        publish: Callable[[ReplicaSet], None],
        clock: Callable[[], float] = time.monotonic,
        queued: Callable[[DeploymentID], int] = lambda _: 0,
        drops: Callable[[], dict[tuple[str, str, str], int]] = dict,
    ) -> None:
        self.backend = backend
        self._drops = drops  # the driver's Runtime.deadline_drops
        self._queued = queued  # the driver's Runtime.queued
        self._clock = clock
        self._apps: dict[str, ApplicationRecord] = {}
        self._lock = asyncio.Lock()
        self._routes = RouteTable()
        # Called after every change of the route table (direct ingress re-plans on it).
        self.routes_changed: list[Callable[[], None]] = []
        self._fleet = Fleet(backend, publish, self._serves_http, clock)
        self._reconciler = Reconciler(self._apps, self._fleet, clock, queued)

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        await self.backend.open(self._reconciler)  # it takes the backend's events
        self._reconciler.open()

    async def close(self) -> None:
        """Stop every application and the reconciliation loop."""
        await self._reconciler.close()
        for app in self._apps.values():
            for record in app.deployments.values():
                await record.cancel_starts()
        async with self._lock:
            await asyncio.gather(*(self._remove_app(name) for name in list(self._apps)))
        await self._fleet.close()
        await self.backend.close()

    # -- applications ------------------------------------------------------

    def app_names(self) -> list[str]:
        return list(self._apps)

    def ingress(self, app_name: str) -> str | None:
        app = self._apps.get(app_name)
        return None if app is None else app.spec.ingress

    def route_prefixes(self) -> dict[str, str]:
        return self._routes.prefixes()

    def deployment_options(self, app_name: str, deployment: str) -> DeploymentOptions | None:
        """The options a running deployment was deployed with (None: no such deployment)."""
        app = self._apps.get(app_name)
        record = None if app is None else app.deployments.get(deployment)
        return None if record is None else record.spec.options

    def routes(self) -> tuple[tuple[str, str, str], ...]:
        """(prefix, application, ingress) of every running application, longest prefix first."""
        return self._routes.routes()

    async def deploy(self, spec: ApplicationSpec) -> None:
        """Deploy or update one application; return once all its replicas serve."""
        check_policies(policies_of(spec))  # a bad policy fails the deploy before it starts
        check_external_scaler(
            spec.name,
            spec.external_scaler_enabled,
            autoscaled((d.name, d.options) for d in spec.deployments),
        )
        async with self._lock:
            check_prefix_free(spec, self._apps)
            old = self._apps.get(spec.name)
            if old is not None:
                # The deploy decides the replica count now; the loop's starts would race it.
                for running in old.deployments.values():
                    await running.cancel_starts()
            app = ApplicationRecord(spec, {})
            fresh: list[DeploymentRecord] = []
            kept: list[tuple[DeploymentRecord, DeploymentSpec]] = []
            for dspec in spec.deployments:
                prev = old.deployments.get(dspec.name) if old else None
                if prev is not None and prev.spec.same_code(dspec):
                    kept.append((prev, dspec))
                    app.deployments[dspec.name] = prev
                    continue
                record = DeploymentRecord(DeploymentID(app_name=spec.name, name=dspec.name), dspec)
                fresh.append(record)
                app.deployments[dspec.name] = record
                if prev is None:
                    # Callers may resolve it now; they wait until replicas are published.
                    self._fleet.publish(record, replicas=())
            self._apps[spec.name] = app
            started: dict[str, list[ReplicaRecord]] = {}
            try:
                brand_new = {
                    r.spec.name for r in fresh if old is None or r.spec.name not in old.deployments
                }
                await self._start_all(fresh, kept, started, brand_new)
            except BaseException as exc:
                await self._fleet.stop([r for rs in started.values() for r in rs], timeout_s=0)
                for record in fresh:
                    if old is None or record.spec.name not in old.deployments:
                        self._fleet.publish(record, replicas=(), state="deleted")
                if old is None:
                    del self._apps[spec.name]
                else:
                    self._apps[spec.name] = old
                self._rebuild_routes()
                if isinstance(exc, StartFailed):
                    raise deploy_error(exc) from exc.error.error
                raise
            await self._commit(app, old, fresh, kept, started)

    async def _start_all(
        self,
        fresh: list[DeploymentRecord],
        kept: list[tuple[DeploymentRecord, DeploymentSpec]],
        started: dict[str, list[ReplicaRecord]],
        brand_new: set[str],
    ) -> None:
        """Start new replicas, children before parents, siblings at once."""
        ready = {record.spec.name: asyncio.Event() for record in fresh}

        async def start(record: DeploymentRecord, count: int, first_rank: int, new: bool) -> None:
            for dependency in record.spec.dependencies:
                if dependency in ready:
                    await ready[dependency].wait()
            bucket = started.setdefault(record.spec.name, [])

            async def one(rank: int) -> None:
                bucket.append(await self._fleet.start(record, rank))

            siblings = [asyncio.ensure_future(one(first_rank + i)) for i in range(count)]
            try:
                await asyncio.gather(*siblings)
            except BaseException:
                # One failed: the others must not finish starting behind our back.
                for sibling in siblings:
                    sibling.cancel()
                await asyncio.gather(*siblings, return_exceptions=True)
                raise
            if new:
                if record.spec.name in brand_new:
                    # Routable at once, so the constructors of its parents can call it.
                    record.replicas = sorted(bucket, key=lambda r: r.rank)
                    self._fleet.publish(record)
                ready[record.spec.name].set()

        jobs = [start(record, record.target, 0, True) for record in fresh]
        for prev, dspec in kept:
            wanted = DeploymentRecord(prev.id, dspec, scaled_target=prev.kept_target(dspec)).target
            if wanted > len(prev.replicas):
                record = DeploymentRecord(prev.id, dspec)
                jobs.append(start(record, wanted - len(prev.replicas), len(prev.replicas), False))
        tasks = [asyncio.ensure_future(job) for job in jobs]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _commit(
        self,
        app: ApplicationRecord,
        old: ApplicationRecord | None,
        fresh: list[DeploymentRecord],
        kept: list[tuple[DeploymentRecord, DeploymentSpec]],
        started: dict[str, list[ReplicaRecord]],
    ) -> None:
        retired: list[ReplicaRecord] = []

        def retire(replicas: list[ReplicaRecord]) -> None:
            retired.extend(replicas)
            self._fleet.leaving(replicas)  # counted in /metrics through the awaits below

        for record in fresh:
            record.replicas = sorted(started.get(record.spec.name, []), key=lambda r: r.rank)
            record.refresh_state()
            self._fleet.publish(record)
            prev = old.deployments.get(record.spec.name) if old else None
            if prev is not None:
                prev.removed = True
                retire(prev.replicas)
        problems: list[str] = []
        for prev, dspec in kept:
            prev.message = ""
            old_config = prev.spec.options.user_config
            prev.scaled_target = prev.kept_target(dspec)
            if prev.spec.options.autoscaling != dspec.options.autoscaling:
                auto = dspec.options.autoscaling
                prev.autoscaler = Autoscaler(auto) if auto is not None else None
            prev.spec = dspec
            prev.replicas.extend(sorted(started.get(dspec.name, []), key=lambda r: r.rank))
            resized = bool(started.get(dspec.name)) or len(prev.replicas) > prev.target
            if len(prev.replicas) > prev.target:
                retire(prev.replicas[prev.target :])
                del prev.replicas[prev.target :]
            if resized:
                # The deployment changed size: every replica learns its place anew.
                for rank, replica in enumerate(prev.replicas):
                    replica.rank = rank
                await asyncio.gather(
                    *(self.backend.set_rank(r.info, r.rank, prev.target) for r in prev.replicas)
                )
            prev.refresh_state()
            if dspec.options.user_config != old_config and dspec.options.user_config is not None:
                results = await asyncio.gather(
                    *(
                        self.backend.reconfigure(r.info, dspec.options.user_config)
                        for r in prev.replicas
                    ),
                    return_exceptions=True,
                )
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    prev.message = f"reconfigure raised {type(errors[0]).__name__}: {errors[0]}"
                    prev.refresh_state()
                    problems.append(f"Deployment {dspec.name!r}: {prev.message}")
            self._fleet.publish(prev)
        if old is not None:
            for name, record in old.deployments.items():
                if name not in app.deployments:
                    record.removed = True
                    self._fleet.publish(record, replicas=(), state="deleted")
                    retire(record.replicas)
        app.status = ApplicationState.UNHEALTHY if problems else ApplicationState.RUNNING
        app.message = " ".join(problems)
        self._rebuild_routes()
        self._fleet.stop_later(retired)
        if problems:
            raise DeploymentFailedError(
                f"Application {app.spec.name!r} was updated, but: " + " ".join(problems)
            )

    async def scale(self, app_name: str, deployment: str, target: int) -> None:
        """Set a deployment's target replica count for an external scaler; the loop
        starts or stops replicas to match.

        Raises LookupError for an unknown application or deployment, and
        ExternalScalerDisabledError if its application did not enable the external scaler.
        """
        async with self._lock:  # a deploy or delete under way decides first
            app = self._apps.get(app_name)
            if app is None:
                raise LookupError(f"There is no application {app_name!r}.")
            record = app.deployments.get(deployment)
            if record is None:
                raise LookupError(f"Application {app_name!r} has no deployment {deployment!r}.")
            if not app.spec.external_scaler_enabled:
                raise ExternalScalerDisabledError(disabled_message(app_name, deployment))
            self._reconciler.set_target(record, target, "external scaler")

    async def delete(self, name: str) -> bool:
        async with self._lock:
            if name not in self._apps:
                return False
            await self._remove_app(name)
            return True

    async def _remove_app(self, name: str) -> None:
        app = self._apps[name]
        app.status = ApplicationState.DELETING
        self._rebuild_routes()
        replicas: list[ReplicaRecord] = []
        for record in app.deployments.values():
            record.removed = True
            self._fleet.publish(record, replicas=(), state="deleted")
            await record.cancel_starts()
            replicas.extend(record.replicas)
        await self._fleet.stop(replicas)
        for record in app.deployments.values():
            record.replicas.clear()
        del self._apps[name]
        self._fleet.forget_served(name)
        self._rebuild_routes()

    def _rebuild_routes(self) -> None:
        self._routes.rebuild(self._apps)
        for listener in list(self.routes_changed):
            listener()

    def _serves_http(self, deployment: DeploymentID) -> bool:
        app = self._apps.get(deployment.app_name)
        return (
            app is not None
            and app.spec.ingress == deployment.name
            and app.spec.route_prefix is not None
        )

    # -- status ------------------------------------------------------------

    @property
    def replica_restarts(self) -> dict[tuple[str, str, str], int]:
        """Replicas replaced, by (application, deployment, reason), for /metrics."""
        return self._reconciler.replica_restarts

    @property
    def start_failures(self) -> dict[tuple[str, str, str], int]:
        """Failed replica starts, by (application, deployment, reason), for /metrics."""
        return self._reconciler.start_failures

    async def refresh_reports(self, timeout_s: float = 0.5) -> None:
        """Ask every replica for its in-flight count and request stats (bounded wait)."""
        infos = [
            r.info
            for app in self._apps.values()
            for d in app.deployments.values()
            for r in d.replicas
        ]
        if infos:
            await asyncio.wait(
                [asyncio.ensure_future(self.backend.refresh(info)) for info in infos],
                timeout=timeout_s,
            )

    def deployment_series(self) -> list[tuple[str, str, str, Any]]:
        """Per-method request series of every replica, for /metrics."""
        listed = {replica.replica_id for _, _, replica in each_replica(self._apps)}
        return (
            request_series(self._apps, self.backend)
            + self._fleet.served_series(listed)
            + dropped_series(self._drops())
        )

    def replica_rows(self) -> list[ReplicaRow]:
        """Every replica, for /metrics."""
        return replica_rows(self._apps, self.backend)

    def queued_requests(self) -> dict[tuple[str, str], int]:
        """(application, deployment) -> requests waiting in callers' queues for it: the
        driver's, and those the backend's replica processes reported."""
        return {
            (app, name): self._queued(record.id) + self.backend.queued(record.id)
            for app, application in self._apps.items()
            for name, record in application.deployments.items()
        }

    def proxy_counts(self) -> dict[str, Any]:
        """Replica id -> the request counts of its process's own proxy (direct ingress)."""
        return proxy_counts(self._apps, self.backend)

    def serve_direct(self, plan: Any, metrics: Callable[[], Awaitable[bytes]] | None) -> None:
        """Ingress replicas serve HTTP themselves under ``plan`` (http/direct.py); None
        stops them. ValueError if the backend cannot."""
        if not self.backend.serves_direct_ingress:
            raise ValueError(
                "Direct ingress (TANDEM_DIRECT_INGRESS=1, tandem run --direct-ingress) needs "
                f"the process backend: on the {self.backend.name} backend no replica runs in a "
                "process of its own on this machine. Unset TANDEM_DIRECT_INGRESS, or use "
                "backend='process'."
            )
        self.backend.serve_direct(plan, metrics)

    def user_metrics(self) -> list[tuple[str, Any]]:
        """Every replica's custom metrics (tandem.metrics) as last reported, for /metrics."""
        return user_metric_reports(self._apps, self.backend)

    async def recent_logs(
        self,
        app: str | None = None,
        deployment: str | None = None,
        replica: str | None = None,
        request_id: str | None = None,
        limit: int = 100,
        after: dict[str, int] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """(lines, cursors): the replicas' recent log lines (``controller.logs``)."""
        return await recent_logs(
            self._apps,
            self.backend,
            app=app,
            deployment=deployment,
            replica=replica,
            request_id=request_id,
            limit=limit,
            after=after,
        )

    def status(self) -> Status:
        return render_status(self._apps, self.backend, self._clock())

    def overview(self) -> dict[str, Any]:
        """What the dashboard shows (``controller.overview``), as of the last reports."""
        return overview(
            self._apps,
            self.backend,
            self.deployment_series(),
            self.queued_requests(),
            self._reconciler.retired,
            self._clock(),
        )
