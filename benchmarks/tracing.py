"""What tracing costs: handle calls and HTTP requests with tracing off and on.

Each measurement runs in a fresh process (OpenTelemetry's global provider is
set once per process), off and on alternating within each round so that a
machine getting busier or quieter treats both alike:

- off: no OTEL_TRACES_EXPORTER (tandem imports no opentelemetry at all);
- on:  OTEL_TRACES_EXPORTER naming an exporter that drops every span, so the
  figure is tandem's own cost (spans made, linked, batched), not an exporter's.

Per backend it prints handle calls/s from the driver to a one-method deployment
(one caller, then 8 threads) and HTTP requests/s through the proxy to an ingress
that makes one handle call (8 keep-alive connections from a load process of its
own; on 2 cores it shares them with the server, so compare the columns, not
the absolute figure). Spans per unit: a handle call makes 2 (client, server),
an HTTP request 4 (proxy, ingress, client, server).

Off cannot be compared with "no tracing code at all" in one run; what tracing
adds when off is one ``tracing.SPANS is None`` check in the caller and two in the
replica per call: the script times that check and prints it against the time of
one call.

Usage: python benchmarks/tracing.py [--backends local,process] [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()

DROP_EXPORTER = """
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class DroppedSpans(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS
"""


def exporter_site(tmp: Path) -> Path:
    """A folder that provides the ``dropped`` traces exporter, as an installed package
    would (an entry point of ``opentelemetry_traces_exporter``)."""
    site = tmp / "site"
    dist = site / "tandem_bench_drop-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tandem-bench-drop\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[opentelemetry_traces_exporter]\ndropped = tandem_bench_drop:DroppedSpans\n"
    )
    (site / "tandem_bench_drop.py").write_text(DROP_EXPORTER)
    return site


# -- one measurement (a child process) -------------------------------------------------


def measure(backend: str, seconds: float) -> dict[str, float]:
    import tandem as serve
    from tandem._private import tracing
    from tandem._private.api import http_url

    @serve.deployment
    class Echo:
        def __call__(self, value: int) -> int:
            return value

    @serve.deployment
    class Front:
        def __init__(self, echo: Any) -> None:
            self._echo = echo

        async def __call__(self, request: Any) -> str:
            return str(await self._echo.remote(1))

    serve.start(http_options={"port": 0, "access_log": False})
    serve.run(Front.bind(Echo.bind()), backend=backend)
    echo = serve.get_deployment_handle("Echo", "default")
    traced = tracing.SPANS is not None
    for i in range(300):  # warm up
        echo.remote(i).result()

    calls, deadline = 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        echo.remote(1).result()
        calls += 1
    sequential = calls / (time.perf_counter() - started)

    counts = [0] * 8
    stop = threading.Event()

    def caller(slot: int) -> None:
        while not stop.is_set():
            echo.remote(slot).result()
            counts[slot] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(counts))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    threaded = sum(counts) / (time.perf_counter() - started)

    load = subprocess.run(
        [sys.executable, str(HERE), "--load", http_url(), "--seconds", str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    serve.shutdown()
    return {
        "traced": float(traced),
        "sequential": sequential,
        "threads": threaded,
        "http": float(load.stdout.strip()),
    }


async def http_load(url: str, seconds: float, connections: int = 8) -> float:
    """Requests/s of ``connections`` keep-alive HTTP/1.1 clients sending GET /."""
    host, port = url.removeprefix("http://").split(":")
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    done = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            done += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    return done / (time.perf_counter() - started)


# -- the rounds (the parent) -----------------------------------------------------------


def run_child(backend: str, traced: bool, seconds: float, site: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if traced:
        env["OTEL_TRACES_EXPORTER"] = "dropped"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, str(HERE), "--child", backend, "--seconds", str(seconds)],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"the {backend} run failed:\n{out.stderr}")
    figures: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    if bool(figures["traced"]) != traced:
        sys.exit(f"tracing was {'off' if traced else 'on'} in a run meant to have it the other way")
    return figures


def check_cost_ns() -> float:
    """Nanoseconds of the check a hot path makes while tracing is off."""
    from tandem._private import tracing

    number = 2_000_000
    seconds = min(
        timeit.repeat("tracing.SPANS is not None", globals={"tracing": tracing}, number=number)
    )
    empty = min(timeit.repeat("pass", number=number))
    return max(seconds - empty, 0.0) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="local,process")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(asyncio.run(http_load(args.load, args.seconds)))
        return
    if args.child:
        print(json.dumps(measure(args.child, args.seconds)))
        return

    columns = ("sequential", "threads", "http")
    print("calls/s from the driver (1 caller; 8 threads) and HTTP requests/s (8 connections)")
    with tempfile.TemporaryDirectory() as tmp:
        site = exporter_site(Path(tmp))
        for backend in args.backends.split(","):
            runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for round_ in range(args.rounds):
                for traced in (False, True) if round_ % 2 == 0 else (True, False):
                    figures = run_child(backend, traced, args.seconds, site)
                    runs[traced].append(figures)
                    row = "  ".join(f"{c} {figures[c]:9.0f}" for c in columns)
                    print(f"  {backend:8} round {round_ + 1} {'on ' if traced else 'off'}  {row}")
            medians = {
                t: {c: statistics.median(r[c] for r in runs[t]) for c in columns} for t in runs
            }
            for traced in (False, True):
                row = "  ".join(f"{c} {medians[traced][c]:9.0f}" for c in columns)
                print(f"{backend:8} median   {'on ' if traced else 'off'}  {row}")
            ratios = "  ".join(f"{c} {medians[True][c] / medians[False][c]:.2f}x" for c in columns)
            print(f"{backend:8} on/off   {ratios}")
            per_call_us = 1e6 / medians[False]["sequential"]
            cost = 3 * check_cost_ns()
            print(
                f"{backend:8} off: 3 checks x {cost / 3:.0f} ns = {cost:.0f} ns per call, "
                f"{cost / (per_call_us * 1e3):.3%} of one sequential call ({per_call_us:.1f} us)"
            )


if __name__ == "__main__":
    main()
