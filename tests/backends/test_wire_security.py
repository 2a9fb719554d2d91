"""The process backend's wire trusts no one it has not authenticated.

Against real replica processes (``backend="process"``): a stranger's pickle is
never unpickled, a frame header cannot make a replica take memory on its word,
a handshake with the wrong secret or none at all is refused while everyone else
is served, the sockets are private, and a SIGKILLed driver's socket folder is
removed by the next backend to start. In process: the frame caps, and a caller
that refuses a fake replica.

Every test keeps its sockets under a runtime directory of its own
(``TANDEM_RUNTIME_DIR``) and bounds its waits with deadlines.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tandem as serve
from helpers import wait_for
from tandem._private import rundir
from tandem._private.backends.process import frames as transport
from tandem._private.backends.process import handshake
from tandem._private.backends.process.handshake import HandshakeError
from tandem._private.backends.process.peer import open_peer
from tandem._private.calls.runtime import get_runtime
from tandem.handle import DeploymentHandle

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; the process backend targets Linux"
)

_HEADER = struct.Struct("!IQ")  # the frame header: buffer count, pickle length
_REPLY = handshake.NONCE_BYTES + 32  # the replica's nonce and its HMAC-SHA256 proof
_RSS_SLACK = 256 << 20  # a replica's RSS may wander this much; a trusted header moves it by GiBs


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


@serve.deployment(num_replicas=2)
class Echo:
    def __call__(self, value: Any) -> Any:
        return value

    def pid(self) -> int:
        return os.getpid()


@dataclass
class Served:
    handle: DeploymentHandle
    sockets: list[Path]
    pids: list[int]
    secret: bytes = field(repr=False)


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A per-user directory of this test's own (short: socket paths hold at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tw-"))
    monkeypatch.setenv(rundir.ENV_VAR, str(path))
    yield path
    serve.shutdown()
    shutil.rmtree(path, ignore_errors=True)


def _serve(runtime_dir: Path) -> Served:
    """Two Echo replicas on the process backend.

    Started in the test's body, not a fixture: capfd gives each phase of a test a
    file of its own, and the replicas write their logs to the one they inherit.
    """
    handle = serve.run(Echo.bind(), name="wire", route_prefix=None, backend="process")
    sockets = sorted(runtime_dir.glob("run-*/*.sock"))
    pids = [r.pid for r in serve.status().applications["wire"].deployments["Echo"].replicas]
    assert len(sockets) == 2, f"expected two replica sockets under {runtime_dir}: {sockets}"
    assert len(pids) == 2
    controller = get_runtime().controller
    assert controller is not None
    return Served(handle, sockets, pids, controller.backend._secret)


def _still_serving(served: Served) -> None:
    """Both original replica processes answer (none was replaced)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.add(served.handle.pid.remote().result(timeout_s=10))
    assert seen == set(served.pids)
    assert served.handle.remote({"x": 1}).result(timeout_s=10) == {"x": 1}
    replicas = serve.status().applications["wire"].deployments["Echo"].replicas
    assert sorted(r.pid for r in replicas) == sorted(served.pids)


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def _send(sock: socket.socket, data: bytes) -> None:
    """Send what we can: the replica may hang up before reading it all, which is its right."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the replica hung up before answering"
        data += chunk
    return data


def _closed_by_replica(sock: socket.socket, timeout_s: float = 10.0) -> bool:
    """Whether the replica closes ``sock`` within ``timeout_s`` (what it sends first is ignored)."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _authenticated(path: Path, secret: bytes) -> socket.socket:
    """A connection to a replica that passed the handshake, as a blocking socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.setblocking(False)

    async def prove() -> None:
        await handshake.client_handshake(asyncio.get_running_loop(), sock, secret)

    asyncio.run(prove())
    sock.setblocking(True)
    sock.settimeout(10)
    return sock


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class _Log:
    """The replicas' stderr (through capfd), gathered as it comes."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self._capfd = capfd
        self.text = ""

    def count(self, needle: str) -> int:
        self.text += self._capfd.readouterr().err
        return self.text.count(needle)


class _Planted:
    """A pickle that creates ``marker`` wherever it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


# --------------------------------------------------------------------------
# against real replicas
# --------------------------------------------------------------------------


def test_a_strangers_pickle_is_never_unpickled(
    runtime_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    served = _serve(runtime_dir)
    marker = tmp_path / "planted"
    frame = b"".join(transport.dumps(("call", 1, "call", _Planted(marker))))
    pickle.loads(frame[_HEADER.size :])  # the frame is well formed: this plants the marker...
    assert marker.exists()
    marker.unlink()  # ...which no replica may do

    for path in served.sockets:
        bare = _connect(path)  # a frame straight away
        _send(bare, frame)
        assert _closed_by_replica(bare), f"{path} kept a connection that sent a bare frame"
        bare.close()
        opened = _connect(path)  # the handshake's opening, then a frame instead of a proof
        _send(opened, handshake.MAGIC + os.urandom(handshake.NONCE_BYTES) + frame)
        assert _closed_by_replica(opened), f"{path} kept a connection that sent no proof"
        opened.close()

    assert not marker.exists(), "a replica unpickled a stranger's frame"
    _still_serving(served)
    log = _Log(capfd)
    assert wait_for(lambda: log.count("Refused a connection") >= 4, 5.0), log.text
    assert log.count("Refused a connection") == 4, log.text  # once per connection
    assert served.secret.hex() not in log.text


def test_a_bogus_frame_header_takes_no_memory(runtime_dir: Path) -> None:
    served = _serve(runtime_dir)
    before = {pid: _rss(pid) for pid in served.pids}
    for path in served.sockets:
        sock = _connect(path)
        _send(sock, _HEADER.pack(0, 4 << 30) + b"\x80\x05")
        assert _closed_by_replica(sock), f"{path} kept a connection that announced 4 GiB"
        sock.close()
    for pid in served.pids:
        assert _rss(pid) - before[pid] < _RSS_SLACK, f"replica {pid} took memory on a header"
    _still_serving(served)


def test_an_authenticated_frame_over_the_cap_is_dropped(
    runtime_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    served = _serve(runtime_dir)
    before = {pid: _rss(pid) for pid in served.pids}
    for path in served.sockets:
        sock = _authenticated(path, served.secret)
        _send(sock, _HEADER.pack(0, 4 << 30))
        assert _closed_by_replica(sock), f"{path} kept a connection whose frame is over the cap"
        sock.close()
    for pid in served.pids:
        assert _rss(pid) - before[pid] < _RSS_SLACK, f"replica {pid} took memory on a header"
    log = _Log(capfd)
    assert wait_for(lambda: log.count("(MAX_FRAME)") >= 2, 5.0), log.text
    _still_serving(served)


def test_memory_follows_the_bytes_that_arrive(runtime_dir: Path) -> None:
    """A frame under the cap announcing 1.5 GiB, of which 8 MiB arrive: memory for ~8 MiB."""
    served = _serve(runtime_dir)
    before = {p: _rss(p) for p in served.pids}
    held = []
    for path in served.sockets:
        sock = _authenticated(path, served.secret)
        # sendall returns once the replica has read all but a socket buffer's worth.
        sock.sendall(_HEADER.pack(0, 3 << 29) + bytes(8 << 20))
        held.append(sock)
    try:
        for p in served.pids:
            assert _rss(p) - before[p] < _RSS_SLACK, f"replica {p} took memory on a header"
    finally:
        for sock in held:
            sock.close()
    _still_serving(served)


def test_sockets_are_private(runtime_dir: Path) -> None:
    previous = os.umask(0o022)  # a common umask: the modes below must not come from it
    try:
        serve.run(Echo.bind(), name="wire", route_prefix=None, backend="process")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
    sockets = sorted(runtime_dir.glob("run-*/*.sock"))
    assert len(sockets) == 2, f"expected two replica sockets under {runtime_dir}"
    for path in sockets:
        info = path.stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600, f"{path} is {oct(info.st_mode)}"
        assert info.st_uid == os.getuid()
        assert path.parent.parent == runtime_dir
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


DRIVER = """
import json, os, time
import tandem as serve

@serve.deployment
class Idle:
    def __call__(self):
        return os.getpid()

serve.run(Idle.bind(), name="killed", route_prefix=None, backend="process")
status = serve.status().applications["killed"].deployments["Idle"]
print(json.dumps([r.pid for r in status.replicas]), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_sigkilled_drivers_folder_is_removed_by_the_next_start(
    runtime_dir: Path, tmp_path: Path
) -> None:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    with open(tmp_path / "stderr.txt", "wb") as stderr:  # TANDEM_RUNTIME_DIR is inherited
        driver = subprocess.Popen(
            [sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr
        )
    pids: list[int] = []
    try:
        assert driver.stdout is not None
        ready, _, _ = select.select([driver.stdout], [], [], 45)
        line = driver.stdout.readline() if ready else b""
        assert line, "the driver did not start: " + (tmp_path / "stderr.txt").read_text()
        pids = json.loads(line)
        left = sorted(runtime_dir.glob("run-*"))
        assert len(left) == 1, f"expected the driver's run folder under {runtime_dir}: {left}"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=20)
        assert wait_for(lambda: not any(_alive(p) for p in pids), 5.0), "replicas outlived it"
        assert left[0].exists()  # nobody was left to remove it

        serve.run(Echo.bind(), name="wire", route_prefix=None, backend="process")
        assert not left[0].exists(), "the dead driver's folder is still there"
        ours = sorted(runtime_dir.glob("run-*"))
        assert len(ours) == 1 and ours != left
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if driver.stdout is not None:
            driver.stdout.close()


def test_a_wrong_proof_is_refused_at_once(
    runtime_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    served = _serve(runtime_dir)
    wrong = bytes(len(served.secret))
    for path in served.sockets:
        sock = _connect(path)
        sock.sendall(handshake.MAGIC + os.urandom(handshake.NONCE_BYTES))
        _recv_exactly(sock, _REPLY)
        sock.sendall(os.urandom(32))  # not the HMAC of the nonces with the run's secret
        started = time.monotonic()
        assert _closed_by_replica(sock), f"{path} kept a connection with a wrong proof"
        assert time.monotonic() - started < handshake.HANDSHAKE_TIMEOUT_S
        sock.close()

        # A caller with the wrong secret finds the replica's proof wrong, and says so.
        async def connect_with_wrong_secret(path: Path = path) -> None:
            await open_peer(str(path), "a replica", wrong)

        with pytest.raises(HandshakeError, match="did not prove"):
            asyncio.run(connect_with_wrong_secret())
    _still_serving(served)
    log = _Log(capfd)
    assert wait_for(lambda: log.count("Refused a connection") >= 4, 5.0), log.text
    assert log.count("did not prove it holds this run's secret") == 2, log.text
    assert served.secret.hex() not in log.text


def test_a_silent_client_is_dropped_after_the_handshake_timeout(
    runtime_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    served = _serve(runtime_dir)
    silent = [_connect(path) for path in served.sockets]
    started = time.monotonic()
    try:
        _still_serving(served)  # meanwhile everyone else is served
        margin = 10.0  # a loaded machine fires timers late, never early
        for sock in silent:
            left = handshake.HANDSHAKE_TIMEOUT_S + margin - (time.monotonic() - started)
            assert _closed_by_replica(sock, left), "a silent connection was kept"
        assert time.monotonic() - started >= handshake.HANDSHAKE_TIMEOUT_S - 0.5
    finally:
        for sock in silent:
            sock.close()
    log = _Log(capfd)
    assert wait_for(lambda: log.count("did not finish within") >= 2, 5.0), log.text
    _still_serving(served)


# --------------------------------------------------------------------------
# in process: the caller's side and the frame caps
# --------------------------------------------------------------------------


def test_a_caller_refuses_a_fake_replica(tmp_path: Path) -> None:
    """A socket that cannot prove it holds the secret never gets a frame unpickled."""
    marker = tmp_path / "planted"
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    listener.settimeout(10)

    def fake_replica() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            _recv_exactly(conn, len(handshake.MAGIC) + handshake.NONCE_BYTES)
            frame = b"".join(transport.dumps(("ok", 1, _Planted(marker))))
            _send(conn, os.urandom(_REPLY) + frame)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass

    thread = threading.Thread(target=fake_replica)
    thread.start()
    try:
        with pytest.raises(HandshakeError):
            asyncio.run(open_peer(str(path), "a fake replica", handshake.new_secret()))
    finally:
        thread.join(15)
        listener.close()
    assert not marker.exists()


class _Transport:
    """Enough of a transport for FrameProtocol: records an abort."""

    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def _protocol() -> tuple[transport.FrameProtocol, _Transport, list[Any]]:
    received: list[Any] = []
    protocol = transport.FrameProtocol(received.append, lambda exc: None)
    fake = _Transport()
    protocol.connection_made(fake)
    return protocol, fake, received


def _feed(protocol: transport.FrameProtocol, data: bytes, chunk: int) -> int:
    """Deliver ``data`` as a transport would, ``chunk`` bytes at most per read; return the
    largest buffer the protocol offered for one read."""
    largest = 0
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(-1)
        largest = max(largest, len(buffer))
        size = min(len(buffer), len(view), chunk)
        buffer[:size] = view[:size]
        buffer.release()  # as a transport lets go of it before the next read
        protocol.buffer_updated(size)
        view = view[size:]
    return largest


def test_the_receiver_offers_memory_as_bytes_arrive() -> None:
    protocol, fake, _ = _protocol()
    largest = _feed(protocol, _HEADER.pack(0, 3 << 29) + bytes(3 << 20), 256 << 10)
    assert not fake.aborted  # 1.5 GiB is under the cap: the frame goes on
    assert largest <= 4 << 20, f"offered {largest} bytes for 3 MiB of data"
    assert len(protocol.get_buffer(-1)) <= 4 << 20


@pytest.mark.parametrize("chunk", [7_000, 65_536, 1 << 20])
def test_large_parts_arrive_whole(chunk: int) -> None:
    protocol, fake, received = _protocol()
    array = np.random.default_rng(0).random((5 << 20) // 8)
    message = ("ok", 1, {"array": array, "blob": os.urandom(3 << 20), "small": [1, 2]})
    frame = b"".join(transport.dumps(message)) * 2
    _feed(protocol, frame, chunk)
    assert not fake.aborted
    assert len(received) == 2
    for got in received:
        assert np.array_equal(got[2]["array"], array)
        assert got[2]["blob"] == message[2]["blob"]
        assert got[2]["small"] == [1, 2]


@pytest.mark.parametrize(
    "header, limit",
    [
        (_HEADER.pack(0, transport.MAX_FRAME + 1), "(MAX_FRAME)"),
        (
            _HEADER.pack(2, 1) + struct.pack("!QQ", transport.MAX_FRAME // 2, 1 << 30),
            "(MAX_FRAME)",
        ),
        (_HEADER.pack(transport.MAX_BUFFERS + 1, 1), "(MAX_BUFFERS)"),
    ],
)
def test_a_frame_over_the_caps_drops_the_connection(
    header: bytes, limit: str, caplog: pytest.LogCaptureFixture
) -> None:
    protocol, fake, received = _protocol()
    with caplog.at_level("ERROR", logger="tandem"):
        _feed(protocol, header, 1 << 20)
    assert fake.aborted
    assert not received
    assert limit in caplog.text


def test_a_message_over_the_cap_fails_at_the_sender() -> None:
    huge = np.zeros(transport.MAX_FRAME + 1, dtype=np.uint8)  # untouched: takes no memory
    with pytest.raises(transport.FrameTooLargeError, match="over tandem's limit"):
        transport.dumps(("ok", 1, huge))


def test_buffers_beyond_the_cap_travel_in_band() -> None:
    base = np.arange(transport.MIN_OUT_OF_BAND, dtype=np.uint8)
    views = [base[:] for _ in range(transport.MAX_BUFFERS + 3)]  # one memory, many buffers
    header, body, *buffers = transport.dumps(views)
    assert len(buffers) == transport.MAX_BUFFERS
    assert _HEADER.unpack_from(header)[0] == transport.MAX_BUFFERS
    back = pickle.loads(body, buffers=buffers)
    assert len(back) == len(views) and all(np.array_equal(v, base) for v in back)


def test_a_request_on_a_closing_connection_is_not_sent_so_it_may_go_elsewhere() -> None:
    """A connection the OS is closing (its replica just died) refuses a new request with
    ReplicaNotReached, which routers retry on another replica, not a server error."""
    from tandem._private.backends.process.peer import Peer, peer_on_socket
    from tandem._private.calls.errors import ReplicaNotReached

    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        peer = await peer_on_socket(ours, Peer("replica r1"))
        assert peer.protocol.transport is not None
        peer.protocol.transport.close()  # closing; connection_lost has not run yet
        with pytest.raises(ReplicaNotReached, match="not sent"):
            await peer.call("call", None)
        await peer.closed.wait()
        with pytest.raises(ReplicaNotReached, match="not sent"):
            await peer.call("call", None)
        theirs.close()

    asyncio.run(scenario())
