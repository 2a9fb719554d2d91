"""Joining Ray, for the ray backend and for ``_to_object_ref`` on the other backends.

``connect_ray`` joins the cluster the user names, else starts a Ray of tandem's
own (``ray.init()`` alone would join whatever ``ray start`` last recorded on this
machine, and fail or hang when that Ray has gone). A local Ray that tandem
starts counts enough logical CPUs for replicas to share a small machine's cores.

Imports Ray: only code that needs Ray loads this module.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray

logger = logging.getLogger("tandem")

# Logical CPUs (at least) of a local Ray started by tandem; see _local_cpus.
LOCAL_MIN_CPUS = 64


def connect_ray(address: str | None = None, runtime_env: dict[str, Any] | None = None) -> None:
    """Join the cluster at ``address``, else at $RAY_ADDRESS (``auto``: the one ``ray start``
    runs on this machine), else start a local Ray of tandem's own."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and address != "local":
        logger.info("Connecting to the Ray cluster at %s.", address)
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        return
    cpus = _local_cpus()
    logger.info("Starting a local Ray with %s logical CPUs.", cpus)
    ray.init(
        address="local",  # a new one, even if a `ray start` (or a stale record of one) is here
        num_cpus=cpus,
        runtime_env=runtime_env,
        logging_level=logging.WARNING,
        include_dashboard=False,
    )


_CONNECT_LOCK = threading.Lock()


def put(value: Any) -> Any:
    """``ray.put(value)``, joining Ray first as the ray backend would (not as ray.put's
    own ``ray.init()``, which fails on the stale record of a ``ray start`` that has gone)."""
    with _CONNECT_LOCK:
        if not ray.is_initialized():
            connect_ray()
    return ray.put(value)


def _local_cpus() -> int:
    """Logical CPUs of a local Ray that tandem starts itself.

    A replica reserves one CPU by default, so on a small machine an application
    with more replicas than cores would wait forever for room. Tandem's own local
    Ray is for running an application on one machine, as the process backend does,
    which lets replicas share cores; so it counts at least LOCAL_MIN_CPUS logical
    CPUs ($TANDEM_RAY_NUM_CPUS overrides). A cluster counts what its nodes declare.
    """
    setting = os.environ.get("TANDEM_RAY_NUM_CPUS")
    if setting:
        try:
            return max(1, int(setting))
        except ValueError:
            raise ValueError(
                f"TANDEM_RAY_NUM_CPUS must be a whole number of CPUs, got {setting!r}."
            ) from None
    return max(os.cpu_count() or 1, LOCAL_MIN_CPUS)
