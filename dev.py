#!/usr/bin/env python3
"""Project tasks that work on a fresh machine with only Python and pip.

    python3 dev.py serve   serve examples/hello.py on http://127.0.0.1:8000
    python3 dev.py test    run the whole test suite (arguments go to pytest)

Each task first makes sure ``.venv`` exists and has tandem installed (editable,
with its development extras, the ray extra, so the suite also runs on the ray
backend, and the tracing extra, so it tests traces); it reinstalls only when
pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".dev-stamp"


def ensure_venv() -> None:
    if sys.version_info < (3, 10):
        sys.exit(f"tandem needs Python >= 3.10; this is {sys.version.split()[0]}.")
    if not PYTHON.exists():
        print("Creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    print("Installing tandem and its development dependencies into .venv ...", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev,ray,tracing]"], check=True)
    STAMP.write_text(wanted)


def ensure_chromium() -> None:
    """The dashboard's page test drives a real Chromium: Debian's package. Install it
    where we may (root with apt-get, as on CI); elsewhere the test says what is missing."""
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return
    if not shutil.which("apt-get") or not hasattr(os, "geteuid") or os.geteuid() != 0:
        print(
            "Chromium is missing: the dashboard's page test will be skipped "
            "(install Debian's chromium package to run it).",
            flush=True,
        )
        return
    print(
        "Installing Chromium (Debian's chromium package) for the dashboard's page test ...",
        flush=True,
    )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    for attempt in ([], ["apt-get", "update", "-q"]):
        if attempt:
            subprocess.run(attempt, stdout=subprocess.DEVNULL, env=env)
        if subprocess.run(install, stdout=subprocess.DEVNULL, env=env).returncode == 0:
            return
    print("Installing Chromium failed: the dashboard's page test will be skipped.", flush=True)


def run_server(command: list[str], env: dict[str, str]) -> int:
    """Run the server until it stops. Ctrl-C reaches it as well as us (one process
    group): it shuts down gracefully and we wait for it, without a traceback of our
    own. A SIGTERM sent to us is passed on."""
    with subprocess.Popen(command, cwd=ROOT / "examples", env=env) as server:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: server.terminate())
        return server.wait()


def main() -> int:
    task = sys.argv[1] if len(sys.argv) > 1 else ""
    rest = sys.argv[2:]
    if task not in ("serve", "test"):
        print(__doc__)
        return 2
    ensure_venv()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if task == "serve":
        command = [str(BIN / "tandem"), "run", "hello:language_classifier", *rest]
        return run_server(command, env)
    ensure_chromium()
    if not rest:
        # The whole suite, in two workers, each taking the next test as it is free.
        # Each starts a local Ray of its own at its first test on the ray backend:
        # sending every such test to one worker (one Ray) made that worker the long
        # pole (12:17 against about 10 minutes on 2 cores).
        rest = ["-n", "2"]
    return subprocess.call([str(PYTHON), "-m", "pytest", *rest], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
