"""Files on disk both ways: written so readers never see one half-written (a temp file in the same directory,
fsynced, then renamed), and read only when they are regular files (a FIFO or device may block or never end).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

FILE_KINDS = {stat.S_IFLNK: "symlink", stat.S_IFIFO: "FIFO", stat.S_IFDIR: "directory", stat.S_IFSOCK: "socket",
              stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}
REFUSED_OPEN = {errno.ELOOP: "symlink", errno.ENXIO: "FIFO", errno.EISDIR: "directory"}
"""What `os.open` met when it fails this way under O_NOFOLLOW | O_NONBLOCK: the path was swapped after lstat."""


class NotRegularFileError(OSError):
    """A path that must name a regular file names a symlink, FIFO, device, directory or socket instead."""

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(f"{path} is a {kind}, not a regular file")
        self.path, self.kind = path, kind


class FileTooLargeError(OSError):
    """A file is larger than what its reader bounds it to (a size on disk is data too)."""

    def __init__(self, path: Path, size: int, limit: int) -> None:
        super().__init__(f"{path} is {size:,} bytes, more than the {limit:,} such a file may have")
        self.path, self.size, self.limit = path, size, limit


def atomic_write(path: Path, write: Callable[[BinaryIO], object], durable: bool = True) -> None:
    """Write via a temp file in the same directory, then rename: readers see the old file or the new one.

    `durable` also fsyncs the file and the directory, so the new file survives a power cut; files rewritten
    every epoch for live readers (a heartbeat) skip that cost.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    # created exclusively (O_EXCL never follows a link): a link planted at the temp name is refused, not written
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_plain_name(name: str) -> bool:
    """One path component: no separator, not '.' or '..', not empty, no NUL (a name read or typed stays inside)."""
    separators = ("/", "\0", *((os.altsep,) if os.altsep else ()))
    return name not in ("", ".", "..") and not any(sep in name for sep in separators)


def file_kind(mode: int) -> str:
    """A file type of `st_mode` in words ("regular file", "symlink", "FIFO", ...)."""
    kind = stat.S_IFMT(mode)
    return "regular file" if kind == stat.S_IFREG else FILE_KINDS.get(kind, "special file")


def open_regular_fd(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644, follow_symlinks: bool = False) -> int:
    """A descriptor of `path` only if it is a regular file: a FIFO or device may block, a link may point anywhere.

    The type is read first (so such a file is never opened), then checked again on the open descriptor in case
    the path was swapped meanwhile; a refusal is NotRegularFileError. Symlinks are refused unless
    `follow_symlinks`. With O_CREAT in `flags` a missing file is created; other failures (missing, permissions)
    are the OSError `os.open` raised.
    """
    try:
        kind = file_kind((os.stat if follow_symlinks else os.lstat)(path).st_mode)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
        kind = "regular file"  # about to be created; the fstat below checks what was opened
    if kind != "regular file":
        raise NotRegularFileError(path, kind)
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    try:
        descriptor = os.open(path, flags | nofollow | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as error:
        if error.errno in REFUSED_OPEN:
            raise NotRegularFileError(path, REFUSED_OPEN[error.errno]) from None
        raise
    kind = file_kind(os.fstat(descriptor).st_mode)
    if kind != "regular file":
        os.close(descriptor)
        raise NotRegularFileError(path, kind)
    return descriptor


def open_regular(path: Path, follow_symlinks: bool = False) -> BinaryIO:
    """`path` opened to read in binary, only when it is a regular file (see `open_regular_fd`)."""
    return os.fdopen(open_regular_fd(path, follow_symlinks=follow_symlinks), "rb")


def read_limited(path: Path, limit: int, follow_symlinks: bool = False) -> bytes:
    """A regular file's bytes, refused unread (FileTooLargeError) when it is larger than `limit`."""
    with open_regular(path, follow_symlinks) as handle:
        size = os.fstat(handle.fileno()).st_size
        data = handle.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise FileTooLargeError(path, max(size, len(data)), limit)
    return data
