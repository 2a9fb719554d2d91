"""gRPC unary calls/s: tandem's gRPC proxy vs a bare grpcio asyncio server, same run.

Compiles a one-method proto with grpcio-tools, then starts each server as a
subprocess (``benchmarks/apps/grpc_greeter.py``: the same greeting, bare on
grpcio's asyncio server and uvloop, and as a tandem ingress under ``tandem run``
on each backend asked for). A load process (pinned to the last CPU) keeps
``--concurrency`` unary calls in flight on one channel for a few seconds.
Servers are measured alternately, several rounds; prints each round, the
medians with their spread, and tandem's ratio to the bare server of each round.

The load generator is grpcio's Python client: on a small machine it may be what
limits the bare server, which makes the ratio look better than the proxy's own
cost; the p50 latencies say more there.

Needs the dev extras (grpcio, grpcio-tools). Usage:
    python benchmarks/grpc_unary.py [--backends local,process] [--concurrency 32]
                                    [--seconds 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from servers import free_port, stop  # benchmarks/, beside this script

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"
BIN = Path(sys.executable).parent
SERVICER = "bench_pb2_grpc.add_BenchServicer_to_server"

PROTO = """
syntax = "proto3";
package bench;
message Ask { string name = 1; int64 num = 2; }
message Answer { string greeting = 1; int64 num = 2; }
service Bench { rpc __call__(Ask) returns (Answer); }
"""


def compile_proto(folder: Path) -> None:
    from grpc_tools import protoc

    (folder / "bench.proto").write_text(PROTO)
    args = ["protoc", f"-I{folder}", f"--python_out={folder}", f"--grpc_python_out={folder}"]
    if protoc.main([*args, str(folder / "bench.proto")]) != 0:
        sys.exit("protoc failed")


async def _load(address: str, concurrency: int, seconds: float) -> tuple[int, list[float]]:
    import bench_pb2
    import bench_pb2_grpc
    import grpc

    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = bench_pb2_grpc.BenchStub(channel)
        ask = bench_pb2.Ask(name="Dora", num=21)
        deadline = time.perf_counter() + seconds

        async def caller() -> int:
            count = 0
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                answer = await stub.__call__(ask)
                latencies.append(time.perf_counter() - started)
                assert answer.num == 42
                count += 1
            return count

        counts = await asyncio.gather(*(caller() for _ in range(concurrency)))
    return sum(counts), latencies


def _measure(address: str, concurrency: int, seconds: float, folder: str, out: Any) -> None:
    """The load process: pinned to the last CPU, it reports calls/s and p50/p99 in ms."""
    os.sched_setaffinity(0, {(os.cpu_count() or 1) - 1})
    sys.path.insert(0, folder)
    import uvloop

    try:
        count, latencies = uvloop.run(_load(address, concurrency, seconds))
    except Exception:  # e.g. the server is not up yet: the parent sees EOFError
        return
    latencies.sort()
    out.send(
        {
            "rate": count / seconds,
            "p50": latencies[len(latencies) // 2] * 1e3,
            "p99": latencies[int(len(latencies) * 0.99)] * 1e3,
        }
    )


def measure(address: str, concurrency: int, seconds: float, folder: Path) -> dict[str, float]:
    receive, send = multiprocessing.Pipe(duplex=False)
    loader = multiprocessing.Process(
        target=_measure, args=(address, concurrency, seconds, str(folder), send)
    )
    loader.start()
    send.close()  # the loader's copy stays open: if it fails, recv() raises EOFError
    result: dict[str, float] = receive.recv()
    loader.join()
    return result


def start(kind: str, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    if kind == "bare":
        command = [sys.executable, str(APPS / "grpc_greeter.py"), str(port)]
    else:
        command = [
            str(BIN / "tandem"), "run", "grpc_greeter:app", "--port", str(free_port()),
            "--backend", kind, "--log-level", "WARNING", "--grpc-port", str(port),
            "--grpc-servicer-functions", SERVICER, "--grpc-disable-reflection",
        ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), str(APPS)]))
    proc = subprocess.Popen(
        command, cwd=APPS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{kind} server exited with {proc.returncode}")
        try:
            measure(address, 1, 0.05, folder)
            return proc, address
        except (EOFError, OSError):
            time.sleep(0.3)
    sys.exit(f"{kind} server did not answer in 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", "--backend", default="local,process")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    print(
        f"gRPC unary, {args.concurrency} calls in flight on one channel, {args.seconds:.0f} s "
        f"per measurement, {args.rounds} alternating rounds; load pinned to CPU "
        f"{(os.cpu_count() or 1) - 1}, servers unpinned"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        compile_proto(folder)
        names = ["bare", *backends]
        servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for name in names:
                servers[name] = start(name, folder)
            results = run(servers, args, folder)
        finally:
            for proc, _ in servers.values():
                stop(proc)
    report(results)


def run(
    servers: dict[str, tuple[subprocess.Popen[bytes], str]], args: argparse.Namespace, folder: Path
) -> dict[str, list[dict[str, float]]]:
    for _, address in servers.values():
        measure(address, args.concurrency, 1, folder)  # warm up
    results: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    for round_ in range(args.rounds):
        for name, (_, address) in servers.items():
            result = measure(address, args.concurrency, args.seconds, folder)
            results[name].append(result)
            label = "bare grpcio" if name == "bare" else f"tandem {name}"
            print(
                f"round {round_ + 1}  {label:<15} {result['rate']:>9,.0f} calls/s   "
                f"p50 {result['p50']:6.2f} ms   p99 {result['p99']:6.2f} ms",
                flush=True,
            )
    return results


def report(results: dict[str, list[dict[str, float]]]) -> None:
    bare = [r["rate"] for r in results["bare"]]
    for name, runs in results.items():
        rates = [r["rate"] for r in runs]
        label = "bare grpcio" if name == "bare" else f"tandem {name}"
        line = (
            f"{label:<15} median {statistics.median(rates):>9,.0f} calls/s "
            f"(min {min(rates):,.0f}, max {max(rates):,.0f}), "
            f"p50 {statistics.median(r['p50'] for r in runs):.2f} ms"
        )
        if name != "bare":
            ratios = [t / b for t, b in zip(rates, bare, strict=True)]
            line += (
                f"   ratio {statistics.median(ratios):.2f}x "
                f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
            )
        print(line)


if __name__ == "__main__":
    main()
