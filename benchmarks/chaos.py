"""Fault injection under load: how long tandem takes to recover, and what clients see.

Serves benchmarks/apps/chaos_app.py (HTTP -> Front, 2 replicas -> Stage, 2 replicas,
~1 ms of CPU) with `tandem run --request-timeout-s 2` in a subprocess, keeps N
clients busy for the whole run (each sends its next request when the previous one
answered; 10 s timeout), polls the status `tandem status` prints every 0.2 s and
injects, one after another, each once the previous one recovered (or used up its
share of the run), 2 s apart:

1. kill -9 of a Stage replica, then of a Front replica (pids from the status polls);
2. a failing constructor: Stage's constructor raises while a flag file exists; a
   Stage replica is killed, the flag removed 3 s later;
3. a wedged replica: max_ongoing_requests calls that sleep for 10 minutes in one
   Stage replica's threads; tandem answers them 408 after 2 s, the threads sleep on.

A fault has recovered at the first moment T after which the success rate over 0.5 s
is >= 95% of the rate in the 2 s before the fault, and from T on for 1 s every status
poll shows every deployment HEALTHY with running == target replicas and no longer
lists the replica the fault hit (it must have been replaced, not merely still be
reported RUNNING).

Usage: python benchmarks/chaos.py [--backend process] [--clients 16] [--seconds 30]
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import contextlib
import http.client
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from apps.chaos_app import FLAG_ENV_VAR, STAGE_MAX_ONGOING  # benchmarks/apps, beside this script

from tandem._private.cli.control_client import find_control

APPS = Path(__file__).resolve().parent / "apps"
BIN = Path(sys.executable).parent
CLIENT_TIMEOUT_S, HUNG_S = 10.0, 5.0
WINDOW_S, HOLD_S, STEP_S, BEFORE_S = 0.5, 1.0, 0.1, 2.0  # see "recovered" in the docstring
SETTLE_S, GAP_S, MIN_SHARE_S = 3.0, 2.0, 5.0  # before the first fault; between; least time


@dataclass
class Record:
    start: float
    end: float | None = None
    outcome: str = ""  # the HTTP status, or the client-side exception's class name


@dataclass(frozen=True)
class Sample:
    time: float
    healthy: bool  # every deployment HEALTHY with running_replicas == target_replicas
    pids: frozenset[int]
    summary: str  # e.g. "Front HEALTHY 2/2, Stage UNHEALTHY 1/2"


@dataclass
class Fault:
    name: str
    inject: Callable[[Fault], None]
    injected: float = -1.0  # stays negative if the run ended before its turn
    until: float = 0.0  # when it recovered, or its share of the run ended
    victim: int | None = None  # the pid of the replica it hit
    notes: str = ""


@dataclass
class Run:
    """What the clients and the status poller saw; times are seconds since the load began."""

    url: str
    t0: float = field(default_factory=time.monotonic)
    records: list[Record] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    running: dict[str, list[int]] = field(default_factory=dict)  # RUNNING pids, by deployment
    stop: threading.Event = field(default_factory=threading.Event)

    def now(self) -> float:
        return time.monotonic() - self.t0


def get(url: str, timeout: float, conn: http.client.HTTPConnection | None = None) -> str:
    """One GET (on conn if given): the status code, then the body after a 200; or the
    client-side exception's name."""
    host, path = url.split("/", 3)[2:]
    own = conn or http.client.HTTPConnection(host, timeout=timeout)
    try:
        own.request("GET", "/" + path)
        response = own.getresponse()
        body = response.read()
        return f"200 {body.decode()}" if response.status == 200 else str(response.status)
    except Exception as exc:
        own.close()  # a kept connection reconnects at the next request
        return type(exc).__name__
    finally:
        if conn is None:
            own.close()


def client(run: Run) -> None:
    conn = http.client.HTTPConnection(run.url.split("/")[2], timeout=CLIENT_TIMEOUT_S)
    while not run.stop.is_set():
        record = Record(run.now())
        run.records.append(record)
        record.outcome = get(run.url, CLIENT_TIMEOUT_S, conn).split()[0]
        record.end = run.now()


def poll_status(run: Run, port: int) -> None:
    # What `tandem status` prints, from its control endpoint: the command takes ~0.5 s
    # of CPU (1-3 s under this load), too slow to poll or to time an injection by.
    path = find_control(f"http://127.0.0.1:{port}").unix_path
    with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=2.0) as control:
        while not run.stop.is_set():
            try:
                apps = control.get("http://tandem/-/status").json()["applications"]
                deps = [d for a in apps.values() for d in a["deployments"].values()]
                run.running = {
                    d["name"]: [r["pid"] for r in d["replicas"] if r["state"] == "RUNNING"]
                    for d in deps
                }
                sample = Sample(
                    run.now(),
                    all(d["status"] == "HEALTHY" for d in deps)
                    and all(d["running_replicas"] == d["target_replicas"] for d in deps),
                    frozenset(r["pid"] for d in deps for r in d["replicas"]),
                    ", ".join(
                        f"{d['name']} {d['status']} {d['running_replicas']}/{d['target_replicas']}"
                        for d in deps
                    ),
                )
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                sample = Sample(run.now(), False, frozenset(), f"status failed: {exc!r}")
            run.samples.append(sample)
            time.sleep(0.2)


def kill_one(run: Run, deployment: str, fault: Fault) -> None:
    fault.injected = run.now()
    pids = run.running.get(deployment)
    if not pids:
        fault.notes = f"no RUNNING {deployment} replica to kill"
        return
    os.kill(pids[0], signal.SIGKILL)
    fault.victim, fault.notes = pids[0], f"killed pid {pids[0]}"


def fail_constructor(run: Run, flag: Path, fault: Fault) -> None:
    flag.touch()
    try:
        kill_one(run, "Stage", fault)
        time.sleep(3)
    finally:
        flag.unlink()
    fault.notes += ", constructors failed for 3 s"


def wedge(run: Run, fault: Fault) -> None:
    """Fill one Stage replica's slots with calls that sleep; tandem answers them 408."""
    fault.injected = run.now()
    if not run.running.get("Stage"):
        fault.notes = "no RUNNING Stage replica to wedge"
        return
    fault.victim = run.running["Stage"][0]
    held: list[concurrent.futures.Future[str]] = []
    quick: Counter[str] = Counter()  # "200 missed": it reached the other replica
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        deadline = time.monotonic() + 15
        while len(held) < STAGE_MAX_ONGOING and time.monotonic() < deadline:
            call = pool.submit(get, f"{run.url}?wedge={fault.victim}", 5.0)
            try:
                quick[call.result(timeout=0.3)] += 1
            except concurrent.futures.TimeoutError:
                held.append(call)
                fault.injected = run.now()  # the replica is wedged once its last slot is
        done, _ = concurrent.futures.wait(held, timeout=8)
    answers = Counter(c.result() for c in done) + Counter({"none in 8 s": len(held) - len(done)})
    fault.notes = f"pid {fault.victim}: {len(held)} calls held, answered {dict(answers)}"
    fault.notes += f"; {dict(quick)} at once"


class Timeline:
    """A snapshot of a run, asked about success rates and status at any moment."""

    def __init__(self, run: Run) -> None:
        self.ok_ends = sorted(r.end for r in run.records if r.end and r.outcome == "200")
        self.samples = list(run.samples)
        self.stamps = [s.time for s in self.samples]

    def rate(self, t0: float, t1: float) -> float:
        """Successful answers per second in (t0, t1]."""
        ends = self.ok_ends
        return (bisect.bisect_right(ends, t1) - bisect.bisect_right(ends, t0)) / (t1 - t0)

    def settled(self, t0: float, t1: float, victim: int | None) -> bool:
        """The polls over [t0, t1] (from the one before t0), fresh, all healthy, no victim."""
        first = max(0, bisect.bisect_right(self.stamps, t0) - 1)
        polls = self.samples[first : bisect.bisect_right(self.stamps, t1)]
        if not polls or polls[0].time < t0 - 1.0 or polls[-1].time < t1 - 1.0:
            return False
        if any(b.time - a.time > 1.0 for a, b in itertools.pairwise(polls)):
            return False
        return all(p.healthy and victim not in p.pids for p in polls)

    def recovered_after(self, fault: Fault, until: float, rate_too: bool = True) -> float | None:
        """Seconds from injection to recovery (see the module docstring), or None; with
        rate_too=False, to the moment the status alone settled."""
        floor = 0.95 * self.rate(fault.injected - BEFORE_S, fault.injected)
        t = fault.injected
        while t + max(WINDOW_S, HOLD_S) <= until:
            if self.settled(t, t + HOLD_S, fault.victim) and (
                not rate_too or self.rate(t, t + WINDOW_S) >= floor
            ):
                return t - fault.injected
            t += STEP_S
        return None

    def why_not(self, fault: Fault) -> str:
        """What kept a fault from recovering."""
        settled = self.recovered_after(fault, fault.until, rate_too=False)
        if settled is None:
            i = bisect.bisect_right(self.stamps, fault.until) - 1
            if i < 0:
                return "no status poll answered"
            last = self.samples[i]
            listed = f", pid {fault.victim} listed" if fault.victim in last.pids else ""
            return f"the status never settled; at the end: {last.summary}{listed}"
        start = fault.injected + settled
        steps = range(max(1, int((fault.until - start) / STEP_S)))
        best = max(self.rate(start + STEP_S * i, start + STEP_S * i + WINDOW_S) for i in steps)
        floor = 0.95 * self.rate(fault.injected - BEFORE_S, fault.injected)
        return f"status settled after {settled:.1f} s, best 0.5 s since {best:,.0f} < {floor:,.0f}"


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


def inject_all(run: Run, flag: Path, deadline: float) -> list[Fault]:
    """Inject the faults in turn; each ends at recovery or its share of what is left."""
    faults = [
        Fault("kill -9 Stage replica", lambda f: kill_one(run, "Stage", f)),
        Fault("kill -9 Front replica", lambda f: kill_one(run, "Front", f)),
        Fault("Stage constructor fails", lambda f: fail_constructor(run, flag, f)),
        Fault("Stage replica wedged", lambda f: wedge(run, f)),
    ]
    time.sleep(SETTLE_S)
    for i, fault in enumerate(faults):
        left = deadline - run.now()
        if left < MIN_SHARE_S:
            fault.notes = "not injected: the run ended first (try a longer --seconds)"
            continue
        share = left if i == len(faults) - 1 else left / (len(faults) - i) - GAP_S
        end = run.now() + max(MIN_SHARE_S, share)
        fault.inject(fault)
        while run.now() < end and Timeline(run).recovered_after(fault, run.now()) is None:
            time.sleep(0.2)
        fault.until = min(run.now(), end)
        if fault.victim is not None and alive(fault.victim):
            fault.notes += f"; pid {fault.victim} alive at +{fault.until - fault.injected:.0f} s"
        time.sleep(min(GAP_S, max(0.0, deadline - run.now())))
    return faults


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"tandem run exited with code {proc.returncode}; see {log}")
        if get(f"http://127.0.0.1:{port}/", 2.0).startswith("200"):
            return
        time.sleep(0.3)
    sys.exit(f"tandem run did not answer in 60 s; see {log}")


def stop_server(proc: subprocess.Popen[bytes]) -> float:
    """SIGINT, then SIGKILL to its whole session (replicas too); seconds to stop."""
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.monotonic() - began


def report(run: Run, faults: list[Fault], seconds: float) -> None:
    timeline = Timeline(run)
    windows = [timeline.rate(t, t + WINDOW_S) for t in (0.5, 1.0, 1.5, 2.0, SETTLE_S - 0.5)]
    print(
        f"before the faults: {timeline.rate(0.5, SETTLE_S):,.0f} ok/s "
        f"(0.5 s windows: {min(windows):,.0f} to {max(windows):,.0f})"
    )
    print(f"{'fault':<24} {'injected':>9} {'ok/s before':>11}  {'recovered after':<24} failed")
    for fault in faults:
        if fault.injected < 0:
            print(f"{fault.name:<24} {'-':>9} {'-':>11}  {'-':<24} {fault.notes}")
            continue
        after = timeline.recovered_after(fault, fault.until)
        if after is None:
            took, end = f"did not recover in {fault.until - fault.injected:.0f} s", fault.until
            fault.notes += "; " + timeline.why_not(fault)
        else:
            took, end = f"{after:.1f} s", fault.injected + after
        bad = Counter(
            r.outcome
            for r in run.records
            if r.end and fault.injected <= r.end <= end and r.outcome != "200"
        )
        before = timeline.rate(fault.injected - BEFORE_S, fault.injected)
        print(
            f"{fault.name:<24} {fault.injected:>7.1f} s {before:>11,.0f}  {took:<24} "
            + (", ".join(f"{k} x{n}" for k, n in bad.most_common()) or "none")
        )
        print(f"{'':<26}({fault.notes})")
    outcomes = Counter(r.outcome for r in run.records if r.end is not None)
    ok = outcomes.pop("200", 0)
    hung = sum(1 for r in run.records if r.end is None or r.end - r.start > HUNG_S)
    print(f"requests sent {len(run.records)}, succeeded {ok} ({ok / seconds:,.0f}/s)")
    print(f"failed by status: {({k: n for k, n in outcomes.items() if k.isdigit()}) or 'none'}")
    errors = {k: n for k, n in outcomes.items() if not k.isdigit()}
    print(f"failed by client-side error: {errors or 'none'}")
    print(f"hung (no answer within {HUNG_S:.0f} s, or none at the end): {hung}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="process", help="tandem run --backend")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--seconds", type=float, default=30, help="length of the whole run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out

    workdir = Path(tempfile.mkdtemp(prefix="tandem-chaos-"))
    flag, log = workdir / "stage-constructor-fails", workdir / "server.log"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [str(BIN / "tandem"), "run", "chaos_app:app", "--port", str(port)]
    command += ["--backend", args.backend, "--request-timeout-s", "2", "--log-level", "WARNING"]
    env = dict(os.environ, PYTHONPATH=str(APPS), **{FLAG_ENV_VAR: str(flag)})
    with log.open("wb") as out:  # its own session: killpg reaches every replica
        proc = subprocess.Popen(
            command, cwd=APPS, env=env, stdout=out, stderr=out, start_new_session=True
        )
    run = Run(f"http://127.0.0.1:{port}/")
    try:
        wait_ready(proc, port, log)
        run.t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(run,)) for _ in range(args.clients)]
        threads.append(threading.Thread(target=poll_status, args=(run, port)))
        for thread in threads:
            thread.daemon = True
            thread.start()
        print(f"chaos app, {args.backend} backend, {args.clients} clients, {args.seconds:.0f} s")
        faults = inject_all(run, flag, args.seconds)
        time.sleep(max(0.0, args.seconds - run.now()))
        elapsed = run.now()
        run.stop.set()
        for thread in threads:
            thread.join(timeout=CLIENT_TIMEOUT_S + 2)
    except KeyboardInterrupt:
        sys.exit("interrupted: no figures")  # after the server stopped (finally)
    finally:
        run.stop.set()
        flag.unlink(missing_ok=True)
        stopped_in = stop_server(proc)
    report(run, faults, elapsed)
    print(f"server stopped {stopped_in:.1f} s after SIGINT; its log: {log}")


if __name__ == "__main__":
    main()
