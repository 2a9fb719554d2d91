"""A replica process: ``python -m tandem._private.backends.process.worker FD PPID``.

The driver starts it with one end of a socket pair (FD) as its control line.
It waits for its replica's spec and the run's secret, builds the replica,
serves calls on a Unix socket of its own (to callers that pass the handshake
with that secret), and obeys control requests (health, reconfigure, rank,
stop). It exits when told to stop, or at once when the control line breaks:
the driver is gone, so nothing may be left behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pickle
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem._private.backends.process.connection import ProcessConnection
    from tandem._private.backends.process.peer import Peer, PeerListener
    from tandem._private.calls.router import ReplicaInfo

logger = logging.getLogger("tandem.worker")

# How often a replica process tells the driver about requests waiting in its routers.
QUEUE_REPORT_S = 0.2


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
        self.replica: Any = None
        self.exit_code: int | None = None
        self.done = threading.Event()
        self._secret: bytes | None = None  # the run's, from the start request
        self._control_peer: Peer | None = None
        self._listener: PeerListener | None = None
        # Strong references: the loop holds tasks only weakly, and a garbage
        # collection in the replica must not take its connections away.
        self._peers: set[Peer] = set()

    def connect(self, info: ReplicaInfo) -> ProcessConnection:
        """A line to another replica, for this process's routers."""
        from tandem._private.backends.process.connection import ProcessConnection

        if self._secret is None:  # routers are made only once the replica serves
            raise RuntimeError("This replica process has not been started yet.")
        return ProcessConnection(info, self._secret)

    async def serve(self) -> None:
        from tandem._private.backends.process.peer import Peer, peer_on_socket

        sock = socket.socket(fileno=self._control_fd)
        control = Peer("the driver", on_call=self._control, on_note=self._note)
        self._peers.add(control)
        self._control_peer = control
        await peer_on_socket(sock, control)
        reporting = asyncio.ensure_future(self._report_queues(control))
        await control.closed.wait()
        reporting.cancel()
        if self.exit_code is None:  # the driver went away without a word
            os._exit(0)

    def _note(self, op: str, payload: Any) -> None:
        if op == "publish":
            from tandem._private.calls.runtime import get_runtime

            get_runtime().publish(payload)

    async def _control(self, op: str, payload: Any) -> Any:
        if op == "start":
            return await self._start(*payload)
        if op == "health":
            await self.replica.check_health()
            return self.report()
        if op == "report":
            return self.report()
        if op == "reconfigure":
            await self.replica.reconfigure(payload)
            return None
        if op == "rank":
            self.replica.set_rank(*payload)
            return None
        if op == "stop":
            await self.replica.stop(payload)
            if self._listener is not None:
                await self._listener.close()
            self.exit_code = 0
            asyncio.get_running_loop().call_later(0.05, self.done.set)
            return None
        raise ValueError(f"Unknown control request {op!r}.")

    async def _report_queues(self, control: Any) -> None:
        """Tell the driver how many requests wait here for each deployment (autoscaling)."""
        from tandem._private.calls.runtime import get_runtime

        last: dict[Any, int] = {}
        while True:
            await asyncio.sleep(QUEUE_REPORT_S)
            queued = get_runtime().all_queued()
            if queued != last:
                control.note("queued", queued)
                last = queued

    def report(self) -> dict[str, Any]:
        replica = self.replica
        return {
            "in_flight": replica.in_flight,
            "abandoned": replica.abandoned,
            "stats": replica.stats,
        }

    async def _start(
        self,
        spec_blob: bytes,
        path: list[str],
        address: str,
        directory: list[Any],
        secret: bytes,
    ) -> None:
        from tandem._private.backends.process.frames import picklable_starlette
        from tandem._private.backends.process.peer import Peer, PeerListener
        from tandem._private.calls.runtime import get_runtime
        from tandem._private.replica.replica import Replica

        picklable_starlette()
        self._secret = secret
        sys.path[:] = path
        for replica_set in directory:
            get_runtime().publish(replica_set)
        spec = pickle.loads(spec_blob)
        self.replica = Replica(spec)
        control = self._control_peer
        assert control is not None
        self.replica.on_models_changed = lambda ids: control.note("models", ids)
        await self.replica.start()
        replica = self.replica

        async def on_call(op: str, payload: Any) -> Any:
            return await replica.call(*payload)

        def on_stream(op: str, payload: Any) -> Any:
            return replica.stream(*payload)

        def make_peer() -> Peer:
            peer = Peer("a caller", on_call=on_call, on_stream=on_stream)
            self._peers.add(peer)
            peer.closed_callbacks.append(lambda: self._peers.discard(peer))
            return peer

        self._listener = PeerListener(secret, make_peer)
        await self._listener.open(address)


def main() -> None:
    control_fd = int(sys.argv[1])
    _die_with_parent(int(sys.argv[2]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from tandem._private.calls.runtime import Runtime, set_runtime

    worker = _Worker(control_fd)
    runtime = Runtime(worker.connect)
    runtime.backend_name = "process"
    runtime.open()
    set_runtime(runtime)
    serving = asyncio.run_coroutine_threadsafe(worker.serve(), runtime.loop)
    worker.done.wait()
    del serving
    os._exit(worker.exit_code or 0)


if __name__ == "__main__":
    main()
