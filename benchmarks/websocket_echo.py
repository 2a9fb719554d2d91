"""WebSocket echo messages/s: tandem vs a bare Starlette app on uvicorn, same run.

Starts each server as a subprocess (``benchmarks/apps/ws_echo.py``: the same
echo handler, bare and as a tandem ingress), then runs N client sessions in a
separate load process, each sending a message and waiting for its echo, for a
few seconds. Servers are measured alternately, several rounds; prints each
round, the medians with their spread, and tandem's ratio to the baseline.

Usage:
    python benchmarks/websocket_echo.py [--backend local] [--sessions 8] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from servers import free_port, stop  # benchmarks/, beside this script

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"
BIN = Path(sys.executable).parent


async def _load(url: str, sessions: int, seconds: float) -> tuple[int, list[float]]:
    from websockets.asyncio.client import connect

    deadline = time.perf_counter() + seconds
    latencies: list[float] = []

    async def session() -> int:
        count = 0
        async with connect(url, compression=None) as ws:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await ws.send("hello")
                await ws.recv()
                latencies.append(time.perf_counter() - started)
                count += 1
        return count

    counts = await asyncio.gather(*(session() for _ in range(sessions)))
    return sum(counts), latencies


def load(url: str, sessions: int, seconds: float) -> dict[str, float]:
    """Run the clients in this (load) process: messages/s and p50/p99 round trips in ms."""
    count, latencies = asyncio.run(_load(url, sessions, seconds))
    latencies.sort()
    return {
        "rate": count / seconds,
        "p50": latencies[len(latencies) // 2] * 1e3,
        "p99": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            load(url, 1, 0.05)
            return
        except OSError:
            time.sleep(0.2)
        except Exception:  # e.g. the handshake refused while the app deploys
            time.sleep(0.2)
    sys.exit(f"{url} did not answer in 60 s")


def start(kind: str, backend: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    if kind == "bare":
        command = [
            str(BIN / "uvicorn"), "ws_echo:bare", "--port", str(port), "--log-level", "warning",
            "--no-access-log", "--loop", "uvloop", "--ws", "websockets-sansio",
        ]  # fmt: skip
    else:
        command = [
            str(BIN / "tandem"), "run", "ws_echo:app", "--port", str(port),
            "--backend", backend, "--log-level", "WARNING",
        ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(APPS))
    proc = subprocess.Popen(
        command, cwd=APPS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"ws://127.0.0.1:{port}/ws"
    wait_ready(url, proc)
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="local")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"WebSocket echo, {args.sessions} sessions, {args.seconds:.0f} s per measurement, "
        f"{args.rounds} alternating rounds (tandem backend: {args.backend})"
    )
    servers = {"bare": start("bare", args.backend), "tandem": start("tandem", args.backend)}
    results: dict[str, list[dict[str, float]]] = {"bare": [], "tandem": []}
    try:
        for url in (url for _, url in servers.values()):
            load(url, args.sessions, 1)  # warm up
        for round_ in range(args.rounds):
            for name, (_, url) in servers.items():
                result = load(url, args.sessions, args.seconds)
                results[name].append(result)
                print(
                    f"round {round_ + 1}  {name:<7} {result['rate']:>9,.0f} msg/s   "
                    f"p50 {result['p50']:6.2f} ms   p99 {result['p99']:6.2f} ms",
                    flush=True,
                )
    finally:
        for proc, _ in servers.values():
            stop(proc)
    rates = {name: [r["rate"] for r in runs] for name, runs in results.items()}
    for name, values in rates.items():
        print(
            f"{name:<7} median {statistics.median(values):>9,.0f} msg/s "
            f"(min {min(values):,.0f}, max {max(values):,.0f})"
        )
    ratios = [t / b for t, b in zip(rates["tandem"], rates["bare"], strict=True)]
    print(
        f"tandem ({args.backend}) / bare Starlette: median {statistics.median(ratios):.2f}x "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
