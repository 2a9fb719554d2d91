"""Request counts and latency histograms, per method, kept in plain numbers.

Replicas (and the proxy) update these on every request on their event loop,
which needs no locks; a Prometheus collector reads them only when scraped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds in seconds, from half a millisecond to a minute.
LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
LATENCY_BUCKETS += (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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
        running = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.buckets, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else str(bound), running))
        return out


class RequestStats:
    """The series of one replica, by method name."""

    def __init__(self) -> None:
        self.by_method: dict[str, Series] = {}

    def series(self, method: str) -> Series:
        series = self.by_method.get(method)
        if series is None:
            series = self.by_method[method] = Series()
        return series

    def record(self, method: str, seconds: float, failed: bool) -> None:
        series = self.by_method.get(method)
        if series is None:
            series = self.by_method[method] = Series()
        series.observe(seconds, failed)
