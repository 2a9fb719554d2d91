"""HTTP throughput and latency: tandem vs a bare Starlette app doing the same work.

Every server starts once: bare Starlette on uvicorn (uvloop, httptools: the
framework's own limit) and ``tandem run`` on each backend asked for. Then, for
each work, rounds measure the servers one after the other (alternating, so a
machine that gets busier or quieter treats them alike) with wrk pinned to the
last core (``taskset``), and the script prints every round, the median of each
server with its spread, and tandem's ratios to the baseline of the same round.
It also prints the CPU time each server (with its replica processes) spent per
request: on a small machine that, not latency, is what bounds throughput.

Works: ``hello`` (the seed's hello app: a JSON POST through the ingress and one
handle call), ``stream`` (a streaming response of 100 chunks), ``json`` (a 1 MB
JSON request body, parsed and summarised).

Needs wrk (`apt-get install wrk`) and taskset (util-linux). Usage:
    python benchmarks/http_hello.py [--backends local,process,process-direct]
                                    [--works hello,stream,json]
                                    [--connections 32] [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from servers import free_port, stop  # benchmarks/, beside this script

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"  # the bare baselines and the other work's tandem app
EXAMPLES = HERE.parent / "examples"  # hello.py, the seed's app
BIN = Path(sys.executable).parent
RAY_SERVE_32 = 9.9  # hello requests/s, Ray Serve 2.60 on the reference machine (DESIGN.md)

HELLO_BODY = '{"language": "spanish", "name": "Dora"}'
JSON_BODY = json.dumps({"items": [{"id": i, "name": f"item-{i:06d}"} for i in range(30_000)]})


@dataclass(frozen=True)
class Work:
    name: str
    path: str
    method: str
    body: str | None
    expect: bytes  # the start of a correct answer

    def lua(self) -> str:
        if self.body is None:
            return f'wrk.method = "{self.method}"\n'
        quoted = self.body.replace("\\", "\\\\").replace('"', '\\"')
        return (
            f'wrk.method = "{self.method}"\nwrk.body = "{quoted}"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )


WORKS = {
    "hello": Work("hello", "/", "POST", HELLO_BODY, b"Hola Dora"),
    "stream": Work("stream", "/work/stream", "GET", None, b"x" * 100),
    "json": Work("json", "/work/json", "POST", JSON_BODY, b'{"items":30000}'),
}


class Server:
    def __init__(self, name: str, command: list[str], port: int, tmp: Path) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        paths = [str(tmp), str(APPS), str(EXAMPLES)]  # tmp: the bare app of every work
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        self.proc = subprocess.Popen(
            command, cwd=APPS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def check(self, work: Work) -> None:
        """Wait until the server gives ``work`` its right answer (exits if it never does)."""
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited with {self.proc.returncode}")
            data = None if work.body is None else work.body.encode()
            request = urllib.request.Request(self.url + work.path, data=data, method=work.method)
            request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    answer = response.read()
                if answer.startswith(work.expect):
                    return
                sys.exit(f"{self.name} answered {work.name} wrongly: {answer[:80]!r}")
            except OSError:
                time.sleep(0.2)
        sys.exit(f"{self.name} did not answer {work.name} in 60 s")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server and its replica processes."""
        return sum(_cpu_seconds(pid) for pid in _process_tree(self.proc.pid))

    def stop(self) -> None:
        stop(self.proc)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc); just ``pid`` where that is missing."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        # Each thread lists the children it started (tandem starts replicas from its loop's).
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return tree


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def bare_server(tmp: Path) -> Server:
    port = free_port()
    # One app serving every work at the paths tandem serves them (hello at /, the rest under
    # /work), as tandem's two applications do.
    return Server(
        "bare Starlette",
        [
            str(BIN / "uvicorn"), "bare_all:app", "--port", str(port), "--log-level", "warning",
            "--no-access-log", "--loop", "uvloop", "--http", "httptools",
        ],
        port,
        tmp,
    )  # fmt: skip


def tandem_server(backend: str, config: Path, tmp: Path) -> Server:
    """``backend`` is a backend's name, or ``process-direct``: the process backend
    with direct ingress (its ingress replica serves HTTP on the port too)."""
    port = free_port()
    flags = ["--direct-ingress"] if backend == "process-direct" else []
    return Server(
        f"tandem {backend}",
        [
            str(BIN / "tandem"), "run", str(config), "--port", str(port),
            "--backend", backend.removesuffix("-direct"), "--log-level", "WARNING", *flags,
        ],
        port,
        tmp,
    )  # fmt: skip


def wrk(url: str, connections: int, seconds: float, script: str) -> dict[str, float]:
    loader_cpu = str((os.cpu_count() or 1) - 1)
    out = subprocess.run(
        [
            "taskset", "-c", loader_cpu, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
            "--latency", "-s", script, url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result = {"rps": rps, "errors": errors + (int(non2xx.group(1)) if non2xx else 0)}
    for label, key in (("50%", "p50"), ("99%", "p99")):
        match = re.search(rf"{re.escape(label)}\s+([\d.]+)(us|ms|s)\b", out)
        if match:
            value, unit = float(match.group(1)), match.group(2)
            result[key] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    return result


def spread(values: list[float]) -> str:
    median = statistics.median(values)
    return f"median {median:>9,.0f} (min {min(values):,.0f}, max {max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", "--backend", default="local,process")
    parser.add_argument("--works", default="hello,stream,json")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for tool, package in (("wrk", "wrk"), ("taskset", "util-linux")):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: install it with `apt-get install {package}` and rerun.")
    works = [WORKS[name] for name in args.works.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = folder / "serve.yaml"
        config.write_text(CONFIG)
        (folder / "bare_all.py").write_text(BARE_ALL)
        servers = [bare_server(folder), *(tandem_server(b, config, folder) for b in backends)]
        try:
            run(servers, works, args, folder)
        finally:
            for server in servers:
                server.stop()


def run(servers: list[Server], works: list[Work], args: argparse.Namespace, tmp: Path) -> None:
    loader = (os.cpu_count() or 1) - 1
    print(
        f"{args.connections} connections, {args.seconds} s per measurement, {args.rounds} "
        f"alternating rounds; wrk (1 thread) pinned to CPU {loader}, servers unpinned"
    )
    for work in works:
        script = tmp / f"{work.name}.lua"
        script.write_text(work.lua())
        for server in servers:
            server.check(work)
            wrk(server.url + work.path, args.connections, 2, str(script))  # warm up
        results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
        print(f"\n== {work.name}")
        for round_ in range(args.rounds):
            for server in servers:
                cpu = server.cpu_seconds()
                result = wrk(server.url + work.path, args.connections, args.seconds, str(script))
                # The server's CPU time per request: where a 2-core machine's time goes.
                requests = result["rps"] * args.seconds
                result["cpu_us"] = (server.cpu_seconds() - cpu) / max(requests, 1) * 1e6
                results[server.name].append(result)
                print(
                    f"round {round_ + 1}  {server.name:<16} {result['rps']:>9,.0f} req/s   "
                    f"p50 {result.get('p50', float('nan')):7.2f} ms   "
                    f"p99 {result.get('p99', float('nan')):7.2f} ms   "
                    f"errors {int(result['errors'])}   CPU {result['cpu_us']:6.0f} us/request",
                    flush=True,
                )
        bare = results[servers[0].name]
        for server in servers:
            runs = results[server.name]
            cpu = statistics.median(r["cpu_us"] for r in runs)
            line = (
                f"{server.name:<16} req/s {spread([r['rps'] for r in runs])}   CPU {cpu:.0f} us/req"
            )
            if server is not servers[0]:
                ratios = [r["rps"] / b["rps"] for r, b in zip(runs, bare, strict=True)]
                p99s = [r["p99"] / b["p99"] for r, b in zip(runs, bare, strict=True)]
                line += (
                    f"   ratio {statistics.median(ratios):.2f}x "
                    f"({', '.join(f'{x:.2f}' for x in ratios)})"
                    f"   p99 {statistics.median(p99s):.1f}x bare's"
                )
            print(line)
        if work.name == "hello":
            print(
                f"(Ray Serve 2.60 on the reference machine: {RAY_SERVE_32} req/s at 32 connections)"
            )


CONFIG = """\
applications:
  - name: hello
    route_prefix: /
    import_path: hello:language_classifier
  - name: work
    route_prefix: /work
    import_path: http_work:app
"""

BARE_ALL = """\
# Written by http_hello.py for one run: the bare baseline of every work.
from starlette.routing import Mount, Route

from bare_hello import app
from http_work import bare

app.router.routes.append(Mount("/work", app=bare))
"""


if __name__ == "__main__":
    main()
