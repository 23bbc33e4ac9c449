"""Files that readers never see half-written: a temp file in the same directory, fsynced, then renamed."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
