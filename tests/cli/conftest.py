"""Fixtures the CLI tests share."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Protocol

import pytest
from cli_helpers import run_in_process


class InProcess(Protocol):
    """`mettle ARGS` in this process from `cwd`, as a finished process."""

    def __call__(self, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture
def mettle_here(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> InProcess:
    """`mettle ARGS` in this pytest process (cli_helpers.run_in_process): for commands refused before training."""

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return run_in_process(args, cwd, capsys, caplog)

    return run
