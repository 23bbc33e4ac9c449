"""What the CLI tests share: run `python -m mettle` (or `mettle` in this process), poll for a condition."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from mettle.cli import main

HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
"""What Python's default warning filters keep off a command's stderr."""


def run_mettle(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m mettle ARGS` in `cwd`, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "mettle", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def mettle_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`mettle ARGS` run by this process from `cwd`, as a finished process would report it.

    For runs where a new process is not the point: one costs ~3 s of imports, ~5 s once it builds an optimizer
    (torch.optim imports torch._dynamo). stderr holds what would reach a process's stderr: printed lines and log
    records (`mettle` logs INFO and above there) in order, then the warnings Python's default filters show. The
    signal handlers, torch threads and root log level `mettle train` changes are put back.
    """
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    log = logging.StreamHandler(err)
    log.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(log)
    root.setLevel(logging.INFO)
    try:
        with (contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
              warnings.catch_warnings(record=True) as caught):
            warnings.simplefilter("always")
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        root.removeHandler(log)
        root.setLevel(level)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
    shown = [f"{w.category.__name__}: {w.message}\n" for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)]
    return subprocess.CompletedProcess(["mettle", *args], code, out.getvalue(), err.getvalue() + "".join(shown))


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
