"""Joining Ray, for the ray backend and for ``_to_object_ref`` on the other backends.

``connect_ray`` does what ``ray.init()`` does about where to connect, with two
differences: a stale record of a ``ray start`` that has gone is ignored (Ray
would try to join it and fail), and a local Ray that tandem starts counts enough
logical CPUs for replicas to share a small machine's cores.

Imports Ray: only code that needs Ray loads this module.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray

logger = logging.getLogger("tandem")

# Logical CPUs (at least) of a local Ray started by tandem; see _local_cpus.
LOCAL_MIN_CPUS = 64


def connect_ray(runtime_env: dict[str, Any] | None = None) -> None:
    """Join $RAY_ADDRESS, else the Ray that ``ray start`` runs on this machine, else
    start a local Ray ($RAY_ADDRESS=local, or --address local, asks for that one)."""
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        address = _cluster_on_this_machine()
        if address is not None:
            logger.info(
                "Joining the Ray that `ray start` runs on this machine, at %s "
                "(--address local starts a Ray of tandem's own instead).",
                address,
            )
    elif address != "local":
        logger.info("Connecting to the Ray cluster at %s.", address)
    if address is not None and address != "local":
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        return
    cpus = _local_cpus()
    logger.info("Starting a local Ray with %s logical CPUs.", cpus)
    ray.init(
        address="local",  # a new one, even if a record of an old `ray start` is left
        num_cpus=cpus,
        runtime_env=runtime_env,
        logging_level=logging.WARNING,
        include_dashboard=False,
    )


def _cluster_on_this_machine() -> str | None:
    """The address of the Ray that `ray start` runs on this machine, which ``ray.init()``
    would join; None if there is none, or only the record of one that has gone."""
    try:
        from ray._private.utils import read_ray_address

        address = read_ray_address()
    except Exception:  # Ray moved its private helper: start a Ray of our own
        return None
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return str(address)
    except (OSError, ValueError):
        logger.info("Not joining the Ray recorded at %s: it has gone.", address)
        return None


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
