"""Process backend figures: CPU-bound scaling with replicas, and large payloads.

1. A CPU-bound sync deployment (pure-Python loop) called by 8 threads: calls/s
   with 1 replica and with 2 replicas (target on 2 cores: >= 1.7x).
2. A 10 MB NumPy array (and 10 MB of bytes) through one hop and back: ms per
   round trip, against a plain pickle round trip of the same object in-process.

Usage: python benchmarks/process.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import pickle
import threading
import time

import numpy as np

import tandem as serve


@serve.deployment(max_ongoing_requests=8)
class Burner:
    def __call__(self, n: int) -> int:
        total = 0
        for i in range(n):
            total += i * i
        return total


@serve.deployment
class Echo:
    def __call__(self, value: object) -> object:
        return value


def calls_per_second(replicas: int, seconds: float, threads: int = 8) -> float:
    handle = serve.run(
        Burner.options(num_replicas=replicas).bind(), name=f"burn{replicas}", route_prefix=None
    )
    handle.remote(10).result()
    count = [0] * threads
    stop = threading.Event()

    def caller(slot: int) -> None:
        while not stop.is_set():
            handle.remote(200_000).result()
            count[slot] += 1

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    rate = sum(count) / (time.perf_counter() - start)
    serve.delete(f"burn{replicas}")
    return rate


def round_trip_ms(handle: serve.DeploymentHandle, value: object, rounds: int = 20) -> float:
    handle.remote(value).result()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        handle.remote(value).result()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    one = calls_per_second(1, args.seconds)
    two = calls_per_second(2, args.seconds)
    print(
        f"CPU-bound sync deployment, 8 caller threads: 1 replica {one:.1f} calls/s, "
        f"2 replicas {two:.1f} calls/s: {two / one:.2f}x"
    )

    echo = serve.run(Echo.bind(), name="echo", route_prefix=None)
    array = np.random.default_rng(0).random(10 * 2**20 // 8)
    blob = bytes(10 * 2**20)
    for label, value in (("10 MB NumPy array", array), ("10 MB bytes", blob)):
        hop = round_trip_ms(echo, value)
        start = time.perf_counter()
        for _ in range(20):
            pickle.loads(pickle.dumps(value, protocol=5))
        local = (time.perf_counter() - start) / 20 * 1e3
        print(
            f"{label}: driver -> replica -> driver {hop:.1f} ms median "
            f"(an in-process pickle round trip of it: {local:.1f} ms)"
        )
    assert np.array_equal(echo.remote(array).result(), array)
    serve.shutdown()


if __name__ == "__main__":
    main()
