"""`mettle train --run` resumes, refuses what cannot resume, and survives signals and kills."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import mettle_in_process

from mettle.rl.policy_files import list_checkpoints
from mettle.rl.training.checkpointer import read_checkpoint

FAST = ["--env", "gym:CartPole-v1", "total_timesteps=4096", "progress_interval_s=0.01", "checkpoint_interval=1"]


def newest_step(run_dir: Path) -> int:
    state, _ = read_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    return int(state["trainer"]["agent_step"])


def test_resume_applies_compatible_overrides_and_refuses_the_rest(tmp_path: Path) -> None:
    """In this process: what is tested is how `mettle train` reads a run, not a process (the signal and SIGKILL
    tests below start real ones)."""
    first = mettle_in_process("train", "--run", "r", "--run-dir", str(tmp_path), *FAST, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert newest_step(tmp_path / "r") == 4096

    more = mettle_in_process("train", "--run", "r", "--run-dir", str(tmp_path), "total_timesteps=6144", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert "resuming run r from" in more.stdout and "at agent step 4,096" in more.stdout
    assert newest_step(tmp_path / "r") == 6144
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["trainer"]["total_timesteps"] == 6144 and saved["checkpoint_interval"] == 1

    run = ("train", "--run", "r", "--run-dir", str(tmp_path))
    other_env = mettle_in_process(*run, "--env", "gym:Acrobot-v1", cwd=tmp_path)
    assert other_env.returncode == 2
    assert "cannot resume: env.name was 'gym:CartPole-v1'" in other_env.stderr
    other_policy = mettle_in_process(*run, "--policy", "lstm", cwd=tmp_path)
    assert other_policy.returncode == 2 and "cannot resume: policy" in other_policy.stderr

    fresh = mettle_in_process(*run, "--fresh", cwd=tmp_path)
    assert fresh.returncode == 2 and "--fresh refuses to resume" in fresh.stderr
    assert all(len(result.stderr.splitlines()) == 1 for result in (other_env, other_policy, fresh))
    assert newest_step(tmp_path / "r") == 6144, "refusals change nothing"

    evaluated = mettle_in_process("eval", str(list_checkpoints(tmp_path / "r" / "checkpoints")[-1]), "--episodes",
                                  "2", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.splitlines()[-1])["episodes"] == 2


def start_training(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    args = ["train", "--env", "gym:CartPole-v1", "--run", "s", "--run-dir", str(tmp_path),
            "progress_interval_s=0.01", *extra]
    return subprocess.Popen([sys.executable, "-m", "mettle", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_progress(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch"):
            return
    raise AssertionError(f"no progress line; stderr: {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_the_last_step_and_exits_128_plus_n(tmp_path: Path, sig: signal.Signals) -> None:
    proc = start_training(tmp_path, "total_timesteps=10000000", "checkpoint_interval=1000")
    wait_for_progress(proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    stopped = [line for line in out.splitlines() if line.startswith("stopped at agent step")]
    expected = (f"resume with: {Path(sys.executable).name} -m mettle train --run s --env gym:CartPole-v1 --run-dir "
                f"{tmp_path} progress_interval_s=0.01 total_timesteps=10000000 checkpoint_interval=1000")
    assert stopped and stopped[0].endswith(expected), out  # the command as it was run
    final_step = int(stopped[0].split("agent step ")[1].split(";")[0].replace(",", ""))
    assert newest_step(tmp_path / "s") == final_step > 0
    assert f"{sig.name} received" in err


def start_over_flag(run: Path) -> list[str]:
    """`--fresh` when a kill landed after the run wrote its records but before its first checkpoint: the CLI
    refuses to train over them without it (and says so), as its stop hint tells the user."""
    return ["--fresh"] if (run / "config.json").exists() and not list_checkpoints(run / "checkpoints") else []


def kill_resume_cycles(tmp_path: Path, kills: int, seed: int) -> None:
    """SIGKILL `mettle train` at random moments, resume each time, and check nothing is ever lost."""
    rng = random.Random(seed)
    total = 24 * 1024
    extra = (f"total_timesteps={total}", "checkpoint_interval=1")
    last_step = 0
    for _ in range(kills):
        proc = start_training(tmp_path, *extra, *start_over_flag(tmp_path / "s"))
        time.sleep(rng.uniform(1.5, 4.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        checkpoints = list_checkpoints(tmp_path / "s" / "checkpoints")
        for path in checkpoints:
            read_checkpoint(path)  # every listed checkpoint is complete and verifies
        step = newest_step(tmp_path / "s") if checkpoints else 0
        assert step >= last_step, "agent_step went backwards"
        last_step = step
    proc = start_training(tmp_path, *extra, *start_over_flag(tmp_path / "s"))
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert newest_step(tmp_path / "s") >= total


def test_survives_a_few_sigkills(tmp_path: Path) -> None:
    kill_resume_cycles(tmp_path, kills=3, seed=0)


@pytest.mark.slow
def test_survives_twenty_sigkills(tmp_path: Path) -> None:
    kill_resume_cycles(tmp_path, kills=20, seed=1)
