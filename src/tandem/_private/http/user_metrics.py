"""``tandem.metrics`` on ``/metrics``: every replica's custom metrics and the driver's,
under Ray's Prometheus names (``ray_<name>``; a counter's samples ``ray_<name>_total``).

Replicas report snapshots of their series with their facts (``user_metrics``):
read in place for local replicas, sent by replica hosts for the others. This
collector keeps the newest snapshot of each replica it is shown (by sequence
number, so a late, older one cannot turn a counter back) and forgets a replica
as soon as it is no longer listed: a dead or replaced replica's series
disappear. Series with equal labels from several sources (metrics made outside
any replica, in several processes) are added up; for a gauge the last one
listed wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from tandem._private.user_metrics import STORE, HistogramValue, Labels, MetricsReport

logger = logging.getLogger("tandem")

PREFIX = "ray_"  # Ray's, so dashboards built on Ray Serve's metrics keep working

# (replica id, its latest report or None) for every replica the controller knows.
ReplicaReports = Callable[[], Iterable[tuple[str, MetricsReport | None]]]


class UserMetrics(Collector):
    """Custom metrics of the replicas ``replicas`` lists and of this process."""

    def __init__(self, replicas: ReplicaReports) -> None:
        self._replicas = replicas
        self._latest: dict[str, MetricsReport] = {}
        self._conflicts_told: set[str] = set()

    def reports(self) -> list[MetricsReport]:
        """This process's own series (made outside replicas), then each replica's newest."""
        latest: dict[str, MetricsReport] = {}
        for replica_id, report in self._replicas():
            known = self._latest.get(replica_id)
            if report is None or (known is not None and known.seq > report.seq):
                report = known
            if report is not None:
                latest[replica_id] = report
        self._latest = latest  # replicas no longer listed are forgotten
        own = STORE.report(None)
        return [*([own] if own is not None else []), *latest.values()]

    def collect(self) -> Iterator[Metric]:
        kinds: dict[str, tuple[str, str]] = {}
        values: dict[str, dict[Labels, Any]] = {}
        for report in self.reports():
            for series in report.series:
                kind = report.kinds[series.name]
                known = kinds.setdefault(series.name, kind)
                if known[0] != kind[0]:
                    self._tell_conflict(series.name, known[0], kind[0])
                    continue
                by_labels = values.setdefault(series.name, {})
                by_labels[series.labels] = _merge(by_labels.get(series.labels), series.value, kind)
        for name in sorted(values):
            yield _family(name, *kinds[name], values[name])

    def _tell_conflict(self, name: str, kind: str, other: str) -> None:
        if name not in self._conflicts_told:
            self._conflicts_told.add(name)
            logger.warning(
                "Custom metric %r is a %s in one replica and a %s in another; /metrics "
                "exports only the %s. Give the two metrics different names.",
                name,
                kind,
                other,
                kind,
            )


def _merge(
    old: float | HistogramValue | None, new: float | HistogramValue, kind: tuple[str, str]
) -> float | HistogramValue:
    if old is None or kind[0] == "gauge":
        return new
    if isinstance(old, HistogramValue) and isinstance(new, HistogramValue):
        if old.bounds != new.bounds:
            return old  # buckets that do not line up cannot be added
        counts = tuple(a + b for a, b in zip(old.counts, new.counts, strict=True))
        return HistogramValue(old.bounds, counts, old.total + new.total)
    assert isinstance(old, float | int) and isinstance(new, float | int)
    return old + new


def _family(name: str, kind: str, description: str, series: dict[Labels, Any]) -> Metric:
    """One Prometheus family, named as Ray names it."""
    full = PREFIX + name
    if kind == "counter":
        base = full.removesuffix("_total")  # Ray exports "x_total" as ray_x_total too
        family = Metric(base, description, "counter")
        for labels, value in series.items():
            family.add_sample(base + "_total", dict(labels), value)
        return family
    family = Metric(full, description, kind)
    for labels, value in series.items():
        if kind == "gauge":
            family.add_sample(full, dict(labels), value)
            continue
        running = 0
        for bound, count in zip((*value.bounds, float("inf")), value.counts, strict=True):
            running += count
            bucket = {**dict(labels), "le": _bound_text(bound)}
            family.add_sample(full + "_bucket", bucket, running)
        family.add_sample(full + "_count", dict(labels), running)
        family.add_sample(full + "_sum", dict(labels), value.total)
    return family


def _bound_text(bound: float) -> str:
    """A bucket's ``le`` as Prometheus (and Ray) write it: 1.0, 0.25, +Inf."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
