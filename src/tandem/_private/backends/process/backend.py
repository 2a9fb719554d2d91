"""The process backend: every replica is a child process on this machine.

Replicas call each other directly over Unix sockets; the driver only starts,
watches and stops them. A replica process that dies is noticed at once (a
pidfd becomes readable) and reported to the controller, which replaces it;
requests in flight on it fail with ReplicaUnavailableError when its socket
closes. Replica processes die with the driver, even if it is killed.

Their sockets live in a folder of this run under tandem's private per-user
directory (``rundir``; removed on close, or by the next backend to open if the
driver was killed), and only callers holding this run's secret get through
them (``handshake``): the backend makes the secret when it opens and hands it
to each replica in its start request, over the replica's control line.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tandem._private.backends.base import Backend, BackendEvents, IgnoredOptions, ReplicaStartError
from tandem._private.backends.process.connection import ProcessAddress, ProcessConnection
from tandem._private.backends.process.frames import RemoteTraceback, picklable_starlette
from tandem._private.backends.process.handshake import new_secret
from tandem._private.backends.process.peer import Peer, peer_on_socket
from tandem._private.backends.process.resources import Resources
from tandem._private.backends.process.worker import RAY_ADDRESS_ENV, RAY_NAMESPACE_ENV
from tandem._private.calls.context import DeploymentID
from tandem._private.calls.router import ReplicaConnection, ReplicaInfo, ReplicaSet
from tandem._private.replica.host import StartSpec
from tandem._private.replica.log_buffer import LogRead
from tandem._private.replica.replica import ReplicaFacts, ReplicaSpec
from tandem._private.rundir import RunDir, open_run_dir
from tandem.exceptions import ReplicaUnavailableError

logger = logging.getLogger("tandem")

# The longest path a Unix socket may have (sun_path holds 108 bytes with its NUL).
_MAX_SOCKET_PATH = 107


@dataclass
class _Child:
    replica_id: str
    process: subprocess.Popen[bytes]
    control: Peer
    stopping: bool = False
    report: ReplicaFacts | None = None  # as of the last health check or refresh
    pidfd: int | None = None


class ProcessBackend(Backend):
    name = "process"
    serves_direct_ingress = True

    def __init__(self, resources: Resources | None = None) -> None:
        self._resources = resources
        self._children: dict[str, _Child] = {}
        # Requests waiting in replica processes' routers, per process and deployment.
        self._queued: dict[str, dict[DeploymentID, int]] = {}
        self._directory: dict[DeploymentID, ReplicaSet] = {}
        self._run_dir: RunDir | None = None
        self._secret = b""
        self._ids = itertools.count()
        self._ignored = IgnoredOptions(self.name)
        # Direct ingress (http/direct.py): the plan ingress replicas serve HTTP under,
        # and the driver's /metrics, which they answer with.
        self._ingress_plan: Any = None
        self._metrics: Callable[[], Awaitable[bytes]] | None = None

    async def open(self, events: BackendEvents) -> None:
        picklable_starlette()
        await super().open(events)
        self._secret = new_secret()
        run_dir = open_run_dir()
        longest = os.path.join(run_dir.path, "r999999.sock")
        if len(os.fsencode(longest)) > _MAX_SOCKET_PATH:
            run_dir.close()
            raise RuntimeError(
                f"The folder {run_dir.path} is too long a path for Unix sockets "
                f"(at most {_MAX_SOCKET_PATH} bytes); set TANDEM_RUNTIME_DIR to a shorter one."
            )
        self._run_dir = run_dir
        if self._resources is None:
            self._resources = Resources.detect()

    async def close(self) -> None:
        for child in list(self._children.values()):
            self._kill(child)
        if self._run_dir is not None:
            self._run_dir.close()
            self._run_dir = None

    # -- replicas ----------------------------------------------------------

    async def start_replica(self, spec: ReplicaSpec) -> ReplicaInfo:
        assert self._resources is not None
        self._ignored.placement(spec)
        actor = spec.options.ray_actor_options
        try:
            claim = self._resources.claim(
                spec.replica_id,
                spec.deployment_id.name,
                cpus=(actor.num_cpus or 0) if actor else 0,
                gpus=(actor.num_gpus or 0) if actor else 0,
                memory=(actor.memory or 0) if actor else 0,
            )
        except ValueError as exc:
            raise ReplicaStartError(spec.replica_id, exc, str(exc)) from exc
        env = dict(os.environ)
        if actor is not None and actor.runtime_env:
            self._ignored.runtime_env(spec, honoured=frozenset({"env_vars"}))
            env.update(_env_vars(actor.runtime_env))
        if claim.gpu_ids or (actor is not None and actor.num_gpus is not None):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(claim.gpu_ids)
        env.update(_ray_link())
        try:
            return await self._spawn(spec, env)
        except BaseException:
            self._resources.release(spec.replica_id)
            raise

    async def _answer(self, op: str, payload: Any) -> Any:
        """What a replica process asks the driver: ``tandem.status()`` from its code,
        and /metrics for its own proxy (direct ingress)."""
        if op == "status":
            return self.events.status()
        if op == "metrics":
            if self._metrics is None:
                raise RuntimeError("The driver serves no HTTP now.")
            return await self._metrics()
        raise ValueError(f"Unknown request {op!r} from a replica.")

    def serve_direct(self, plan: Any, metrics: Callable[[], Awaitable[bytes]] | None) -> None:
        self._ingress_plan = plan
        self._metrics = metrics
        for child in self._children.values():
            child.control.note("ingress", plan)

    async def _spawn(self, spec: ReplicaSpec, env: dict[str, str]) -> ReplicaInfo:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tandem._private.backends.process.worker",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=[theirs.fileno()],
                env=env,
                cwd=os.getcwd(),
            )
        except BaseException:
            ours.close()  # e.g. out of file descriptors: give back what we took
            raise
        finally:
            theirs.close()
        replica_id = spec.replica_id

        def on_note(op: str, payload: Any) -> None:
            if op == "models":
                self.events.models_changed(replica_id, payload)
            elif op == "queued":
                self._queued[replica_id] = payload

        control = await peer_on_socket(
            ours, Peer(f"replica {replica_id}", on_call=self._answer, on_note=on_note)
        )
        child = _Child(spec.replica_id, process, control)
        self._children[spec.replica_id] = child
        self._watch(child)
        assert self._run_dir is not None
        address = os.path.join(self._run_dir.path, f"r{next(self._ids)}.sock")
        try:
            await control.call(
                "start",
                (
                    StartSpec.of(spec, self._directory.values(), driver_path_first=True),
                    address,
                    self._secret,
                ),
            )
        except ReplicaUnavailableError as exc:
            code = await _wait_exit(process, 5) or process.returncode
            self._forget(child)
            error = RuntimeError(
                f"The replica process exited with code {code} while starting (see its output)."
            )
            raise ReplicaStartError(spec.replica_id, error, str(error)) from exc
        except BaseException as exc:
            child.stopping = True
            self._kill(child)
            process.wait()  # killed: this returns at once
            self._forget(child)
            if isinstance(exc, Exception):
                cause = exc.__cause__
                if isinstance(cause, RemoteTraceback):
                    text = cause.text
                else:  # failed here, in the driver: that is a traceback too
                    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                raise ReplicaStartError(spec.replica_id, exc, text) from exc
            raise
        if self._ingress_plan is not None:
            control.note("ingress", self._ingress_plan)
        return ReplicaInfo(
            spec.replica_id, ProcessAddress(address, process.pid), spec.options.max_ongoing_requests
        )

    def _watch(self, child: _Child) -> None:
        """Learn of the child's exit the moment it happens."""
        loop = asyncio.get_running_loop()
        try:
            child.pidfd = os.pidfd_open(child.process.pid)
        except (AttributeError, OSError):  # not Linux: the control line's EOF tells instead
            child.control.closed_callbacks.append(lambda: self._exited(child))
            return
        loop.add_reader(child.pidfd, self._exited, child)

    def _exited(self, child: _Child) -> None:
        if child.pidfd is not None:
            asyncio.get_running_loop().remove_reader(child.pidfd)
            os.close(child.pidfd)
            child.pidfd = None
        child.process.poll()  # reap it
        if self._children.get(child.replica_id) is child:
            self._forget(child)
            if not child.stopping:
                logger.warning(
                    "Replica %s (pid %d) exited with code %s.",
                    child.replica_id, child.process.pid, child.process.returncode,
                )  # fmt: skip
                self.events.replica_exited(child.replica_id)

    def _forget(self, child: _Child) -> None:
        self._queued.pop(child.replica_id, None)
        if self._children.get(child.replica_id) is child:
            del self._children[child.replica_id]
        if self._resources is not None:
            self._resources.release(child.replica_id)

    def _kill(self, child: _Child) -> None:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()  # reap it, or it lingers as a zombie

    async def stop_replica(self, info: ReplicaInfo, timeout_s: float) -> None:
        child = self._children.get(info.replica_id)
        if child is None:
            return
        child.stopping = True
        try:
            await asyncio.wait_for(child.control.call("stop", timeout_s), timeout_s + 5)
        except (asyncio.TimeoutError, ReplicaUnavailableError):
            pass
        if await _wait_exit(child.process, 5) is None:
            self._kill(child)
            child.process.wait()
        self._forget(child)

    async def check_health(self, info: ReplicaInfo) -> None:
        child = self._child(info)
        child.report = await child.control.call("health", None)

    async def refresh(self, info: ReplicaInfo) -> None:
        child = self._children.get(info.replica_id)
        if child is not None:
            try:
                child.report = await child.control.call("report", None)
            except ReplicaUnavailableError:
                pass

    async def logs(
        self, info: ReplicaInfo, after: int, limit: int, request_id: str | None = None
    ) -> LogRead:
        result: LogRead = await self._child(info).control.call("logs", (after, limit, request_id))
        return result

    async def reconfigure(self, info: ReplicaInfo, user_config: Any) -> None:
        await self._child(info).control.call("reconfigure", user_config)

    async def set_rank(self, info: ReplicaInfo, rank: int, world_size: int) -> None:
        await self._child(info).control.call("rank", (rank, world_size))

    def _child(self, info: ReplicaInfo) -> _Child:
        child = self._children.get(info.replica_id)
        if child is None:
            raise ReplicaUnavailableError(f"Replica {info.replica_id} is not running.")
        return child

    def connect(self, info: ReplicaInfo) -> ReplicaConnection:
        return ProcessConnection(info, self._secret)

    def publish(self, replica_set: ReplicaSet) -> None:
        if replica_set.state == "deleted":
            self._directory.pop(replica_set.deployment_id, None)
        else:
            self._directory[replica_set.deployment_id] = replica_set
        for child in self._children.values():
            child.control.note("publish", replica_set)

    def queued(self, deployment_id: DeploymentID) -> int:
        return sum(counts.get(deployment_id, 0) for counts in self._queued.values())

    def facts(self, info: ReplicaInfo) -> ReplicaFacts:
        child = self._children.get(info.replica_id)
        if child is not None and child.report is not None:
            return child.report
        address = info.address
        return ReplicaFacts(pid=address.pid if isinstance(address, ProcessAddress) else None)


async def _wait_exit(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The exit code once the process ends, or None after ``timeout_s``.

    Polls instead of waiting in a thread: this also runs at interpreter exit,
    when no new threads may start.
    """
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.01)
    return process.returncode


def _ray_link() -> dict[str, str]:
    """If this driver uses Ray, where its cluster is: the replica process joins it
    before it reads its deployment, so user code that holds Ray actor handles or
    calls ``ray.get`` works there as it does in the driver (and on Ray Serve)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    context = ray.get_runtime_context()
    return {RAY_ADDRESS_ENV: context.gcs_address, RAY_NAMESPACE_ENV: context.namespace}


def _env_vars(runtime_env: dict[str, Any]) -> dict[str, str]:
    """The environment variables a runtime_env sets (ActorOptions checked their types)."""
    return dict(runtime_env.get("env_vars") or {})
