"""`mettle train` end to end on other env families: a PettingZoo env trains from the CLI and beats random; a
Gymnasium env with Discrete observations trains on their one-hot features.

A killed env worker is test_cli_process_deaths.py's (with and without overlap)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from cli_helpers import mettle_in_process, run_mettle

from mettle.envs.pettingzoo import PettingZooEnvironment, parse_pettingzoo_spec
from mettle.envs.testing import collect_rollout
from mettle.rl.policy_files import list_checkpoints, load_policy

PZ_SPEC = "mettle.envs.pettingzoo_testing:parallel_env"
PZ_KWARGS: dict[str, Any] = {"num_agents": 3, "episode_length": 20, "exit_steps": [None, None, 10]}
PZ_OPTIMUM = (20 + 20 + 10) / 3
"""Mean agent-episode return of always copying the target: two agents stay 20 steps, one leaves at 10."""


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

    evaluation = mettle_in_process("eval", str(tmp_path / "pz"), "--episodes", "30", "--json", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    summary = json.loads(evaluation.stdout.strip().splitlines()[-1])
    random_mean = float(np.mean(random_agent_returns()))
    assert summary["episodes"] == 30
    assert random_mean < 3.0, random_mean
    assert summary["mean_return"] >= max(3 * random_mean, 0.8 * PZ_OPTIMUM), (summary, random_mean)
    assert 0 < summary["mean_return"] <= summary["mean_length"], "one point per correct step of an agent's own"


def test_frozen_lake_trains_on_one_hot_cells(tmp_path: Path) -> None:
    """FrozenLake's Discrete(16) cell reaches the policy as 16 features with a single 1: saved, checkpointed, seen."""
    result = mettle_in_process("train", "--env", "gym:FrozenLake-v1", "--run", "lake", "--run-dir", str(tmp_path),
                               "total_timesteps=2048", "batch_size=512", "minibatch_size=128", "bptt_horizon=16",
                               "env.num_envs=8", "checkpoint_interval=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "done epoch 4" in result.stdout
    _, info = load_policy(tmp_path / "lake")
    assert info.observation_space == gym.spaces.Box(0.0, 1.0, (16,), dtype=np.float32)
    state = torch.load(list_checkpoints(tmp_path / "lake" / "checkpoints")[-1] / "trainer_state.pt",
                       weights_only=True)
    loop = state["ranks"][0]["core_loop"]
    for seen in (loop["env"]["arrays"]["observations"], *(held["observations"] for held in loop["pending"])):
        assert seen.shape == (8, 16) and set(seen.unique().tolist()) == {0.0, 1.0}
        assert (seen.sum(dim=1) == 1).all(), "one cell lit per row"
