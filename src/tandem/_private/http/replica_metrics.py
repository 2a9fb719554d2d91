"""/metrics families about replicas and the requests waiting for them.

Per replica: the requests it serves now, whether it serves at all, and its
multiplexed models (how many it holds, which, and its loaders' calls, loads and
unloads with their times). Per deployment: its batch sizes by method, and the
requests waiting in callers' queues for one of its replicas. Read from the
controller's records and each replica's latest facts when /metrics is scraped
(the same refresh as the request series: ``ProxyMetrics.scrape``).

Each family has its Ray Serve counterpart in its help text; the README maps them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tandem._private.stats import ReplicaRow, Sizes

_REPLICA = ["application", "deployment", "replica"]


class ReplicaMetrics(Collector):
    """See the module docstring. ``rows``: every replica; ``queued``: (application,
    deployment) -> requests waiting in callers' queues (the driver's and replicas')."""

    def __init__(
        self,
        rows: Callable[[], list[ReplicaRow]],
        queued: Callable[[], dict[tuple[str, str], int]],
    ) -> None:
        self._rows = rows
        self._queued = queued

    def collect(self) -> Iterator[Any]:
        rows = self._rows()
        yield from self._replica_families(rows)
        yield from self._model_families(rows)
        yield from self._batch_family(rows)
        queued = GaugeMetricFamily(
            "tandem_deployment_queued_requests",
            "Requests waiting in callers' queues for a replica of the deployment "
            "(Ray Serve: ray_serve_deployment_queued_queries).",
            labels=["application", "deployment"],
        )
        for key, count in sorted(self._queued().items()):
            queued.add_metric(list(key), count)
        yield queued

    def _replica_families(self, rows: list[ReplicaRow]) -> Iterator[Any]:
        in_flight = GaugeMetricFamily(
            "tandem_replica_requests_in_flight",
            "Requests a replica is serving now (Ray Serve: ray_serve_replica_processing_queries).",
            labels=_REPLICA,
        )
        healthy = GaugeMetricFamily(
            "tandem_replica_healthy",
            "1 while a replica serves requests (RUNNING), else 0 "
            "(Ray Serve: ray_serve_deployment_replica_healthy).",
            labels=_REPLICA,
        )
        for row in rows:
            labels = [row.application, row.deployment, row.replica_id]
            in_flight.add_metric(labels, row.in_flight)
            healthy.add_metric(labels, 1 if row.state == "RUNNING" else 0)
        yield from (in_flight, healthy)

    def _model_families(self, rows: list[ReplicaRow]) -> Iterator[Any]:
        held = GaugeMetricFamily(
            "tandem_multiplexed_models",
            "Models a replica holds or is loading (Ray Serve: ray_serve_num_multiplexed_models).",
            labels=_REPLICA,
        )
        ids = GaugeMetricFamily(
            "tandem_multiplexed_model_id",
            "1 for each model a replica holds or is loading "
            "(Ray Serve: ray_serve_registered_multiplexed_model_id).",
            labels=[*_REPLICA, "model_id"],
        )
        requests = CounterMetricFamily(
            "tandem_multiplexed_get_model_requests",
            "Calls of a replica's @multiplexed loaders, cached or not "
            "(Ray Serve: ray_serve_multiplexed_get_model_requests_counter).",
            labels=_REPLICA,
        )
        loads = CounterMetricFamily(
            "tandem_multiplexed_model_loads",
            "Models a replica loaded (Ray Serve: ray_serve_multiplexed_models_load_counter).",
            labels=_REPLICA,
        )
        unloads = CounterMetricFamily(
            "tandem_multiplexed_model_unloads",
            "Models a replica unloaded (evicted, or at its stop) "
            "(Ray Serve: ray_serve_multiplexed_models_unload_counter).",
            labels=_REPLICA,
        )
        load_latency = HistogramMetricFamily(
            "tandem_multiplexed_model_load_latency_seconds",
            "Time a model took to load (Ray Serve: ray_serve_multiplexed_model_load_latency_ms).",
            labels=_REPLICA,
        )
        unload_latency = HistogramMetricFamily(
            "tandem_multiplexed_model_unload_latency_seconds",
            "Time a model took to unload "
            "(Ray Serve: ray_serve_multiplexed_model_unload_latency_ms).",
            labels=_REPLICA,
        )
        for row in rows:
            models = row.stats.models if row.stats is not None else None
            if models is None or not (models.get_model_requests or row.model_ids):
                continue  # no @multiplexed loader was called here
            labels = [row.application, row.deployment, row.replica_id]
            held.add_metric(labels, len(row.model_ids))
            for model_id in sorted(row.model_ids):
                ids.add_metric([*labels, model_id], 1)
            requests.add_metric(labels, models.get_model_requests)
            loads.add_metric(labels, models.loads.requests)
            unloads.add_metric(labels, models.unloads.requests)
            load_latency.add_metric(labels, models.loads.cumulative_buckets(), models.loads.seconds)
            unload_latency.add_metric(
                labels, models.unloads.cumulative_buckets(), models.unloads.seconds
            )
        yield from (held, ids, requests, loads, unloads, load_latency, unload_latency)

    def _batch_family(self, rows: list[ReplicaRow]) -> Iterator[Any]:
        sizes = HistogramMetricFamily(
            "tandem_batch_size",
            "Requests in each batch a @batch method ran, by deployment and method.",
            labels=["application", "deployment", "method"],
        )
        totals: dict[tuple[str, str, str], Sizes] = {}
        for row in rows:
            for method, batches in row.stats.batch_sizes.items() if row.stats else ():
                totals.setdefault((row.application, row.deployment, method), Sizes()).add(batches)
        for key, total in sorted(totals.items()):
            sizes.add_metric(list(key), total.cumulative_buckets(), total.total)
        yield sizes
