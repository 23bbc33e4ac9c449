"""One trainer per run directory: an flock'd lock file that records who holds it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from mettle.config import ConfigError
from mettle.files import NotRegularFileError, open_regular_fd

LOCK_NAME = ".lock"
_HELD: set[int] = set()
"""File descriptors of the locks this process holds."""


def _drop_held_in_child() -> None:
    """A forked child (an env worker) closes its copies, so the lock ends with its holder, not with the workers."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_held_in_child)


class RunLocked(ConfigError):
    """Another live process is training this run."""


class RunLock:
    """Exclusive hold on a run directory; the kernel drops it when the holder dies (SIGKILL included).

    The lock file is unlinked on release, and the run directory too when the lock made it and it is still
    empty (a run that failed validation leaves nothing behind).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self, run_name: str) -> None:
        """Take the lock or raise RunLocked naming the holder's pid and host."""
        self._made_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            fd = open_lock_file(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(fd)
                os.close(fd)
                self._remove_made_dir()
                raise RunLocked(
                    f"run {run_name!r} is already being trained by pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')} (lock {self.path}); wait for it to finish, stop it, or choose "
                    "another --run name"
                ) from None
            if same_file(fd, self.path):
                self._fd = fd
                _HELD.add(fd)
            else:  # a releasing holder unlinked this file after we opened it: lock the new one instead
                os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname()}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        """Unlink the lock file while still holding it, then let go; safe to call twice."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        _HELD.discard(self._fd)
        os.close(self._fd)
        self._fd = None
        self._remove_made_dir()

    def _remove_made_dir(self) -> None:
        if self._made_dir:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                self.run_dir.rmdir()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_lock_file(path: Path) -> int:
    """Open (or create) the lock without following a link, and only if it is a regular file: never write elsewhere."""
    refuse = (f"lock {path} is not a regular file (a symbolic link or something else was put there); "
              "remove it and retry")
    try:
        return open_regular_fd(path, os.O_RDWR | os.O_CREAT)
    except NotRegularFileError:
        raise ConfigError(refuse) from None


def read_holder(fd: int) -> dict[str, Any]:
    """The pid and host a lock file records (empty while the holder is still writing them)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
