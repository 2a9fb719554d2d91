"""What this machine offers replicas: CPUs, GPUs and memory, and who holds what.

GPUs are hard limits (each replica that asks for some gets its own devices in
``CUDA_VISIBLE_DEVICES``; asking for more than exist fails at once). CPUs and
memory are soft: over-subscribing them logs a warning and starts the replica
anyway, so an application never hangs waiting for a core it will not get.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field

logger = logging.getLogger("tandem")

GPU_ENV_VAR = "TANDEM_NUM_GPUS"  # overrides detection (tests, or machines nvidia-smi misreads)


def detect_gpus() -> list[str]:
    """GPU ids visible to this process: $TANDEM_NUM_GPUS, $CUDA_VISIBLE_DEVICES or nvidia-smi."""
    override = os.environ.get(GPU_ENV_VAR)
    if override is not None:
        return [str(i) for i in range(int(override))]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def total_memory() -> float | None:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Claim:
    """What one replica holds."""

    cpus: float = 0.0
    gpu_ids: list[str] = field(default_factory=list)
    memory: float = 0.0


class Resources:
    """The machine's resources and the claims replicas hold on them."""

    def __init__(self, cpus: float, gpu_ids: list[str], memory: float | None) -> None:
        self.cpus = cpus
        self.gpu_ids = gpu_ids
        self.memory = memory
        self._claims: dict[str, Claim] = {}

    @classmethod
    def detect(cls) -> Resources:
        return cls(float(os.cpu_count() or 1), detect_gpus(), total_memory())

    def claim(self, replica_id: str, name: str, cpus: float, gpus: float, memory: float) -> Claim:
        """Reserve for a replica; ValueError if it asks for more GPUs than are free."""
        free_gpus = [
            g for g in self.gpu_ids if not any(g in c.gpu_ids for c in self._claims.values())
        ]
        wanted = math.ceil(gpus)
        if wanted > len(free_gpus):
            raise ValueError(
                f"Deployment {name!r} asks for {gpus:g} GPU(s) per replica, but "
                f"{len(free_gpus)} of this machine's {len(self.gpu_ids)} GPU(s) are free; "
                "lower num_gpus or num_replicas."
            )
        used_cpus = sum(c.cpus for c in self._claims.values())
        if cpus and used_cpus + cpus > self.cpus:
            logger.warning(
                "Deployment %r asks for %g CPU(s); replicas now hold %g of this machine's %g. "
                "Starting it anyway: CPUs are shared, not reserved.",
                name, cpus, used_cpus + cpus, self.cpus,
            )  # fmt: skip
        used_memory = sum(c.memory for c in self._claims.values())
        if memory and self.memory is not None and used_memory + memory > self.memory:
            logger.warning(
                "Deployment %r asks for %.0f MB of memory; replicas now hold more than this "
                "machine's %.0f MB. Starting it anyway.",
                name, memory / 2**20, self.memory / 2**20,
            )  # fmt: skip
        claim = Claim(cpus, free_gpus[:wanted], memory)
        self._claims[replica_id] = claim
        return claim

    def release(self, replica_id: str) -> None:
        self._claims.pop(replica_id, None)
