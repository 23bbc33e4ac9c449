"""`mettle train` on Box actions: Pendulum trains with MLP and LSTM Gaussian heads; what cannot serve one says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pytest
import torch
from cli_helpers import mettle_in_process
from gymnasium.envs.classic_control.pendulum import PendulumEnv

from mettle.rl.policy_files import list_checkpoints

RECORDED_ID = "mettle-test/RecordedPendulum-v1"
SMALL = ["env.num_envs=4", "batch_size=512", "minibatch_size=128", "update_epochs=2", "progress_interval_s=0.01"]
"""A few quick epochs instead of the recipe's 2048-step rollouts."""


class RecordedActions(gym.ActionWrapper):
    """Keeps every action the simulator was given, in this process (the serial env steps here)."""

    seen: ClassVar[list[np.ndarray]] = []

    def action(self, action: np.ndarray) -> np.ndarray:
        """Record and pass on."""
        RecordedActions.seen.append(np.array(action, copy=True))
        return action


def recorded_pendulum(**kwargs: Any) -> gym.Env:
    """Pendulum whose simulator's actions are kept."""
    return RecordedActions(PendulumEnv(**kwargs))


if RECORDED_ID not in gym.registry:
    gym.register(id=RECORDED_ID, entry_point=recorded_pendulum, max_episode_steps=200)


def logged_actions(checkpoint: Path) -> np.ndarray:
    """The actions sent since each episode began, from the checkpoint's replay log: as the policy drew them."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    log = state["ranks"][0]["core_loop"]["env"]["log"]
    return np.concatenate([actions.numpy().reshape(-1) for actions in log["actions"]])


@pytest.mark.parametrize("policy", ["mlp", "lstm"])
def test_pendulum_trains_sending_clipped_actions_and_logging_the_drawn_ones(tmp_path: Path, policy: str) -> None:
    RecordedActions.seen = []
    result = mettle_in_process("train", "--env", f"gym:{RECORDED_ID}", "--policy", policy, "--run", "r",
                               "--run-dir", str(tmp_path), *SMALL, "total_timesteps=2048",
                               "policy.log_std_init=1", cwd=tmp_path)  # std e: many draws beyond the bounds of 2
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["trainer"]["update_epochs"] == 2 and config["trainer"]["ppo"]["clip_value_loss"] is False, \
        "the continuous-control recipe applies under the overrides"
    assert "steps 2,048/2,048" in result.stdout
    given = np.concatenate([a.reshape(-1) for a in RecordedActions.seen])
    assert len(given) > 1500 and given.dtype == np.float32
    assert given.min() >= -2.0 and given.max() <= 2.0, "the simulator only ever got actions within its bounds"
    drawn = logged_actions(list_checkpoints(tmp_path / "r" / "checkpoints")[-1])
    assert drawn.dtype == np.float32 and np.abs(drawn).max() > 2.0, "the policy's draws are kept unclipped"

    evaluation = mettle_in_process("eval", str(tmp_path / "r"), "--episodes", "2", "--json", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    summary = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert summary["actions"] == "greedy" and summary["mean_length"] == 200.0


@pytest.mark.parametrize("extra,message", [
    (["--policy", "token"], "mettle: error: TokenPolicy acts with categorical heads, and the action space is Box("),
    (["--policy", "lstm", "gradient=analytic"], "mettle: error: gradient=analytic cannot be used: it is written for "
                                                "MLPPolicy, and the policy is LSTMPolicy"),
    (["losses.kickstarter.enabled=true", "losses.kickstarter.teacher=runs/teacher"],
     "mettle: error: losses.kickstarter: this environment's actions are Box(1,) (a Gaussian head)"),
], ids=["token", "analytic", "kickstarter"])
def test_what_cannot_serve_a_gaussian_head_stops_before_training_in_one_line(
    tmp_path: Path, extra: list[str], message: str,
) -> None:
    result = mettle_in_process("train", "--env", "gym:Pendulum-v1", "--run", "bad", "--run-dir", str(tmp_path),
                               *SMALL, *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mettle: error")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr
