"""`mettle train ... overlap=true` end to end: a killed actor process ends the run by name, leaving no process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from cli_helpers import wait_until


def start_training(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """`mettle train ARGS` in its own session (so its whole group can be signalled), output in files."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "mettle", "train", *args], cwd=tmp_path, stdout=stdout,
                                   stderr=stderr, start_new_session=True)
    return process, out, err


def gone(process: psutil.Process) -> bool:
    """Ended, or only a zombie waiting to be reaped."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_actor_ends_training_with_an_error_naming_it(tmp_path: Path) -> None:
    args = ["--env", "gym:CartPole-v1", "--run", "ov", "--run-dir", str(tmp_path), "overlap=true",
            "env.vectorization=multiprocess", "env.num_workers=2", "env.num_envs=4", "total_timesteps=100000000",
            "progress_interval_s=0.1"]
    process, out, err = start_training(tmp_path, args)
    try:
        assert wait_until(lambda: "epoch" in out.read_text() or process.poll() is not None, 60), "no epoch in 60 s"
        assert process.poll() is None, err.read_text()
        run = psutil.Process(process.pid).children(recursive=True)
        names = sorted(child.name() for child in run if child.name().startswith("mettle-"))
        assert names == ["mettle-actor", "mettle-env-0", "mettle-env-1"], names  # and multiprocessing's tracker
        actor = next(child for child in run if child.name() == "mettle-actor")
        actor.send_signal(signal.SIGKILL)
        code = process.wait(timeout=60)  # raises if the learner is still running a minute later
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    stderr_text = err.read_text()
    assert code == 1 and "Traceback" not in stderr_text, (code, stderr_text[-2000:])
    command = r"python\S* -m mettle train --run ov .*"
    assert re.fullmatch(rf"mettle: error: actor process \(pid {actor.pid}\) was killed by SIGKILL; (resume with: "
                        rf"{command}; the last checkpoint \S+ is intact|no checkpoint was written yet, so start over "
                        rf"with: {command} --fresh)", stderr_text.strip().splitlines()[-1]), stderr_text
    assert wait_until(lambda: all(gone(child) for child in run), 5), [(p.pid, p.name()) for p in run if not gone(p)]


def test_the_actor_exits_when_the_learner_is_killed(tmp_path: Path) -> None:
    args = ["--env", "gym:CartPole-v1", "--run", "ov", "--run-dir", str(tmp_path), "overlap=true",
            "total_timesteps=100000000", "progress_interval_s=0.1"]
    process, out, _ = start_training(tmp_path, args)
    try:
        assert wait_until(lambda: "epoch" in out.read_text() or process.poll() is not None, 60), "no epoch in 60 s"
        actors = [child for child in psutil.Process(process.pid).children() if child.name() == "mettle-actor"]
        assert len(actors) == 1
        process.kill()
        process.wait()
        assert wait_until(lambda: gone(actors[0]), 10), "the actor outlived its learner"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_sigterm_to_the_process_group_checkpoints_with_the_actor_alive(tmp_path: Path) -> None:
    """torchrun and shells signal the whole group: the actor ignores it, so the checkpoint gets its rollout."""
    args = ["--env", "gym:CartPole-v1", "--run", "ov", "--run-dir", str(tmp_path), "overlap=true",
            "total_timesteps=100000000", "progress_interval_s=0.1"]
    process, out, err = start_training(tmp_path, args)
    try:
        assert wait_until(lambda: "epoch" in out.read_text() or process.poll() is not None, 60), "no epoch in 60 s"
        run = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert code == 128 + signal.SIGTERM, err.read_text()[-2000:]
    assert "resume with:" in out.read_text()
    assert list((tmp_path / "ov" / "checkpoints").iterdir())
    assert wait_until(lambda: all(gone(child) for child in run), 5), [(p.pid, p.name()) for p in run if not gone(p)]
