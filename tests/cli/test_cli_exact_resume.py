"""The issue's repro: a `mettle train` run killed with SIGKILL and rerun ends exactly like one never killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mettle.rl.policy_files import list_checkpoints

TIMING_KEYS = ("time", "performance/steps_per_second")
"""What differs between two runs of the same training: wall-clock figures."""


def train_args(run: str, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mettle", "train", "--run", run, "--run-dir", str(run_dir), *extra,
            "checkpoint_interval=3", "progress_interval_s=0.01"]


def run_to_end(run: str, run_dir: Path, *extra: str) -> None:
    done = subprocess.run(train_args(run, run_dir, *extra), cwd=run_dir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def logged_epochs(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line)["epoch"] for line in lines if line.endswith("\n")]


def kill_after_logging(run: str, run_dir: Path, epoch: int, *extra: str) -> None:
    """SIGKILL the run once epoch `epoch` is logged, so it dies with epochs logged after its last checkpoint."""
    proc = subprocess.Popen(train_args(run, run_dir, *extra), cwd=run_dir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while epoch not in logged_epochs(run_dir / run):
        assert proc.poll() is None, f"run ended before epoch {epoch}: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    newest = int(list_checkpoints(run_dir / run / "checkpoints")[-1].name)
    assert newest < max(logged_epochs(run_dir / run)), "some logged epochs were not checkpointed"


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("timing/")} for r in records]


def tensorboard_returns(run_dir: Path) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("environment/episode_return")]


# Six or eight epochs, checkpoints every third: killed once epoch 4 is logged, a run has checkpoint 3 and an epoch
# after it (two epochs short of the next checkpoint), and its rerun trains from 3 to the end.
@pytest.mark.parametrize("env", [
    ["--env", "gym:CartPole-v1", "total_timesteps=4096"],
    ["--env", "pettingzoo:mpe2.simple_spread_v3:parallel_env", "env.num_envs=4", "env.vectorization=multiprocess",
     "env.num_workers=2", "batch_size=768", "minibatch_size=384", "bptt_horizon=16", "total_timesteps=4608"],
    ["--env", "gym:mettle.envs.testing:mettle/DictTarget-v0", "env.num_envs=8", "batch_size=512", "minibatch_size=128",
     "bptt_horizon=16", "total_timesteps=4096"],
    # Box actions: the replay log keeps the Gaussian's float32 draws; 200-step episodes span every checkpoint
    # (the continuous-control recipe normalises observations and rewards: their statistics resume too)
    ["--env", "gym:Pendulum-v1", "env.num_envs=4", "batch_size=256", "minibatch_size=128", "update_epochs=1",
     "total_timesteps=2048"],
    # both normalisations with the overlapped actor, which acts with the statistics it receives with the weights
    ["--env", "gym:Pendulum-v1", "env.num_envs=4", "batch_size=256", "minibatch_size=128", "update_epochs=1",
     "total_timesteps=2048", "overlap=true", "env.normalize_observations=true", "env.normalize_rewards=true"],
    # agents that differ in spaces: padded, typed observations and masked choices, in worker processes
    ["--env", "pettingzoo:mpe2.simple_speaker_listener_v4:parallel_env", "env.num_envs=8",
     "env.vectorization=multiprocess", "env.num_workers=2", "batch_size=512", "minibatch_size=256", "bptt_horizon=16",
     "total_timesteps=4096"],
    # MuJoCo with the continuous-control recipe's normalisations, 100-step episodes so that several end
    ["--env", "gym:HalfCheetah-v5", "env.kwargs.max_episode_steps=100", "env.num_envs=4", "batch_size=256",
     "minibatch_size=64", "update_epochs=1", "total_timesteps=2048"],
    # one recurrent policy per agent type (policy.share=false), observations normalised: per-type memory resumes
    ["--env", "pettingzoo:mpe2.simple_speaker_listener_v4:parallel_env", "env.num_envs=8", "batch_size=512",
     "minibatch_size=256", "bptt_horizon=16", "total_timesteps=4096", "policy.share=false", "policy.kind=lstm",
     "policy.hidden_size=16", "env.normalize_observations=true"],
], ids=["cartpole", "mpe2-workers", "dict-observations", "pendulum", "pendulum-normalised-overlap",
        "mpe2-heterogeneous-workers", "mujoco-halfcheetah", "mpe2-per-type-lstm-normalised"])
def test_killed_and_rerun_equals_never_killed(tmp_path: Path, env: list[str]) -> None:
    run_to_end("straight", tmp_path, *env)
    kill_after_logging("killed", tmp_path, 4, *env)
    run_to_end("killed", tmp_path, *env)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert (straight / "policy.safetensors").read_bytes() == (killed / "policy.safetensors").read_bytes()
    assert metrics(straight) == metrics(killed)
    assert len(metrics(killed)) == len({r["step"] for r in metrics(killed)}), "every step is logged once"
    assert tensorboard_returns(straight) == tensorboard_returns(killed)
