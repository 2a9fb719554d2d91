"""The two-stage app that benchmarks/chaos.py breaks on purpose: Front (HTTP) -> Stage.

``tandem run chaos_app:app`` serves it. Two hooks let the benchmark inject faults:

- Stage's constructor raises while the file named by ``$CHAOS_FLAG_FILE`` exists
  (read when a replica starts, not at import);
- ``GET /?wedge=PID`` makes the Stage replica whose process is PID run a sync
  method that sleeps for 10 minutes in one of its threads; the other replicas
  answer ``missed`` at once, so the benchmark can fill exactly one replica's slots.
"""

from __future__ import annotations

import os
import time
from typing import Any

import tandem as serve
from tandem.handle import DeploymentHandle

FLAG_ENV_VAR = "CHAOS_FLAG_FILE"
STAGE_MAX_ONGOING = 4
WEDGE_S = 600.0
# Health checks every 0.5 s with a 3 s timeout, so that a wedged replica is noticed
# within seconds; a 2 s grace at shutdown, so that wedged replicas do not hold it up.


@serve.deployment(
    num_replicas=2,
    max_ongoing_requests=STAGE_MAX_ONGOING,
    health_check_period_s=0.5,
    health_check_timeout_s=3.0,
    graceful_shutdown_timeout_s=2.0,
)
class Stage:
    def __init__(self) -> None:
        flag = os.environ.get(FLAG_ENV_VAR)
        if flag and os.path.exists(flag):
            raise RuntimeError(f"chaos: {flag} exists, so this constructor fails on purpose")

    def __call__(self) -> int:
        total = 0  # about 1 ms of CPU on the reference machine
        for i in range(16_000):
            total += i * i
        return total

    def wedge(self, pid: int) -> str:
        if pid != os.getpid():
            return "missed"
        time.sleep(WEDGE_S)  # a sync method stuck in its thread: only its process can end
        return "woke"


@serve.deployment(
    num_replicas=2,
    health_check_period_s=0.5,
    health_check_timeout_s=3.0,
    graceful_shutdown_timeout_s=2.0,
)
class Front:
    def __init__(self, stage: DeploymentHandle) -> None:
        self._stage = stage

    async def __call__(self, request: Any) -> str:
        wedge = request.query_params.get("wedge")
        if wedge is not None:
            return str(await self._stage.wedge.remote(int(wedge)))
        return str(await self._stage.remote())


app = Front.bind(Stage.bind())
