"""The replica host that the process worker and the ray actor share (replica/host.py).

Covers: a stream's generator runs only a bounded way ahead of a reader that
stops, and goes on once it reads (the same bound on every remote backend, and
the credit that enforces it); the driver's import path reaches the replica,
after the replica's own entries and without entries that do not exist there.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import tandem as serve
from helpers import wait_for
from tandem._private.calls.flow import READ_REPORT_EVERY, STREAM_BUFFER, Credit, ReadReports

# Far more than any bound: a producer that is not held back gets to the end.
TOTAL = 20 * STREAM_BUFFER
# The items a stream's generator may be ahead of what its reader took: the
# handle's buffer, the way from the replica, and what a reader in another thread
# took from the handle in one go, STREAM_BUFFER each, plus the items in hand at
# either end.
AHEAD = 3 * STREAM_BUFFER + 2


@serve.deployment(graceful_shutdown_timeout_s=0.2)
class Producer:
    def __init__(self) -> None:
        self.produced = 0

    async def numbers(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            self.produced += 1
            yield i

    async def count(self) -> int:
        return self.produced


def _settled(read: Callable[[], int], reads: int = 5) -> int:
    """The value ``read`` stops changing at: the same ``reads`` times in a row."""
    values: list[int] = []

    def steady() -> bool:
        values.append(read())
        return len(values) >= reads and len(set(values[-reads:])) == 1

    wait_for(steady, timeout_s=20, interval_s=0.05)
    return values[-1]


def test_a_stream_stays_a_bounded_way_ahead_of_a_reader_that_stops(remote_backend: str) -> None:
    handle = serve.run(Producer.bind(), backend=remote_backend)
    items = iter(handle.options(stream=True).numbers.remote(TOTAL))
    taken = [next(items)]
    produced = _settled(lambda: handle.count.remote().result(timeout_s=10))
    assert produced <= len(taken) + AHEAD, f"{produced} items produced for a reader that took 1"
    # Reading on lets it go on, and nothing was lost while it waited.
    taken.extend(items)
    assert taken == list(range(TOTAL))


def test_credit_holds_a_producer_at_the_bound_until_its_reader_reports() -> None:
    async def main() -> None:
        credit = Credit()
        sent = 0

        async def produce() -> None:
            nonlocal sent
            while True:
                sent += 1
                await credit.sent()

        async def settle() -> None:
            for _ in range(10):  # the producer waits for nothing else: a few turns do
                await asyncio.sleep(0)

        producer = asyncio.ensure_future(produce())
        await settle()
        assert sent == STREAM_BUFFER
        credit.read(READ_REPORT_EVERY)
        await settle()
        assert sent == STREAM_BUFFER + READ_REPORT_EVERY
        producer.cancel()

    asyncio.run(main())


def test_read_reports_come_in_batches() -> None:
    reports: list[int] = []
    reads = ReadReports(reports.append)
    for _ in range(3 * READ_REPORT_EVERY - 1):
        reads.took()
    assert reports == [READ_REPORT_EVERY, READ_REPORT_EVERY]


@serve.deployment
class PathProbe:
    def path(self) -> list[str]:
        return list(sys.path)

    def value_of(self, module: str) -> str:
        return str(importlib.import_module(module).VALUE)


def test_the_drivers_import_path_reaches_the_replica(
    remote_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica process resolves imports as the driver does (the driver's entries
    first, so a user's module may shadow an installed one); a Ray actor keeps its
    own entries first (runtime_env packages must not be shadowed)."""
    (tmp_path / "driver_path_probe.py").write_text("VALUE = 'found'\n")
    missing = str(tmp_path / "no-such-folder")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(missing)
    handle = serve.run(PathProbe.bind(), backend=remote_backend)
    assert handle.value_of.remote("driver_path_probe").result(timeout_s=30) == "found"
    path = handle.path.remote().result(timeout_s=10)
    stdlib = os.path.dirname(os.__file__)
    assert missing not in path
    if remote_backend == "process":
        assert path.index(str(tmp_path)) < path.index(stdlib)
    else:
        assert path.index(str(tmp_path)) > path.index(stdlib)
