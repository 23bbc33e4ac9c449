"""What the CLI tests share: run `python -m mettle` to completion, and poll for a condition."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def run_mettle(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m mettle ARGS` in `cwd`, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "mettle", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` until it holds or the time is up; whether it held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def read_only_command(directory: Path, command: list[str]) -> list[str]:
    """`command` run where `directory` is a read-only bind mount (a private mount namespace, gone with the command).

    chmod cannot make a directory read-only for root, which CI runs as; a read-only mount can.
    """
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    namespace = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--mount", "--map-root-user"]
    return [*namespace, "sh", "-c", script, "sh", str(directory), *command]
