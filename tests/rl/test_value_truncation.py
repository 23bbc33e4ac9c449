"""The idea of SB3's truncation check, through the real Trainer: a time limit is not the end of the world.

Every episode pays 1 per step and is cut by a time limit after EPISODE_LENGTH steps; the observation never
changes, so the critic cannot know how much time is left and learns one number V. With the final observation
bootstrapping a truncated step, every value target is 1 + gamma V, whose fixed point is 1 / (1 - gamma) = 10.

Had truncation been treated as termination, the last step's target would be 1 and the others 1 + gamma V,
so V = ((L - 1)(1 + gamma V) + 1) / L, i.e. V = 1 / (1 - gamma (L - 1) / L) = 3.57 for L = 5 (one-step
targets; Monte-Carlo targets give mean_k (1 - gamma^k) / (1 - gamma) = 2.63; GAE's lambda = 0.95 lands in
between, near 2.6-3.0). The same environment reporting terminations is trained alongside, so the test shows
that it tells the two apart. Each run takes 1-2 s (30 epochs; the truncated value is 10.0 by epoch ~20).
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium as gym
import numpy as np
import pytest
import torch

from mettle.agent.mlp import MLPPolicy
from mettle.envs.testing import check_environment_contract
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import BatchInfo, EnvBatch, PolicyEnvInfo, TrainingEnvironment

GAMMA = 0.9
EPISODE_LENGTH = 5
TRUNCATION_VALUE = 1 / (1 - GAMMA)
ONE_STEP_TERMINATION_VALUE = 1 / (1 - GAMMA * (EPISODE_LENGTH - 1) / EPISODE_LENGTH)
MONTE_CARLO_TERMINATION_VALUE = np.mean([(1 - GAMMA**k) / (1 - GAMMA) for k in range(1, EPISODE_LENGTH + 1)])

pytestmark = pytest.mark.usefixtures("one_thread")


class ConstantTimeLimitEnvironment(TrainingEnvironment):
    """Rows that see [1.0] forever, earn 1 per step and end after `episode_length` steps (next-step contract)."""

    def __init__(self, num_envs: int, episode_length: int, end: Literal["truncation", "terminal"]) -> None:
        self.episode_length, self.end = episode_length, end
        self._batch_info = BatchInfo(num_envs=num_envs, agents_per_env=1)
        self._info = PolicyEnvInfo(gym.spaces.Box(0.0, 1.0, (1,), np.float32), gym.spaces.Discrete(2), num_agents=1)
        self._observations = np.ones((num_envs, 1), dtype=np.float32)
        self._steps = np.zeros(num_envs, dtype=np.int64)
        self._infos: list[dict[str, Any]] = []
        self._set(rewards=0.0, ended=np.zeros(num_envs, dtype=bool), starts=np.ones(num_envs, dtype=bool))

    @property
    def policy_env_info(self) -> PolicyEnvInfo:
        return self._info

    @property
    def batch_info(self) -> BatchInfo:
        return self._batch_info

    def _set(self, rewards: float | np.ndarray, ended: np.ndarray, starts: np.ndarray) -> None:
        rows = self._batch_info.num_rows
        self._rewards = np.broadcast_to(np.asarray(rewards, dtype=np.float32), (rows,)).copy()
        self._terminals = ended & (self.end == "terminal")
        self._truncations = ended & (self.end == "truncation")
        self._mask, self._starts = ~ended, starts

    def reset(self, seed: int | None = None) -> None:
        rows = self._batch_info.num_rows
        self._steps[:] = 0
        self._infos = []
        self._set(0.0, np.zeros(rows, dtype=bool), np.ones(rows, dtype=bool))

    def get_observations(self) -> EnvBatch:
        infos, self._infos = self._infos, []
        return EnvBatch(slice(0, self._batch_info.num_rows), self._observations, self._rewards, self._terminals,
                        self._truncations, self._mask, self._starts, infos)

    def send_actions(self, actions: np.ndarray, rows: slice | None = None) -> None:
        showing_final = ~self._mask
        live = ~showing_final
        self._steps[live] += 1
        ended = live & (self._steps >= self.episode_length)
        for row in np.flatnonzero(ended):
            self._infos.append({"episode_return": float(self.episode_length), "episode_length": self.episode_length,
                                "env_id": int(row), "agent_id": 0})
        self._steps[showing_final] = 0
        self._set(np.where(live, 1.0, 0.0), ended, showing_final)

    def close(self) -> None:
        pass


def test_the_environment_keeps_the_contract() -> None:
    rollout = check_environment_contract(ConstantTimeLimitEnvironment(3, EPISODE_LENGTH, "truncation"), steps=30)
    assert rollout.truncations.sum() == 3 * 5 and not rollout.terminals.any(), "an episode every 6 receives"
    assert (rollout.observations == 1.0).all()


def learned_value(end: Literal["truncation", "terminal"]) -> float:
    """Train on the environment and return the critic's estimate of its one observation."""
    env = ConstantTimeLimitEnvironment(num_envs=16, episode_length=EPISODE_LENGTH, end=end)
    cfg = TrainerConfig(total_timesteps=30 * 256, batch_size=256, minibatch_size=128, bptt_horizon=16,
                        update_epochs=4, seed=3, optimizer={"learning_rate": 0.01},
                        advantage={"gamma": GAMMA, "gae_lambda": 0.95},
                        ppo={"clip_value_loss": False, "max_grad_norm": 10.0})
    policy = MLPPolicy(hidden_size=16)
    Trainer(cfg, env, policy, "cpu").train()
    with torch.inference_mode():
        output = policy(torch.ones(1, 1, 1), torch.zeros(1, 1, dtype=torch.bool), rows=slice(0, 1))
    return float(output.values[0, 0])


def test_truncation_bootstraps_to_the_infinite_horizon_value() -> None:
    assert learned_value("truncation") == pytest.approx(TRUNCATION_VALUE, abs=0.3)


def test_termination_gives_the_finite_horizon_value() -> None:
    """The same run with the time limit reported as a terminal: the check above would catch the mix-up."""
    value = learned_value("terminal")
    assert MONTE_CARLO_TERMINATION_VALUE - 0.3 < value < ONE_STEP_TERMINATION_VALUE + 0.3
    assert TRUNCATION_VALUE - value > 6
