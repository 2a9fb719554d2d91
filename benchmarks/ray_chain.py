"""The seed's chain app on tandem's ray backend and on Ray Serve, in the same run.

Each framework runs in a child process of its own, on a fresh local Ray with
the same number of logical CPUs, and serves the same code (only the import of
``serve`` differs). Prints run()-to-first-answer, sequential p50/p99 from the
driver and throughput with 16 caller threads, and tandem's ratio to Ray Serve.

Usage: python benchmarks/ray_chain.py [--seconds 5] [--threads 16]
Needs Ray: pip install "tandem-serve[ray]" (Ray Serve comes with ray[serve]).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from apps.chain import build_app  # benchmarks/apps, beside this script

RAY_CPUS = 8  # logical CPUs: room for three 1-CPU replicas on a 2-core machine


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(framework: str, seconds: float, threads: int) -> dict[str, float]:
    """Run in a child: serve the chain app with ``framework`` and measure it."""
    import ray

    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, logging_level="ERROR")
    if framework == "tandem":
        serve = importlib.import_module("tandem")
        options: dict[str, Any] = {"backend": "ray", "route_prefix": None}
    else:
        serve = importlib.import_module("ray.serve")
        options = {"route_prefix": None}
    app = build_app(serve)
    start = time.perf_counter()
    handle = serve.run(app, **options)
    assert handle.remote(5).result() == 12
    first_answer = time.perf_counter() - start

    for i in range(50):  # warm up
        handle.remote(i).result()
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        handle.remote(1).result()
        latencies.append(time.perf_counter() - t0)

    counts = [0] * threads
    stop = threading.Event()

    def caller(slot: int) -> None:
        while not stop.is_set():
            handle.remote(slot).result()
            counts[slot] += 1

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in callers:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in callers:
        t.join()
    throughput = sum(counts) / (time.perf_counter() - t0)
    serve.shutdown()
    ray.shutdown()
    return {
        "run_s": first_answer,
        "p50_ms": percentile(latencies, 0.50) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "calls_s": throughput,
    }


def run_child(framework: str, seconds: float, threads: int) -> dict[str, float] | None:
    command = [sys.executable, __file__, "--child", framework]
    command += ["--seconds", str(seconds), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"{framework} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return None
    result: dict[str, float] = json.loads(lines[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--child", choices=["tandem", "rayserve"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.seconds, args.threads)), flush=True)
        return
    if importlib.util.find_spec("ray") is None:
        sys.exit('This benchmark needs Ray: pip install "tandem-serve[ray]".')
    try:
        importlib.import_module("ray.serve")
    except ImportError as exc:
        sys.exit(f'Ray Serve cannot be imported ({exc}); pip install "ray[serve]".')
    os.environ.pop("RAY_ADDRESS", None)
    results = {}
    for framework in ("tandem", "rayserve"):
        print(f"measuring {framework} ...", flush=True)
        results[framework] = run_child(framework, args.seconds, args.threads)
    ours, theirs = results["tandem"], results["rayserve"]
    if ours is None or theirs is None:
        sys.exit(1)
    print(f"\nchain app from the driver, local Ray with {RAY_CPUS} logical CPUs")
    print(f"{'':28}{'tandem (ray)':>14}{'Ray Serve':>12}{'ratio':>9}")
    rows = [
        ("run() to first answer (s)", "run_s", False),
        ("sequential p50 (ms)", "p50_ms", False),
        ("sequential p99 (ms)", "p99_ms", False),
        (f"{args.threads} threads (calls/s)", "calls_s", True),
    ]
    for label, key, higher_is_better in rows:
        a, b = ours[key], theirs[key]
        ratio = a / b if higher_is_better else b / a
        print(f"{label:28}{a:>14.2f}{b:>12.2f}{ratio:>8.1f}x")
    print("(ratio: how many times better tandem is; above 1 means faster)")


if __name__ == "__main__":
    main()
