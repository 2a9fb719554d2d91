"""HTTP throughput: the seed's hello app on tandem vs a bare Starlette app, same run.

Starts both servers as subprocesses (uvicorn with uvloop/httptools for the
baseline; `tandem run` for tandem), loads each with wrk (32 connections by
default) and prints requests/s, p50 and p99, and tandem's ratio to the baseline.

Needs wrk: `apt-get install wrk` (Debian/Ubuntu). Usage:
    python benchmarks/http_hello.py [--backend local] [--connections 32] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"  # the bare Starlette baseline
EXAMPLES = HERE.parent / "examples"  # hello.py, the seed's app
BIN = Path(sys.executable).parent
RAY_SERVE_32 = 9.9  # requests/s, Ray Serve 2.60 on the reference machine (DESIGN.md)

LUA = """
wrk.method = "POST"
wrk.body = '{"language": "spanish", "name": "Dora"}'
wrk.headers["Content-Type"] = "application/json"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            request = urllib.request.Request(
                url, data=b'{"language": "spanish", "name": "Dora"}', method="POST"
            )
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.read() == b"Hola Dora":
                    return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"{url} did not answer in 60 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def wrk(url: str, connections: int, seconds: float, script: str) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result = {"rps": rps, "errors": errors + (int(non2xx.group(1)) if non2xx else 0)}
    for label, key in (("50%", "p50"), ("99%", "p99")):
        match = re.search(rf"{re.escape(label)}\s+([\d.]+)(us|ms|s)", out)
        if match:
            value, unit = float(match.group(1)), match.group(2)
            result[key] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    return result


def measure(
    name: str, command: list[str], port: int, args: argparse.Namespace, script: str
) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(APPS), str(EXAMPLES)]))
    proc = subprocess.Popen(
        command, cwd=APPS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_ready(url, proc)
        wrk(url, args.connections, 2, script)  # warm up
        result = wrk(url, args.connections, args.seconds, script)
    finally:
        stop(proc)
    print(
        f"{name:<28} {result['rps']:>10,.0f} req/s   p50 {result.get('p50', float('nan')):7.2f} ms"
        f"   p99 {result.get('p99', float('nan')):7.2f} ms   errors {int(result['errors'])}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="local")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: install it with `apt-get install wrk` (Debian/Ubuntu) and rerun.")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(LUA)
        script = handle.name
    print(f"hello app, {args.connections} connections, {args.seconds:.0f} s each (wrk)")
    port = free_port()
    bare = measure(
        "bare Starlette (uvicorn)",
        [
            str(BIN / "uvicorn"),
            "bare_hello:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
        ],
        port,
        args,
        script,
    )
    port = free_port()
    ours = measure(
        f"tandem ({args.backend})",
        [
            str(BIN / "tandem"),
            "run",
            "hello:language_classifier",
            "--port",
            str(port),
            "--backend",
            args.backend,
            "--log-level",
            "WARNING",
        ],
        port,
        args,
        script,
    )
    os.unlink(script)
    print(
        f"tandem / bare Starlette: {ours['rps'] / bare['rps']:.2f}x   "
        f"(Ray Serve 2.60 here: {RAY_SERVE_32} req/s with 32 connections; "
        f"tandem is {ours['rps'] / RAY_SERVE_32:,.0f}x that)"
    )


if __name__ == "__main__":
    main()
