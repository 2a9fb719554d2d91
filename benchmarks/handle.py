"""The seed's chain app (Ingress -> Adder -> Multiplier) called from the driver.

Prints run()-to-first-answer time, sequential latency (p50/p99) and throughput
with 16 caller threads. Usage: python benchmarks/handle.py [--backend local] [--seconds 5]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from apps.chain import build_app  # benchmarks/apps, beside this script

import tandem as serve

# Ray Serve 2.60 on the reference 2-core machine (DESIGN.md).
RAY_SERVE_P50_MS = 11.4
RAY_SERVE_THREADS_CALLS_S = 41.0
RAY_SERVE_RUN_S = 3.5


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="local")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    app = build_app(serve)
    start = time.perf_counter()
    handle = serve.run(app, backend=args.backend)
    assert handle.remote(5).result() == 12
    first_answer = time.perf_counter() - start

    for i in range(200):  # warm up
        handle.remote(i).result()
    latencies = []
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        handle.remote(1).result()
        latencies.append(time.perf_counter() - t0)

    counts = [0] * args.threads
    stop = threading.Event()

    def caller(slot: int) -> None:
        while not stop.is_set():
            handle.remote(slot).result()
            counts[slot] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(args.threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    throughput = sum(counts) / (time.perf_counter() - t0)
    serve.shutdown()

    p50 = percentile(latencies, 0.50) * 1e3
    p99 = percentile(latencies, 0.99) * 1e3
    print(f"backend: {args.backend}")
    print(f"run() to first answer: {first_answer:.3f} s  (Ray Serve 2.60: {RAY_SERVE_RUN_S} s)")
    print(
        f"sequential: {len(latencies)} calls, p50 {p50:.3f} ms, p99 {p99:.3f} ms, "
        f"mean {statistics.mean(latencies) * 1e3:.3f} ms  "
        f"(Ray Serve 2.60 p50: {RAY_SERVE_P50_MS} ms, "
        f"{RAY_SERVE_P50_MS / p50:.0f}x faster)"
    )
    print(
        f"{args.threads} caller threads: {throughput:,.0f} calls/s  "
        f"(Ray Serve 2.60: {RAY_SERVE_THREADS_CALLS_S:.0f} calls/s, "
        f"{throughput / RAY_SERVE_THREADS_CALLS_S:.0f}x)"
    )


if __name__ == "__main__":
    main()
