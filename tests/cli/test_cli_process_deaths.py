"""Ctrl-C during start-up, a killed env worker or rank, a bad override under --nproc: one line, never a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import mettle_in_process, wait_until
from test_cli_robustness import CARTPOLE, LONG, finish, one_error_line, start, wait_for_epoch

from mettle.rl.policy_files import list_checkpoints
from mettle.rl.training.checkpointer import read_checkpoint


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in task.read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    """Children, grandchildren and so on."""
    direct = children(pid)
    return direct + [d for child in direct for d in descendants(child)]


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def rank_of(pid: int) -> int:
    """The RANK torchrun gave a rank process."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(item for item in environ if item.startswith(b"RANK=")).split(b"=", 1)[1])


def assert_intact_checkpoint(run_dir: Path) -> None:
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert checkpoints, "the run had checkpointed before the death"
    read_checkpoint(checkpoints[-1])


def catches_sigint(pid: int) -> bool:
    """Whether the process has a handler for SIGINT (its SigCgt mask in /proc): mettle's start-up guard is in."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) & (1 << (signal.SIGINT - 1)))


@pytest.mark.parametrize("delay_s", [0.3, 1.0])
def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path: Path, delay_s: float) -> None:
    """While `import torch` and the other imports run, before train's own handlers are installed.

    The delay counts from the guard's installation: a SIGINT that lands before the interpreter has run
    `mettle/__main__.py`'s first lines (possible on a loaded machine) meets Python's default, which no program
    can change."""
    proc = start(tmp_path, *LONG)
    assert wait_until(lambda: catches_sigint(proc.pid), 60), "mettle never installed its start-up guard"
    time.sleep(delay_s)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "SIGINT" in err and len(err.strip().splitlines()) <= 2, err
    assert "epoch 1 " not in out


@pytest.mark.parametrize("overlap", ["overlap=true", "overlap=false"])
def test_a_killed_env_worker_is_one_line_naming_it_with_the_resume_command(tmp_path: Path, overlap: str) -> None:
    """Seen by the trainer itself, or by the overlap actor (which hands the worker's death on as its cause)."""
    proc = start(tmp_path, *LONG, "env.vectorization=multiprocess", "env.num_workers=2", "checkpoint_interval=1",
                 overlap)
    wait_for_epoch(proc, 2)
    workers = sorted((p for p in children(proc.pid) if comm(p).startswith("mettle-env")), key=comm)
    assert [comm(p) for p in workers] == ["mettle-env-0", "mettle-env-1"]
    everyone = descendants(proc.pid)
    os.kill(workers[1], signal.SIGKILL)
    _out, err = finish(proc)
    assert proc.returncode == 1, err
    line = one_error_line(err)
    assert line.startswith(f"mettle: error: environment worker 1 (pid {workers[1]}) was killed by signal SIGKILL")
    assert "resume with: " in line and "--run r" in line and "is intact" in line, line
    assert len(err.strip().splitlines()) == 1, err
    assert_intact_checkpoint(tmp_path / "r")
    assert wait_until(lambda: not any(alive(pid) for pid in everyone), 10), [comm(p) for p in everyone if alive(p)]


@pytest.mark.parametrize("override", ["batch_size=abc", "nosuchkey=1"])
def test_bad_input_under_nproc_is_one_line_and_exit_2_before_torchrun(tmp_path: Path, override: str) -> None:
    """The launcher checks the command line before torchrun starts (so this process can run it: nothing is launched)."""
    result = mettle_in_process("train", "--nproc", "2", "--run", "r", "--run-dir", str(tmp_path), *CARTPOLE, override,
                         cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    one_error_line(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "launching" not in result.stdout and not (tmp_path / "r").exists()


def test_normalisation_on_mettagrid_under_nproc_is_refused_before_torchrun(tmp_path: Path) -> None:
    result = mettle_in_process("train", "--nproc", "2", "--run", "r", "--run-dir", str(tmp_path), "--env",
                               "mettagrid:arena", "env.normalize_rewards=true", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert one_error_line(result.stderr).startswith("mettle: error: env.normalize_rewards=true: observation and reward "
                                                    "normalisation are for Gymnasium and PettingZoo feature envs")
    assert "launching" not in result.stdout and not (tmp_path / "r").exists()


def test_a_batch_only_a_rank_can_check_is_one_line_from_rank_zero_and_exit_2(tmp_path: Path) -> None:
    """A batch that does not fit the env's rows is known only once a rank builds it: rank 0 says it, once."""
    result = subprocess.run([sys.executable, "-m", "mettle", "train", "--nproc", "2", "--run", "r", "--run-dir",
                             str(tmp_path), *CARTPOLE, "batch_size=1000"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    one_error_line(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "OMP_NUM_THREADS" not in result.stderr and "torch/distributed" not in result.stderr


def test_a_killed_rank_is_one_line_from_the_launcher_and_every_rank_ends(tmp_path: Path) -> None:
    proc = start(tmp_path, "--nproc", "2", *LONG, "checkpoint_interval=1")
    wait_for_epoch(proc, 2)
    [torchrun] = children(proc.pid)
    ranks = {rank_of(pid): pid for pid in children(torchrun)}
    assert sorted(ranks) == [0, 1]
    everyone = descendants(proc.pid)
    os.kill(ranks[1], signal.SIGKILL)
    out, err = finish(proc, timeout=90)
    assert proc.returncode == 1, err
    line = one_error_line(err)
    assert line.startswith(f"mettle: error: rank 1 (pid {ranks[1]}) was killed by SIGKILL; resume with: "), line
    assert "--run r" in line and "--nproc 2" in line and "is intact" in line, line
    assert len(err.strip().splitlines()) == 1, err  # no gloo error from rank 0, no torchrun log lines
    assert "writing a checkpoint" not in out + err
    assert wait_until(lambda: not any(alive(pid) for pid in everyone), 10), [comm(p) for p in everyone if alive(p)]
    assert_intact_checkpoint(tmp_path / "r")
