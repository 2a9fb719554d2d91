"""tandem's private per-user directory, where its sockets live.

The directory is ``$TANDEM_RUNTIME_DIR`` if set, else ``$XDG_RUNTIME_DIR/tandem``
(when that variable names a directory of ours), else ``/tmp/tandem-<uid>``. It
is created with mode 0700 and refused if another user owns it, if it is a
symbolic link, or if others may enter it: whoever could write there could
replace our sockets with their own.

It holds the control sockets of running servers (``control-<port>.sock``) and
one folder per running backend (``run-<pid>-<random>``) for its replicas'
sockets. A run's folder holds a lock file its owner keeps locked while it
lives; :func:`open_run_dir` removes the folders whose lock is free, so a
driver killed by SIGKILL leaves nothing behind once the next one starts.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

ENV_VAR = "TANDEM_RUNTIME_DIR"
_LOCK = "owner.lock"


class UnsafeDirectoryError(RuntimeError):
    """The per-user directory exists but is not safe to use."""


def user_dir() -> Path:
    """The per-user directory (created if needed), checked to be private."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return _private_dir(Path(explicit))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and _owned_by_us(Path(xdg)):
        return _private_dir(Path(xdg) / "tandem")
    return _private_dir(Path(tempfile.gettempdir()) / f"tandem-{os.getuid()}")


def control_socket_path(port: int) -> Path:
    """Where the control socket of the server whose HTTP port is ``port`` lives."""
    return user_dir() / f"control-{port}.sock"


def _owned_by_us(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _private_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectoryError(
            f"{path} is not a directory (a symbolic link?); tandem keeps its sockets there. "
            f"Remove it, or set {ENV_VAR} to a directory of your own."
        )
    if info.st_uid != os.getuid():
        raise UnsafeDirectoryError(
            f"{path} belongs to user id {info.st_uid}, not to you; tandem keeps its sockets "
            f"there. Remove it, or set {ENV_VAR} to a directory of your own."
        )
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours, just too open (e.g. made by hand): close it
    return path


class RunDir:
    """A folder of the per-user directory that lives as long as this object.

    :meth:`close` removes it; if the process dies first, the next
    :func:`open_run_dir` does.
    """

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def open_run_dir() -> RunDir:
    """A new private folder for one run's sockets; removes those of dead runs first."""
    base = user_dir()
    remove_dead_runs(base)
    name = f"{os.getpid()}-{secrets.token_hex(4)}"
    # Made under another name and renamed once locked, so no one ever sees a
    # run folder whose lock is free while its owner lives.
    making = base / f"new-{name}"
    making.mkdir(mode=0o700)
    fd = os.open(making / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    path = base / f"run-{name}"
    making.rename(path)
    return RunDir(path, fd)


def remove_dead_runs(base: Path) -> None:
    """Remove the run folders in ``base`` whose owner is gone (their lock is free)."""
    for folder in base.glob("run-*"):
        try:
            fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner lives
        finally:
            os.close(fd)  # also releases the lock if we took it
        shutil.rmtree(folder, ignore_errors=True)
