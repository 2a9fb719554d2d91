"""Request counts and latency histograms, per method, kept in plain numbers; and a
replica's batch sizes and multiplexed model loads.

Replicas (and the proxy) update these on every request on their event loop,
which needs no locks; a Prometheus collector reads them only when scraped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds in seconds, from half a millisecond to a minute.
LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
LATENCY_BUCKETS += (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Upper bounds of batch sizes.
SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Prometheus's cumulative buckets of per-bucket ``counts`` (the last: above all)."""
    running = 0
    out: list[tuple[str, float]] = []
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else str(bound), running))
    return out


@dataclass
class Series:
    """Requests, errors and a latency histogram for one method (or route)."""

    requests: int = 0
    errors: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    seconds: float = 0.0
    # Requests whose deadline passed: before they started (dropped, never run), and
    # while they ran (cancelled; also counted in requests and errors).
    dropped: int = 0
    timed_out: int = 0

    def observe(self, seconds: float, failed: bool) -> None:
        self.requests += 1
        self.errors += failed
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds

    def add(self, other: Series) -> None:
        """Add ``other``'s requests to these."""
        self.requests += other.requests
        self.errors += other.errors
        self.seconds += other.seconds
        self.dropped += other.dropped
        self.timed_out += other.timed_out
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]

    def cumulative_buckets(self) -> list[tuple[str, float]]:
        return cumulative(LATENCY_BUCKETS, self.buckets)


@dataclass
class Sizes:
    """A histogram of sizes (of batches)."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(SIZE_BUCKETS) + 1))
    total: int = 0

    def observe(self, size: int) -> None:
        self.buckets[bisect.bisect_left(SIZE_BUCKETS, size)] += 1
        self.total += size

    def add(self, other: Sizes) -> None:
        self.total += other.total
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]

    def cumulative_buckets(self) -> list[tuple[str, float]]:
        return cumulative(SIZE_BUCKETS, self.buckets)


@dataclass
class ModelStats:
    """A replica's multiplexed models (``@multiplexed``): calls of its loaders, the
    loads they made and the unloads (evictions), with the time each took."""

    get_model_requests: int = 0
    loads: Series = field(default_factory=Series)  # errors: loads that raised
    unloads: Series = field(default_factory=Series)


@dataclass(frozen=True)
class ReplicaRow:
    """One replica as /metrics shows it (``http.replica_metrics``)."""

    application: str
    deployment: str
    replica_id: str
    state: str
    model_ids: frozenset[str]
    in_flight: int
    stats: RequestStats | None


@dataclass(frozen=True)
class FailedRequest:
    """The last request a replica failed: when (``time.time()``), its id, and the error."""

    at: float
    request_id: str
    error: str


class RequestStats:
    """The series of one replica, by method name and by calling deployment (its
    ``RequestMetadata.caller``: the dashboard's edges); its batch sizes by method;
    its multiplexed models; the last request it failed."""

    def __init__(self) -> None:
        self.by_method: dict[str, Series] = {}
        self.by_caller: dict[str, Series] = {}
        self.batch_sizes: dict[str, Sizes] = {}
        self.models = ModelStats()
        self.last_failure: FailedRequest | None = None

    def sizes(self, method: str) -> Sizes:
        sizes = self.batch_sizes.get(method)
        if sizes is None:
            sizes = self.batch_sizes[method] = Sizes()
        return sizes

    def series(self, method: str) -> Series:
        series = self.by_method.get(method)
        if series is None:
            series = self.by_method[method] = Series()
        return series

    def record(self, method: str, seconds: float, failed: bool, caller: str = "") -> None:
        series = self.by_method.get(method)
        if series is None:
            series = self.by_method[method] = Series()
        series.observe(seconds, failed)
        series = self.by_caller.get(caller)
        if series is None:
            series = self.by_caller[caller] = Series()
        series.observe(seconds, failed)
