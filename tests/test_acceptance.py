"""The acceptance scripts (the seeds' examples with only the imports changed) run unmodified."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ACCEPTANCE = Path(__file__).resolve().parents[2] / "shared" / "acceptance"


@pytest.mark.parametrize("script", ["chain", "stream", "patterns"])
def test_acceptance_script(script: str) -> None:
    path = ACCEPTANCE / f"{script}.py"
    if not ACCEPTANCE.is_dir():
        pytest.skip(f"acceptance scripts not found at {ACCEPTANCE} (not part of this checkout)")
    if not path.is_file():
        pytest.skip(f"acceptance script {path} not found")
    env = {**os.environ, "TANDEM_BACKEND": "local"}
    result = subprocess.run(
        [sys.executable, path.name],
        cwd=ACCEPTANCE,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{script}: ok" in result.stdout.splitlines(), output
