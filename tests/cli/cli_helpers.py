"""What the CLI tests share: run `python -m mettle` (or `mettle` in this process), poll for a condition."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from mettle.cli import main

HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
"""What Python's default warning filters keep off a command's stderr."""


def run_mettle(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m mettle ARGS` in `cwd`, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "mettle", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def run_in_process(args: Sequence[str], cwd: Path, capsys: pytest.CaptureFixture[str],
                   caplog: pytest.LogCaptureFixture) -> subprocess.CompletedProcess[str]:
    """`mettle ARGS` in this process from `cwd`, as a finished process: for commands that end before training.

    A new process costs seconds of imports. Its stderr is rebuilt from what would reach it: printed lines, log
    records (`mettle` logs INFO and above to stderr) and warnings the default filters show. The signal handlers
    and torch threads `mettle train` sets are put back.
    """
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    capsys.readouterr()
    caplog.clear()
    try:
        with contextlib.chdir(cwd), caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    logged = [record.getMessage() for record in caplog.records]
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)]
    err += "".join(f"{line}\n" for line in [*logged, *shown])
    return subprocess.CompletedProcess(["mettle", *args], code, out, err)


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
