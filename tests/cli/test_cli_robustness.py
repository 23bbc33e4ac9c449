"""`mettle train` never loses a run: one trainer per run, one-line errors, exit codes that say what happened."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import mettle_in_process

from mettle.rl.policy_files import list_checkpoints
from mettle.rl.training.checkpointer import read_checkpoint

CARTPOLE = ["--env", "gym:CartPole-v1", "progress_interval_s=0.01"]
LONG = [*CARTPOLE, "total_timesteps=100000000"]


def start(tmp_path: Path, *args: str, run_dir: Path | None = None, env: dict[str, str] | None = None,
          ) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "mettle", "train", "--run", "r", "--run-dir", str(run_dir or tmp_path), *args]
    return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_for_epoch(proc: subprocess.Popen[str], epoch: int = 1) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(f"epoch {epoch} "):
            return
    raise AssertionError(f"no progress line; stderr: {proc.stderr.read() if proc.stderr else ''}")


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    return out, err


def newest_step(run_dir: Path) -> int:
    state, _ = read_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    return int(state["trainer"]["agent_step"])


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("mettle:")]
    assert len(lines) == 1, err
    return lines[0]


def test_second_trainer_of_a_run_fails_at_once_and_a_killed_holders_lock_is_taken_over(tmp_path: Path) -> None:
    holder = start(tmp_path, *LONG, "checkpoint_interval=1")
    wait_for_epoch(holder)
    run = ("train", "--run", "r", "--run-dir", str(tmp_path))  # the second trainer and the takeover: this process
    second = mettle_in_process(*run, *LONG, cwd=tmp_path)
    assert second.returncode == 2, second.stderr
    line = one_error_line(second.stderr)
    assert line.startswith("mettle: error: run 'r' is already being trained by pid")
    assert f"pid {holder.pid} on host {socket.gethostname()}" in line and str(tmp_path / "r") in line
    assert "epoch" not in second.stdout

    wait_for_epoch(holder, 2)  # epoch 1 is checkpointed before epoch 2 runs
    holder.kill()
    holder.communicate(timeout=30)
    killed_at = newest_step(tmp_path / "r")
    takeover = mettle_in_process(*run, *CARTPOLE, f"total_timesteps={killed_at + 1024}", cwd=tmp_path)
    assert takeover.returncode == 0, takeover.stderr
    assert f"at agent step {killed_at:,}" in takeover.stdout
    assert newest_step(tmp_path / "r") >= killed_at + 1024
    assert not (tmp_path / "r" / ".lock").exists(), "a finished run releases its lock"


def test_the_lock_ends_with_its_holder_even_while_its_env_workers_live_on(tmp_path: Path) -> None:
    """Forked env workers must not keep the run locked after the trainer itself was killed."""
    import psutil

    holder = start(tmp_path, *LONG, "env.vectorization=multiprocess", "env.num_workers=2")
    wait_for_epoch(holder)
    workers = [c for c in psutil.Process(holder.pid).children() if c.name().startswith("mettle-env")]
    assert len(workers) == 2
    for worker in workers:
        worker.suspend()  # stopped workers cannot notice their parent is gone
    try:
        holder.kill()
        holder.wait(timeout=30)  # not communicate(): the stopped workers still hold its output pipes open
        assert all(worker.is_running() for worker in workers)
        # killed before its first checkpoint: the run's files are set aside (--fresh), not trained over
        takeover = mettle_in_process("train", "--run", "r", "--run-dir", str(tmp_path), *CARTPOLE,
                                     "total_timesteps=1024", "--fresh", cwd=tmp_path)
        assert takeover.returncode == 0 and "already being trained" not in takeover.stderr, takeover.stderr
    finally:
        for worker in workers:
            worker.kill()


def test_resume_line_names_a_generated_run_and_drops_fresh(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "mettle", "train", "--fresh", "--run-dir", str(tmp_path), *LONG]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_epoch(proc)
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc)
    assert proc.returncode == 130, err  # a run too long to finish first: the signal always lands mid-training
    [run] = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    line = next(line for line in out.splitlines() if "resume with:" in line)
    assert f"train --run {run} --run-dir {tmp_path}" in line and "--fresh" not in line, line


def test_second_ctrl_c_stops_at_once_with_one_line_and_130(tmp_path: Path) -> None:
    proc = start(tmp_path, *LONG, "checkpoint_interval=1")
    wait_for_epoch(proc, 2)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None and "SIGINT received" in proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _out, err = finish(proc)
    assert proc.returncode == 130, err
    line = one_error_line(err)
    assert "second SIGINT" in line and "resume with:" in line and "--run r" in line
    read_checkpoint(list_checkpoints(tmp_path / "r" / "checkpoints")[-1])


def test_early_sigterm_exits_143_without_a_traceback(tmp_path: Path) -> None:
    proc = start(tmp_path, *LONG)
    deadline = time.monotonic() + 30
    while not catches(proc.pid, signal.SIGTERM):  # the first thing `mettle train` does; start-up goes on
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert "epoch 1 " not in out and "stopped by SIGTERM before training started; resume with:" in out


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler installed for `sig` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.parametrize("nproc", ["0", "-1"])
def test_nproc_below_one_is_refused(tmp_path: Path, nproc: str) -> None:
    result = mettle_in_process("train", "--nproc", nproc, "--run-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (f"mettle: error: --nproc {nproc} must be at least 1 "
                                             "(the number of ranks on this machine)")


def test_failed_restore_leaves_config_json_unchanged(tmp_path: Path) -> None:
    """In this process: how a failed restore treats the run's files is tested, not a process."""
    run = ("train", "--run", "r", "--run-dir", str(tmp_path), *CARTPOLE)
    first = mettle_in_process(*run, "total_timesteps=1024", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "r" / "config.json").read_bytes()
    for checkpoint in list_checkpoints(tmp_path / "r" / "checkpoints"):
        (checkpoint / "trainer_state.pt").write_bytes(b"damaged")
    again = mettle_in_process(*run, "total_timesteps=2048", cwd=tmp_path)
    assert again.returncode == 2 and "no usable checkpoint" in one_error_line(again.stderr)
    assert (tmp_path / "r" / "config.json").read_bytes() == before


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("needs a tmpfs mount (root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> None:
    """Take every free byte of the file system that holds `directory`."""
    with open(directory / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 16))
                handle.flush()
        except OSError:
            pass


def test_disk_full_mid_run_is_one_line_exit_74_and_the_last_checkpoint_stays(tmp_path: Path,
                                                                              small_disk: Path) -> None:
    proc = start(tmp_path, *LONG, "checkpoint_interval=1", "stats.tensorboard=false", run_dir=small_disk)
    wait_for_epoch(proc, 2)
    fill(small_disk)
    _out, err = finish(proc)
    assert proc.returncode == 74, err
    line = one_error_line(err)
    assert "No space left on device" in line and "resume with:" in line and "is intact" in line
    checkpoints = list_checkpoints(small_disk / "r" / "checkpoints")
    assert checkpoints and not list((small_disk / "r" / "checkpoints").glob(".staging*"))
    read_checkpoint(checkpoints[-1])


def test_disk_full_at_start_is_one_line_exit_74(tmp_path: Path, small_disk: Path) -> None:
    fill(small_disk)
    result = mettle_in_process("train", "--run", "r", "--run-dir", str(small_disk), *CARTPOLE, "total_timesteps=1024",
                               cwd=tmp_path)  # in this process: refused before anything runs
    assert result.returncode == 74, result.stderr
    assert "No space left on device" in one_error_line(result.stderr)


def test_nproc_launcher_relays_sigterm_to_checkpointing_ranks_and_exits_143(tmp_path: Path) -> None:
    proc = start(tmp_path, "--nproc", "2", *LONG, "checkpoint_interval=1000")
    wait_for_epoch(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc, timeout=90)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    python = Path(sys.executable).name
    assert f"resume with: {python} -m mettle train --run r --run-dir {tmp_path} --nproc 2" in out, err
    assert err.strip().splitlines()[-1].startswith("mettle: stopped by SIGTERM after the ranks' checkpoint")
    assert newest_step(tmp_path / "r") > 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["env"]["name"] == "gym:CartPole-v1"
