"""Custom metrics that user code records (``tandem.metrics``): the classes and the
values they keep in this process.

A metric made inside a replica (its constructor or methods) carries the
replica's tags, ``deployment``, ``replica`` and ``application``, fixed when it
is made, as in Ray Serve; one made elsewhere (the driver, module level) carries
only the user's. Values live in one store per process (the API, as Ray's, makes
metrics anywhere without naming a registry), grouped by the replica that made
the metric, so a replica's series can be reported on their own and forgotten
when it stops. Hosts send :class:`MetricsReport` snapshots to the driver with
the replica's facts; the driver's ``/metrics`` merges them
(``http/user_metrics.py``).
"""

from __future__ import annotations

import bisect
import itertools
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from tandem._private.calls.context import current_replica_context, current_request

DEPLOYMENT_TAG = "deployment"
REPLICA_TAG = "replica"
APPLICATION_TAG = "application"
ROUTE_TAG = "route"
RESERVED_TAGS = (DEPLOYMENT_TAG, REPLICA_TAG, APPLICATION_TAG)

# Prometheus's rule for metric names.
_VALID_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")

# ((tag key, value), ...) in the metric's tag_keys order.
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class HistogramValue:
    """Observations of one histogram series: a count per bucket (the last one for
    values above every bound) and their sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float


@dataclass(frozen=True)
class SeriesValue:
    """One series of a metric: its labels and its value."""

    name: str
    labels: Labels
    value: float | HistogramValue


@dataclass(frozen=True)
class MetricsReport:
    """A snapshot of user metrics, as a replica host sends it to the driver.

    ``seq`` grows with every snapshot a process takes, so the driver can keep
    the newest of two that arrive out of order (a counter never goes back).
    """

    seq: int
    kinds: dict[str, tuple[str, str]]  # metric name -> (kind, description)
    series: tuple[SeriesValue, ...]


class _Buckets:
    """A histogram series being recorded (mutable, under the store's lock)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def frozen(self) -> HistogramValue:
        return HistogramValue(self.bounds, tuple(self.counts), self.total)


class MetricStore:
    """This process's metric values, by the replica that made each metric (None:
    made outside any replica). Thread-safe: sync user code records from threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, tuple[str, str]] = {}
        self._owned: dict[str | None, dict[tuple[str, Labels], Any]] = {}
        self._seq = itertools.count(1)
        self._hooked: set[str] = set()  # replicas whose stop forgets their series

    def define(self, name: str, kind: str, description: str) -> None:
        """Register a metric name; the same name may not mean two kinds of metric."""
        with self._lock:
            known = self._kinds.setdefault(name, (kind, description))
        if known[0] != kind:
            raise ValueError(
                f"A {known[0]} named {name!r} already exists in this process, so a {kind} "
                "cannot take that name (Prometheus allows one type per name); choose "
                "another name."
            )

    def add(self, owner: str | None, name: str, labels: Labels, amount: float) -> None:
        with self._lock:
            cells = self._cells(owner)
            key = (name, labels)
            cells[key] = cells.get(key, 0.0) + amount

    def set(self, owner: str | None, name: str, labels: Labels, value: float) -> None:
        with self._lock:
            self._cells(owner)[(name, labels)] = float(value)

    def observe(
        self, owner: str | None, name: str, labels: Labels, bounds: tuple[float, ...], value: float
    ) -> None:
        with self._lock:
            cells = self._cells(owner)
            cell = cells.get((name, labels))
            if cell is None:
                cell = cells[(name, labels)] = _Buckets(bounds)
            # The series' own bounds: another Histogram of this name may have others.
            cell.counts[bisect.bisect_left(cell.bounds, value)] += 1  # a bucket holds <= bound
            cell.total += value

    def _cells(self, owner: str | None) -> dict[tuple[str, Labels], Any]:
        cells = self._owned.get(owner)
        if cells is None:
            cells = self._owned[owner] = {}
        return cells

    def report(self, owner: str | None) -> MetricsReport | None:
        """The series of metrics made by replica ``owner`` (None: outside replicas);
        None if there are none."""
        with self._lock:
            return self._snapshot(list((self._owned.get(owner) or {}).items()))

    def report_all(self) -> MetricsReport | None:
        """Every series in this process (a replica host's: one replica per process)."""
        with self._lock:
            return self._snapshot(
                [item for owned in self._owned.values() for item in owned.items()]
            )

    def _snapshot(self, cells: list[tuple[tuple[str, Labels], Any]]) -> MetricsReport | None:
        if not cells:
            return None
        series = tuple(
            SeriesValue(name, labels, cell.frozen() if isinstance(cell, _Buckets) else cell)
            for (name, labels), cell in cells
        )
        kinds = {s.name: self._kinds[s.name] for s in series}
        return MetricsReport(next(self._seq), kinds, series)

    def forget_on_stop(self, replica: Any, replica_id: str) -> None:
        """Drop a replica's series when it stops (through its ``closers``), so a
        stopped replica's series disappear even in the driver's process, where
        local replicas live. Once per replica."""
        with self._lock:
            if replica_id in self._hooked:
                return
            self._hooked.add(replica_id)
        replica.closers.append(lambda: self._forget(replica_id))

    def _forget(self, owner: str) -> None:
        with self._lock:
            self._owned.pop(owner, None)
            self._hooked.discard(owner)


# The process's store: metrics are made anywhere without naming a registry (the
# API is Ray's), so they find their store here.
STORE = MetricStore()


class Metric:
    """What Counter, Gauge and Histogram share: name, tags, default tags."""

    kind: ClassVar[str]

    def __init__(
        self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None
    ) -> None:
        if tag_keys and not isinstance(tag_keys, tuple):
            raise TypeError(
                f"tag_keys must be a tuple of str, got {type(tag_keys).__name__}; "
                'write e.g. tag_keys=("model",).'
            )
        user_keys: tuple[str, ...] = tuple(tag_keys or ())
        for key in user_keys:
            if not isinstance(key, str):
                raise TypeError(f"Tag keys must be str, got {type(key).__name__} ({key!r}).")
        self._discarded = _check_name(name)
        self._name = name
        self._description = description
        self._user_tag_keys = user_keys
        self._serve_tags = _serve_tags(user_keys)
        context = current_replica_context()
        self._owner = None if context is None else context.replica_id
        if context is not None and context._replica is not None:
            STORE.forget_on_stop(context._replica, context.replica_id)
        self._tag_keys = (*self._serve_tags, *user_keys)
        self._known_keys = frozenset(self._tag_keys)
        self._has_route = ROUTE_TAG in self._known_keys
        self._default_tags: dict[str, str] = dict(self._serve_tags)
        self._default_labels = self._labels_of(self._default_tags)
        if not self._discarded:
            STORE.define(name, self.kind, description)

    def set_default_tags(self, default_tags: dict[str, str]) -> Metric:
        """Tag values used when a record does not give them (replaces earlier defaults)."""
        if not isinstance(default_tags, Mapping):
            raise TypeError(
                f"default_tags must be a dict of str to str, got {type(default_tags).__name__}."
            )
        for key, value in default_tags.items():
            if key in self._serve_tags:
                raise ValueError(_reserved(key))
            if key not in self._known_keys:
                raise ValueError(
                    f"Unrecognized tag key {key!r}: this metric's tag_keys are "
                    f"{self._tag_keys}; add it to tag_keys when creating the metric."
                )
            _check_value(value)
        self._default_tags = {**default_tags, **self._serve_tags}
        self._default_labels = self._labels_of(self._default_tags)
        return self

    @property
    def info(self) -> dict[str, Any]:
        """The metric's name, description, tag keys and default tags."""
        return {
            "name": self._name,
            "description": self._description,
            "tag_keys": self._tag_keys,
            "default_tags": dict(self._default_tags),
        }

    def _labels_of(self, tags: dict[str, str]) -> Labels | None:
        """The labels of a record with exactly these tags, if they name every key
        (and the route, which a record takes from its request, is not one)."""
        if self._has_route or any(key not in tags for key in self._tag_keys):
            return None
        return tuple((key, tags[key]) for key in self._tag_keys)

    def _labels(self, tags: Mapping[str, str] | None) -> Labels:
        """The labels of one record: its tags over the defaults, all keys given."""
        if not tags:
            if self._default_labels is not None:  # the common case: nothing to merge
                return self._default_labels
            final = dict(self._default_tags)
        else:
            if not isinstance(tags, Mapping):
                raise TypeError(f"tags must be a dict of str to str, got {type(tags).__name__}.")
            for key, value in tags.items():
                if key not in self._known_keys:
                    raise ValueError(
                        f"Tag key {key!r} is not one of this metric's tag_keys "
                        f"{self._tag_keys}; add it to tag_keys when creating the metric."
                    )
                _check_value(value)
            final = {**self._default_tags, **tags}
        if self._has_route and not (tags and ROUTE_TAG in tags):
            request = current_request()  # Ray Serve tags a record with its request's route
            final[ROUTE_TAG] = request.route if request is not None else ""
        missing = [key for key in self._tag_keys if key not in final]
        if missing:
            raise ValueError(
                f"Missing value for tag key(s): {', '.join(missing)}; pass them in tags= "
                "or set_default_tags()."
            )
        return tuple((key, final[key]) for key in self._tag_keys)


class Counter(Metric):
    """A cumulative count: it only goes up (Prometheus' counter)."""

    kind = "counter"

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        """Add ``value`` (more than 0) to the count of the series ``tags`` pick."""
        _check_number(value)
        if value <= 0:
            raise ValueError(f"A counter only goes up: value must be > 0, got {value}.")
        labels = self._labels(tags)
        if not self._discarded:
            STORE.add(self._owner, self._name, labels, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._name, self._description, self._user_tag_keys or None))


class Gauge(Metric):
    """A value that goes up and down; it keeps the last one set (Prometheus' gauge)."""

    kind = "gauge"

    def set(self, value: float | None, tags: dict[str, str] | None = None) -> None:
        """Set the series ``tags`` pick to ``value`` (None: do nothing)."""
        if value is None:
            return
        _check_number(value)
        labels = self._labels(tags)
        if not self._discarded:
            STORE.set(self._owner, self._name, labels, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._name, self._description, self._user_tag_keys or None))


class Histogram(Metric):
    """Observations counted in buckets, with their sum (Prometheus' histogram)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: Sequence[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
    ) -> None:
        if boundaries is None or len(boundaries) == 0:
            raise ValueError(
                "A Histogram needs the upper bounds of its buckets, e.g. "
                'Histogram("latency_s", boundaries=[0.1, 1.0, 10.0]).'
            )
        for index, bound in enumerate(boundaries):
            _check_number(bound, what=f"boundaries[{index}]")
            if bound <= 0:
                raise ValueError(
                    f"Histogram boundaries must be positive; boundaries[{index}] is {bound} "
                    f"in {list(boundaries)}."
                )
        super().__init__(name, description, tag_keys)
        self.boundaries = boundaries
        # Sorted, whatever order they came in: the buckets are the same either way.
        self._bounds = tuple(sorted({float(bound) for bound in boundaries}))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        """Count ``value`` in its bucket of the series ``tags`` pick."""
        _check_number(value)
        labels = self._labels(tags)
        if not self._discarded:
            STORE.observe(self._owner, self._name, labels, self._bounds, value)

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "boundaries": self.boundaries}

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self._name, self._description, self.boundaries, self._user_tag_keys or None)
        return (type(self), args)


def _check_name(name: str) -> bool:
    """Whether a metric of this name is discarded (warned about: Ray does the same)."""
    if not isinstance(name, str):
        raise TypeError(f"A metric's name must be a str, got {type(name).__name__}.")
    if not name:
        raise ValueError("A metric needs a name; got an empty one.")
    if not _VALID_NAME.match(name):
        warnings.warn(
            f"Metric name {name!r} is not valid (letters, digits, _ and : only, not "
            "starting with a digit): the metric is discarded and nothing it records is "
            "exported.",
            UserWarning,
            stacklevel=4,
        )
        return True
    if ":" in name:
        warnings.warn(
            f"Metric name {name!r} contains ':', which Ray no longer allows in metric "
            "names; use '_' instead.",
            FutureWarning,
            stacklevel=4,
        )
    return False


def _serve_tags(user_keys: tuple[str, ...]) -> dict[str, str]:
    """The tags of the replica this runs in (none outside replicas)."""
    context = current_replica_context()
    if context is None:
        return {}
    for key in RESERVED_TAGS:
        if key in user_keys:
            raise ValueError(_reserved(key))
    tags = {DEPLOYMENT_TAG: context.deployment, REPLICA_TAG: context.replica_tag}
    if context.app_name:
        tags[APPLICATION_TAG] = context.app_name
    return tags


def _reserved(key: str) -> str:
    return (
        f"The tag {key!r} is set by tandem on metrics made in a replica (deployment, "
        "replica, application); choose another tag key."
    )


def _check_value(value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"Tag values must be str, got {type(value).__name__} ({value!r}).")


def _check_number(value: object, what: str = "value") -> None:
    if not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be an int or float, got {type(value).__name__}.")
