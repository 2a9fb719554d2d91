"""A replica process: ``python -m tandem._private.backends.process.worker FD PPID``.

The process backend's adapter over the replica host (``replica/host.py``). The
driver starts it with one end of a socket pair (FD) as its control line, and
sends it the replica's start spec, the path of the Unix socket to serve on and
the run's secret. The worker maps the driver's control requests (start,
health, report, reconfigure, rank, stop) and notes (publish) to the host,
passes the host's news (models, queued requests) back as notes, and maps the
calls, streams and read reports of callers that pass the handshake on its
socket to the host too. It exits when told to stop, or at once when the
control line breaks: the driver is gone, so nothing may be left behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import AsyncGenerator, Awaitable
from typing import TYPE_CHECKING, Any

from tandem._private.backends.local import LocalConnection
from tandem._private.backends.process.connection import ProcessConnection
from tandem._private.backends.process.frames import picklable_starlette
from tandem._private.backends.process.peer import Peer, PeerListener, peer_on_socket
from tandem._private.calls.channel import chunks
from tandem._private.calls.router import ReplicaConnection, ReplicaInfo
from tandem._private.calls.runtime import Runtime, set_runtime
from tandem._private.http.options import direct_ingress_enabled
from tandem._private.replica.host import ReplicaHost, StartSpec
from tandem._private.replica.replica import ReplicaFacts

if TYPE_CHECKING:
    from tandem._private.http.direct import DirectIngress, IngressPlan

logger = logging.getLogger("tandem.worker")

# After answering "stop", the process lives this much longer, for the answer to leave.
EXIT_DELAY_S = 0.05
# Set by the driver when it uses Ray: the cluster (and namespace) this process joins.
RAY_ADDRESS_ENV = "TANDEM_REPLICA_RAY_ADDRESS"
RAY_NAMESPACE_ENV = "TANDEM_REPLICA_RAY_NAMESPACE"


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill us if the driver dies, even by SIGKILL (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the driver died before prctl took effect
        os._exit(1)


class _Worker:
    def __init__(self, control_fd: int) -> None:
        self._control_fd = control_fd
        self.exit_code: int | None = None
        self.done = threading.Event()
        self._secret: bytes | None = None  # the run's, from the start request
        self.runtime = Runtime(self.connect)
        self.runtime.backend_name = "process"
        self.host = ReplicaHost(self.runtime)
        self._control: Peer | None = None
        self._listener: PeerListener | None = None
        self._forwarding: asyncio.Task[None] | None = None
        # Strong references: the loop holds tasks only weakly, and a garbage
        # collection in the replica must not take its connections away.
        self._peers: set[Peer] = set()
        # Direct ingress (http/direct.py): this process's proxy, the latest plan the
        # driver sent, and the task that applies plans one at a time.
        self._ingress: DirectIngress | None = None
        self._plan: IngressPlan | None = None
        self._applying: asyncio.Task[None] | None = None

    def connect(self, info: ReplicaInfo) -> ReplicaConnection:
        """A line to a replica (another, or this process's own), for its routers."""
        if self._secret is None:  # routers are made only once the replica serves
            raise RuntimeError("This replica process has not been started yet.")
        if self._ingress is not None and info.replica_id == self.host.replica.replica_id:
            return LocalConnection(self.host.replica)
        return ProcessConnection(info, self._secret)

    async def serve(self) -> None:
        sock = socket.socket(fileno=self._control_fd)
        control = Peer("the driver", on_call=self._on_control, on_note=self._on_driver_note)
        self._peers.add(control)
        self._control = control
        self.runtime.driver_status = lambda: control.call("status", None)
        await peer_on_socket(sock, control)
        await control.closed.wait()
        if self.exit_code is None:  # the driver went away without a word
            os._exit(0)

    # -- the driver --------------------------------------------------------

    def _on_driver_note(self, op: str, payload: Any) -> None:
        if op == "publish":
            self.host.publish(payload)
        elif op == "ingress":
            self._plan = payload
            self._apply_plan()

    def _apply_plan(self) -> None:
        if self._ingress is not None and (self._applying is None or self._applying.done()):
            self._applying = asyncio.ensure_future(self._apply_plans(self._ingress))

    async def _apply_plans(self, ingress: DirectIngress) -> None:
        applied: Any = ingress  # never a plan: the first round always applies
        while applied is not self._plan:
            applied = self._plan
            await ingress.update(applied)

    def _facts(self, facts: ReplicaFacts) -> ReplicaFacts:
        if self._ingress is None:
            return facts
        return dataclasses.replace(facts, proxy_counts=self._ingress.counts)

    async def _on_control(self, op: str, payload: Any) -> Any:
        host = self.host
        if op == "start":
            await self._start(*payload)
            return None
        if op == "health":
            return self._facts(await host.check_health())
        if op == "report":
            return self._facts(host.facts())
        if op == "logs":
            return host.logs(*payload)
        if op == "reconfigure":
            await host.reconfigure(payload)
            return None
        if op == "rank":
            await host.set_rank(*payload)
            return None
        if op == "stop":
            await self._stop(payload)
            return None
        raise ValueError(f"Unknown control request {op!r}.")

    async def _start(self, spec: StartSpec, address: str, secret: bytes) -> None:
        picklable_starlette()
        self._secret = secret
        if os.environ.get(RAY_ADDRESS_ENV) and _holds_ray_objects(spec):
            await asyncio.to_thread(_join_drivers_ray)
        await self.host.start(spec)
        if direct_ingress_enabled():
            self._open_ingress()
        self._forwarding = asyncio.ensure_future(self._forward_news())
        self._listener = PeerListener(secret, self._new_caller)
        await self._listener.open(address)

    def _open_ingress(self) -> None:
        """Be ready to serve HTTP here when the driver's plan says so (http/direct.py)."""
        from tandem._private.http.direct import DirectIngress  # only where it is used

        replica = self.host.replica
        control = self._control
        assert control is not None
        self._ingress = DirectIngress(
            self.runtime,
            replica.deployment_id.app_name,
            replica.deployment_id.name,
            metrics=lambda: control.call("metrics", None),
        )
        # The proxy here calls the replica here, in this process, whenever it has room.
        self.runtime.prefer(replica.replica_id)
        self._apply_plan()  # a plan that came while the replica started

    async def _stop(self, timeout_s: float) -> None:
        # Accept no more HTTP here first; what was accepted finishes while the replica drains.
        ingress, self._ingress = self._ingress, None
        if ingress is not None:
            if self._applying is not None:
                self._applying.cancel()
                await asyncio.gather(self._applying, return_exceptions=True)
            await ingress.stop()
        forwarding, self._forwarding = self._forwarding, None
        if forwarding is not None:
            forwarding.cancel()
            await asyncio.gather(forwarding, return_exceptions=True)
        await self.host.stop(timeout_s)
        if self._listener is not None:
            await self._listener.close()
        self.exit_code = 0
        asyncio.get_running_loop().call_later(EXIT_DELAY_S, self.done.set)

    async def _forward_news(self) -> None:
        """Tell the driver of the host's news as it comes: the models the replica
        holds (for routing) and the requests waiting here (for autoscaling)."""
        control = self._control
        assert control is not None
        version = 0
        models: frozenset[str] = frozenset()
        queued: dict[Any, int] = {}
        while True:
            version, news = await self.host.watch(version)
            if news["models"] != models:
                models = news["models"]
                control.note("models", models)
            if news["queued"] != queued:
                queued = news["queued"]
                control.note("queued", queued)

    # -- callers -----------------------------------------------------------

    def _new_caller(self) -> Peer:
        peer = Peer(
            "a caller",
            on_call=self._on_call,
            on_stream=self._on_stream,
            on_note=self._on_caller_note,
        )
        self._peers.add(peer)
        peer.closed_callbacks.append(lambda: self._peers.discard(peer))
        return peer

    def _on_call(self, op: str, payload: Any) -> Awaitable[Any]:
        if op == "push":  # items of a stream's inbound argument (calls.inbound)
            return self.host.push(*payload)
        # No token: the wire cancels a call by its own request id.
        return self.host.call(None, *payload)

    def _on_stream(self, op: str, payload: Any) -> AsyncGenerator[Any, None]:
        stream = self.host.stream(*payload)
        window_s = payload[1].stream_chunk_s  # (token, meta, args, kwargs)
        return chunks(stream, window_s) if window_s else stream

    def _on_caller_note(self, op: str, payload: Any) -> None:
        if op == "read":
            self.host.read(*payload)


def _holds_ray_objects(spec: StartSpec) -> bool:
    """Whether the deployment cannot be read without Ray: it holds Ray actor handles
    or object refs (as Ray Serve's own examples do). Joining costs about a second,
    so a replica joins the driver's Ray only then."""
    try:
        pickle.loads(spec.replica)
    except Exception as exc:  # any other failure: host.start reports it
        return "Ray has not been started" in str(exc)
    return False


def _join_drivers_ray() -> None:
    """Join the driver's Ray cluster (see _holds_ray_objects)."""
    import ray  # only here: a driver that uses Ray has it installed

    address = os.environ[RAY_ADDRESS_ENV]

    ray.init(
        address=address,
        namespace=os.environ.get(RAY_NAMESPACE_ENV) or None,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )


def main() -> None:
    control_fd = int(sys.argv[1])
    _die_with_parent(int(sys.argv[2]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    worker = _Worker(control_fd)
    worker.runtime.open()
    set_runtime(worker.runtime)
    serving = asyncio.run_coroutine_threadsafe(worker.serve(), worker.runtime.loop)
    worker.done.wait()
    del serving
    os._exit(worker.exit_code or 0)


if __name__ == "__main__":
    main()
