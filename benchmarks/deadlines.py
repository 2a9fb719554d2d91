"""Goodput of an overloaded 2-stage app with mixed deadlines, with and without
deadline propagation.

The app: an ingress (stage 1) does a little work and calls a worker (stage 2)
through a handle; the worker does the expensive work. Capacity is set by
concurrency, not CPU: the worker sleeps ``--service-ms`` per call and has
``--replicas`` replicas x ``--max-ongoing`` slots, so it answers at most
replicas x max_ongoing / service time calls a second. The ingress has room for
thousands of calls, so the excess queues in front of the worker.

The driver offers an open loop of Poisson arrivals at ``--overload`` x capacity
for ``--seconds`` (after a short warm-up), each request a task on the driver's
asyncio loop. Requests have a tight (``--tight-ms``) or a loose (``--loose-ms``)
deadline, a ``--tight-share`` of them tight. Three modes, each a fresh
``serve.run`` with the same arrivals:

``no deadline``: calls carry no deadline; the client waits for every answer and
counts it good only if it came within the request's deadline.
``propagated``: ``handle.options(timeout_s=deadline)``; the ingress's call to the
worker inherits it, so a request past its deadline is dropped from the queue or
cancelled while running (DeadlineExceededError, counted as dropped).
``tight first``: as ``propagated``, and tight requests have priority 1
(``handle.options(priority=1)``, inherited by the ingress's call), so they leave
the worker's queue before loose ones.

Prints, per backend and mode: offered req/s, goodput (good answers/s), good
answers per deadline class, misses (everything not good), dropped, p50/p99
latency of the good answers; then goodput of each mode / no deadline.

Usage: python benchmarks/deadlines.py [--backends local,process] [--seconds 10]
           [--overload 1.5] [--tight-ms 100] [--loose-ms 1000] [--tight-share 0.5]
           [--service-ms 20] [--replicas 2] [--max-ongoing 4] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import tandem as serve
from tandem.exceptions import DeadlineExceededError

INGRESS_WORK_S = 0.002
WARMUP_S = 1.0


def build(service_s: float, replicas: int, max_ongoing: int) -> Any:
    """The 2-stage app: Ingress (cheap, roomy) -> Worker (the bottleneck)."""

    @serve.deployment(num_replicas=replicas, max_ongoing_requests=max_ongoing)
    class Worker:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(service_s)
            return x

    @serve.deployment(max_ongoing_requests=100_000)
    class Ingress:
        def __init__(self, worker: Any) -> None:
            self.worker = worker

        async def __call__(self, x: int) -> int:
            await asyncio.sleep(INGRESS_WORK_S)
            return await self.worker.remote(x)

    return Ingress.bind(Worker.bind())


@dataclass
class Arrival:
    at_s: float  # offset from the start of the load
    deadline_s: float
    tight: bool


@dataclass
class Tally:
    sent: int = 0
    span_s: float = 0.0
    good: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    late: int = 0
    dropped: int = 0
    errors: int = 0
    good_latencies: list[float] = field(default_factory=list)


def arrivals(rate: float, seconds: float, args: argparse.Namespace) -> list[Arrival]:
    """Poisson arrivals at ``rate``/s for ``seconds``, the same for a given seed."""
    rng = random.Random(args.seed)
    result, at = [], rng.expovariate(rate)
    while at < seconds:
        tight = rng.random() < args.tight_share
        deadline = (args.tight_ms if tight else args.loose_ms) / 1000
        result.append(Arrival(at, deadline, tight))
        at += rng.expovariate(rate)
    return result


@dataclass(frozen=True)
class Mode:
    name: str
    propagate: bool  # calls carry the request's deadline
    tight_first: bool = False  # tight requests have priority 1


MODES = (
    Mode("no deadline", propagate=False),
    Mode("propagated", propagate=True),
    Mode("tight first", propagate=True, tight_first=True),
)


async def one_request(handle: Any, arrival: Arrival, index: int, mode: Mode, tally: Tally) -> None:
    started = time.perf_counter()
    try:
        if mode.propagate:
            priority = 1 if mode.tight_first and arrival.tight else 0
            await handle.options(timeout_s=arrival.deadline_s, priority=priority).remote(index)
        else:
            await handle.remote(index)
    except DeadlineExceededError:
        tally.dropped += 1
        return
    except Exception:  # counted, so a failure shows in the figures
        tally.errors += 1
        return
    latency = time.perf_counter() - started
    if latency <= arrival.deadline_s:
        tally.good[arrival.tight] += 1
        tally.good_latencies.append(latency)
    else:
        tally.late += 1


async def offer(handle: Any, schedule: list[Arrival], mode: Mode) -> Tally:
    """Launch each request as a task at its arrival time (open loop); await all."""
    tally = Tally()
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    next_index = 0
    while next_index < len(schedule):
        now = time.perf_counter() - start
        while next_index < len(schedule) and schedule[next_index].at_s <= now:
            request = one_request(handle, schedule[next_index], next_index, mode, tally)
            tasks.append(asyncio.create_task(request))
            next_index += 1
        if next_index < len(schedule):
            await asyncio.sleep(max(0.0, schedule[next_index].at_s - (time.perf_counter() - start)))
    tally.sent = len(tasks)
    tally.span_s = time.perf_counter() - start
    await asyncio.gather(*tasks)  # drain: every request answered, late or dropped
    return tally


def run_mode(backend: str, mode: Mode, rate: float, args: argparse.Namespace) -> Tally:
    app = build(args.service_ms / 1000, args.replicas, args.max_ongoing)
    handle = serve.run(app, backend=backend, route_prefix=None)

    async def warm_then_measure() -> Tally:
        await offer(handle, arrivals(rate / 2, WARMUP_S, args), mode)  # no backlog
        return await offer(handle, arrivals(rate, args.seconds, args), mode)

    try:
        return asyncio.run(warm_then_measure())
    finally:
        serve.shutdown()


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report(backend: str, mode: str, tally: Tally) -> float:
    good = tally.good[True] + tally.good[False]
    goodput = good / tally.span_s
    misses = tally.sent - good
    print(
        f"{backend:<8} {mode:<12} {tally.sent / tally.span_s:>7.0f} {goodput:>9.0f} "
        f"{tally.good[True]:>8} {tally.good[False]:>8} {misses:>7} {tally.dropped:>8} "
        f"{percentile(tally.good_latencies, 50) * 1000:>8.1f} "
        f"{percentile(tally.good_latencies, 99) * 1000:>8.1f}"
        + (f"   ({tally.errors} errors)" if tally.errors else "")
    )
    return goodput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="local,process")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--overload", type=float, default=1.5)
    parser.add_argument("--tight-ms", type=float, default=100.0)
    parser.add_argument("--loose-ms", type=float, default=1000.0)
    parser.add_argument("--tight-share", type=float, default=0.5)
    parser.add_argument("--service-ms", type=float, default=20.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-ongoing", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    capacity = args.replicas * args.max_ongoing / (args.service_ms / 1000)
    rate = capacity * args.overload
    print(
        f"worker: {args.replicas} replicas x {args.max_ongoing} ongoing x "
        f"{args.service_ms:g} ms -> capacity {capacity:.0f} req/s; offered "
        f"{args.overload:g}x = {rate:.0f} req/s (Poisson) for {args.seconds:g} s"
    )
    print(
        f"deadlines: {args.tight_share:.0%} tight {args.tight_ms:g} ms, "
        f"{1 - args.tight_share:.0%} loose {args.loose_ms:g} ms"
    )
    print("req/s offered and good; good answers per class; misses = late + dropped + errors")
    print(
        f"{'backend':<8} {'mode':<12} {'offered':>7} {'goodput':>9} {'tight ok':>8} "
        f"{'loose ok':>8} {'misses':>7} {'dropped':>8} {'p50 ms':>8} {'p99 ms':>8}"
    )
    for backend in args.backends.split(","):
        goodputs = {}
        for mode in MODES:
            goodputs[mode.name] = report(backend, mode.name, run_mode(backend, mode, rate, args))
        baseline = max(goodputs["no deadline"], 1e-9)
        ratios = ", ".join(f"{name} {goodputs[name] / baseline:.1f}x" for name in goodputs)
        print(f"{backend:<8} goodput / no deadline: {ratios}")


if __name__ == "__main__":
    main()
