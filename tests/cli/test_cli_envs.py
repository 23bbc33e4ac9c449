"""`mettle train` end to end on other env families and layouts: a dead env worker, a PettingZoo env."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from cli_helpers import run_mettle, wait_until

from mettle.envs.pettingzoo import PettingZooEnvironment, parse_pettingzoo_spec
from mettle.envs.testing import collect_rollout

PZ_SPEC = "mettle.envs.pettingzoo_testing:parallel_env"
PZ_KWARGS: dict[str, Any] = {"num_agents": 3, "episode_length": 20, "exit_steps": [None, None, 10]}
PZ_OPTIMUM = (20 + 20 + 10) / 3
"""Mean agent-episode return of always copying the target: two agents stay 20 steps, one leaves at 10."""


# ------------------------------------------------------------------ process helpers
def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process /proc shows."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children before grandchildren."""
    parents, found, frontier = parent_pids(), [], [pid]
    while frontier:
        children = sorted(child for child, parent in parents.items() if parent in frontier)
        found.extend(children)
        frontier = children
    return found


def comm(pid: int) -> str:
    """A process's short name ('' once it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as name:
            return name.read().strip()
    except OSError:
        return ""


def is_gone(pid: int) -> bool:
    """No such process, or only a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@contextmanager
def started_training(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """`mettle train` in its own session with output in files; killed (with its group) if still running."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "mettle", "train", *args], cwd=tmp_path,
                                   stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        yield process, out, err
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# ------------------------------------------------------------------ a dead env worker
def test_a_killed_env_worker_ends_training_with_an_error_naming_it(tmp_path: Path) -> None:
    args = ("--env", "gym:CartPole-v1", "--run", "mp", "--run-dir", str(tmp_path), "env.vectorization=multiprocess",
            "env.num_workers=2", "env.num_envs=4", "total_timesteps=100000000", "progress_interval_s=0.1")
    with started_training(tmp_path, *args) as (process, out, err):
        assert wait_until(lambda: "epoch" in out.read_text() or process.poll() is not None, 60), "no epoch in 60 s"
        assert process.poll() is None, err.read_text()
        run = descendants(process.pid)
        workers = sorted((comm(pid), pid) for pid in run if comm(pid).startswith("mettle-env-"))
        assert [name for name, _ in workers] == ["mettle-env-0", "mettle-env-1"], (workers, run)
        victim = workers[1][1]
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        code = process.wait(timeout=30)
        elapsed = time.monotonic() - start
    stderr = err.read_text()
    assert code != 0 and elapsed < 30, (code, elapsed)
    assert re.search(rf"environment worker 1 \(pid {victim}\) was killed by signal SIGKILL", stderr), stderr[-2000:]
    assert wait_until(lambda: all(is_gone(pid) for pid in run), 5), [(pid, comm(pid)) for pid in run]


# ------------------------------------------------------------------ PettingZoo
def random_agent_returns() -> list[float]:
    """Returns of a uniformly random policy, one per agent-episode, on the env the CLI test trains."""
    with PettingZooEnvironment(parse_pettingzoo_spec(PZ_SPEC), num_envs=4, env_kwargs=PZ_KWARGS) as env:
        rollout = collect_rollout(env, 300, seed=3)
    infos = [info for batch in rollout.infos for info in batch]
    assert all({"episode_return", "episode_length", "env_id", "agent_id"} <= set(info) for info in infos)
    assert all(0 <= info["episode_return"] <= info["episode_length"] <= 20 for info in infos)
    assert all(info["episode_length"] <= 10 for info in infos if info["agent_id"] == 2), "agent 2 leaves at 10"
    return [float(info["episode_return"]) for info in infos]


def test_pettingzoo_env_trains_from_the_cli_and_beats_random(tmp_path: Path) -> None:
    kwargs = [f"env.kwargs.{key}={json.dumps(value)}" for key, value in PZ_KWARGS.items()]
    result = run_mettle("train", "--env", f"pettingzoo:{PZ_SPEC}", "--run", "pz", "--run-dir", str(tmp_path),
                        "env.num_envs=8", "total_timesteps=12288", "batch_size=768", "minibatch_size=192",
                        "bptt_horizon=8", "update_epochs=4", "optimizer.learning_rate=0.003", "seed=1",
                        "progress_interval_s=0.1", *kwargs, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "pz" / "config.json").read_text())
    assert config["env"]["kwargs"] == PZ_KWARGS
    progress = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert progress and all("return" in line and "length" in line for line in progress)

    evaluation = run_mettle("eval", str(tmp_path / "pz"), "--episodes", "30", "--json", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    summary = json.loads(evaluation.stdout.strip().splitlines()[-1])
    random_mean = float(np.mean(random_agent_returns()))
    assert summary["episodes"] == 30
    assert random_mean < 3.0, random_mean
    assert summary["mean_return"] >= max(3 * random_mean, 0.8 * PZ_OPTIMUM), (summary, random_mean)
    assert 0 < summary["mean_return"] <= summary["mean_length"], "one point per correct step of an agent's own"
