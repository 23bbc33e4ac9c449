"""Observation and reward normalisation in training: oracles over the streams the learner saw, frozen statistics
in evaluation, the policy files that carry them, and the configurations that are refused."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mettle.agent.normalizer import CLIP, EPSILON
from mettle.agent.policy import TensorSpec
from mettle.config import ConfigError, build_run_config
from mettle.envs.factory import make_environment
from mettle.recipes import CONTINUOUS_CONTROL
from mettle.rl.evaluate import evaluate_policy
from mettle.rl.policy_files import CheckpointError, load_policy, save_policy
from mettle.rl.training import TrainerComponent
from mettle.rl.training.experience import Experience
from mettle.rl.training.normalization import RewardScaler, discounted_returns
from mettle.run import build_run, check_resumable

pytestmark = pytest.mark.usefixtures("one_thread")

GAMMA = 0.5


def series_experience(rewards: list[list[float]], ends: list[list[bool]], live: list[list[bool]]) -> Experience:
    """An Experience of one window per row, so its buffers [rows, T] are the rows' series as they are."""
    rows, steps = len(rewards), len(rewards[0])
    spec = {"observations": TensorSpec((1,), torch.float32), "actions": TensorSpec((1,), torch.int64)}
    experience = Experience(rows * steps, steps, rows, spec)
    experience.buffers["rewards"].copy_(torch.tensor(rewards))
    experience.buffers["terminals"].copy_(torch.tensor(ends))
    experience.buffers["mask"].copy_(torch.tensor(live))
    return experience


def test_reward_scaling_by_hand() -> None:
    """gamma 0.5. Row 0: rewards 1, 2 (ends its episode), 3, 4: returns 1, 0.5 + 2 = 2.5, then 3, 1.5 + 4 = 5.5.
    Row 1: 2, a step that is not live, 2, 2: returns 2, (skipped), 1 + 2 = 3, 1.5 + 2 = 3.5. The seven returns
    sum to 20.5 and their squares to 71.75, so M2 = 71.75 - 20.5^2 / 7 = 11.7142857 and var = 1.6734694."""
    experience = series_experience([[1.0, 2.0, 3.0, 4.0], [2.0, 0.0, 2.0, 2.0]],
                                   [[False, True, False, False], [False] * 4],
                                   [[True] * 4, [True, False, True, True]])
    scaler = RewardScaler(GAMMA, num_rows=2)
    scaler.scale(experience, lambda sums: sums)
    assert float(scaler.moments.count) == 7
    assert float(scaler.moments.mean[0]) == pytest.approx(20.5 / 7)
    assert float(scaler.moments.var[0]) == pytest.approx(1.6734694, abs=1e-7)
    std = math.sqrt(1.6734694 + EPSILON)
    expected = [[1 / std, 2 / std, 3 / std, 4 / std], [2 / std, 0.0, 2 / std, 2 / std]]
    torch.testing.assert_close(experience.buffers["rewards"], torch.tensor(expected), atol=1e-6, rtol=0)
    assert scaler.returns.tolist() == [5.5, 3.5], "each row's return carries into the next rollout"

    # The next rollout continues both returns (row 0: 0.5 * 5.5 + 100 = 102.75).
    following = series_experience([[100.0, 0.0], [1.0, 1.0]], [[False, False], [False, False]],
                                  [[True, True], [True, True]])
    scaler.scale(following, lambda sums: sums)
    returns = np.array([1, 2.5, 3, 5.5, 2, 3, 3.5, 102.75, 51.375, 2.75, 2.375])
    assert float(scaler.moments.var[0]) == pytest.approx(returns.var(), rel=1e-12)
    assert float(following.buffers["rewards"][0, 0]) == pytest.approx(100 / math.sqrt(returns.var() + EPSILON))


def test_scaled_rewards_are_clipped_and_the_state_round_trips() -> None:
    """A million returns of variance 0.01 (std 0.1) so far: a reward of 5 scales to 50, clipped to 10."""
    scaler = RewardScaler(GAMMA, num_rows=1)
    scaler.load_state_dict({"returns": torch.zeros(1, dtype=torch.float64), "count": torch.tensor(1e6),
                            "mean": torch.zeros(1), "m2": torch.tensor([1e4])})
    rollout = series_experience([[5.0, -5.0]], [[True, False]], [[True, True]])
    scaler.scale(rollout, lambda sums: sums)
    assert rollout.buffers["rewards"].tolist() == [[CLIP, -CLIP]]
    copy = RewardScaler(GAMMA, num_rows=1)
    copy.load_state_dict(scaler.state_dict())
    assert copy.std == scaler.std and torch.equal(copy.returns, scaler.returns)
    with pytest.raises(ValueError, match=r"holds \(1,\) row returns, this run has \(3,\)"):
        RewardScaler(GAMMA, num_rows=3).load_state_dict(scaler.state_dict())


def test_discounted_returns_restart_after_truncations_too() -> None:
    rewards = torch.tensor([[1.0, 1.0, 1.0]])
    returns, carry = discounted_returns(rewards, torch.tensor([[False, True, False]]),
                                        torch.ones(1, 3, dtype=torch.bool), GAMMA, torch.tensor([4.0]))
    assert returns.tolist() == [[3.0, 2.5, 1.0]] and carry.tolist() == [1.0]


# ------------------------------------------------------------------ in training, against numpy
PENDULUM = ["env.name=gym:Pendulum-v1", "env.num_envs=2", "env.kwargs.max_episode_steps=20", "batch_size=64",
            "minibatch_size=32", "bptt_horizon=16", "update_epochs=1", "total_timesteps=256",
            "advantage.gamma=0.9", "env.normalize_observations=true", "env.normalize_rewards=true"]
"""Four epochs of 32 steps per row, episodes of 20: truncations (and their masked final steps) in every rollout."""


class Recorder(TrainerComponent):
    """Per rollout, as the learner trains on it: live observations, the statistics it was collected with, the
    scaled rewards, and the episodes' reported returns."""

    def __init__(self) -> None:
        super().__init__(epoch_interval=1)
        self.rollouts: list[dict[str, Any]] = []
        self.raw: list[dict[str, torch.Tensor]] = []
        self.returns: list[float] = []

    def watch_raw_rewards(self) -> None:
        """Record each rollout's rewards before they are scaled (the reward oracle's stream)."""
        core, experience = self.context.core_loop, self.context.experience
        scale = core.scale_rewards

        def recorded() -> None:
            self.raw.append({name: experience.as_row_series(experience.buffers[name]).clone()
                             for name in ("rewards", "terminals", "truncations", "mask")})
            scale()

        core.scale_rewards = recorded  # type: ignore[method-assign]

    def on_step(self, infos: list[dict[str, Any]]) -> None:
        self.returns += [float(info["episode_return"]) for info in infos]

    def on_rollout_end(self) -> None:
        exp, normalizer = self.context.experience, self.context.policy.observation_normalizer
        assert normalizer is not None
        mask = exp.buffers["mask"]
        self.rollouts.append({
            "live": exp.buffers["observations"][mask].double().clone(),
            "count": float(normalizer.count), "mean": normalizer.mean.clone(), "m2": normalizer.m2.clone(),
            "rewards": exp.as_row_series(exp.buffers["rewards"]).clone(),
            "std": self.context.core_loop.reward_scaler.std,  # type: ignore[union-attr]
        })


def oracle_return_variances(raw: list[dict[str, torch.Tensor]], gamma: float) -> list[float]:
    """Variance of every live step's discounted return up to the end of each rollout, in plain numpy."""
    whole = {name: np.concatenate([r[name].numpy() for r in raw], axis=1) for name in raw[0]}
    per_rollout = raw[0]["rewards"].shape[1]
    seen: list[list[float]] = [[] for _ in raw]
    for row in range(whole["rewards"].shape[0]):
        running = 0.0
        for step in range(whole["rewards"].shape[1]):
            if whole["mask"][row, step]:
                running = gamma * running + float(whole["rewards"][row, step])
                seen[step // per_rollout].append(running)
            if whole["terminals"][row, step] or whole["truncations"][row, step]:
                running = 0.0
    return [float(np.var(np.concatenate(seen[: k + 1]))) for k in range(len(raw))]


@pytest.mark.parametrize("overlap", [False, True], ids=["synchronous", "overlap"])
def test_statistics_are_numpys_over_the_streams_the_learner_trained_on(overlap: bool) -> None:
    recorder = Recorder()
    cfg = build_run_config([*PENDULUM, f"overlap={str(overlap).lower()}"])
    with build_run(cfg, components=[recorder]) as run:
        recorder.watch_raw_rewards()
        run.trainer.train()
        assert run.trainer.overlapped is overlap
        normalizer = run.policy.observation_normalizer
        assert normalizer is not None
        final = (float(normalizer.count), normalizer.mean.clone(), normalizer.m2.clone())

    rollouts = recorder.rollouts
    assert len(rollouts) == 4 and all(len(r["live"]) < 64 for r in rollouts), "masked final steps are left out"
    for k, rollout in enumerate([*rollouts, None]):  # each rollout acted with the statistics of those before it
        seen = torch.cat([r["live"] for r in rollouts[:k]]).numpy() if k else np.zeros((0, 3))
        count, mean, m2 = final if rollout is None else (rollout["count"], rollout["mean"], rollout["m2"])
        assert count == len(seen)
        if k:
            np.testing.assert_allclose(mean.numpy(), seen.mean(axis=0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose((m2 / count).numpy(), seen.var(axis=0), rtol=1e-8)

    variances = oracle_return_variances(recorder.raw, GAMMA_PENDULUM)
    for rollout, raw, var in zip(rollouts, recorder.raw, variances, strict=True):
        assert rollout["std"] == pytest.approx(math.sqrt(var + EPSILON), rel=1e-9)
        expected = (raw["rewards"].double() / rollout["std"]).clamp(-CLIP, CLIP).float()
        torch.testing.assert_close(rollout["rewards"], expected)
    assert recorder.returns and min(recorder.returns) < -20, "reported returns are Pendulum's own, not scaled"


GAMMA_PENDULUM = 0.9


def test_evaluation_leaves_the_statistics_as_they_are_and_the_policy_files_carry_them(tmp_path: Path) -> None:
    cfg = build_run_config([*PENDULUM, "total_timesteps=128"])
    with build_run(cfg) as run:
        run.trainer.train()
        policy, info = run.policy, run.env.policy_env_info
    normalizer = policy.observation_normalizer
    assert normalizer is not None and float(normalizer.count) > 0
    before = {k: v.clone() for k, v in normalizer.state_dict().items()}
    env = make_environment(cfg.env, seed=11, num_envs=2)
    try:
        evaluate_policy(policy, env, episodes=2)
        evaluate_policy(policy, env, episodes=2, deterministic=False)
    finally:
        env.close()
    after = normalizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "evaluation changed the statistics"

    save_policy(policy, info, tmp_path / "p")
    loaded, _ = load_policy(tmp_path / "p")
    assert loaded.observation_normalizer is not None
    assert all(torch.equal(before[k], v) for k, v in loaded.observation_normalizer.state_dict().items())
    obs = torch.randn(4, 1, 3) * 5
    starts = torch.zeros(4, 1, dtype=torch.bool)
    assert torch.equal(loaded(obs, starts, deterministic=True).actions, policy(obs, starts, deterministic=True).actions)

    weights = load_file(tmp_path / "p" / "policy.safetensors")
    weights["observation_normalizer.m2"][0] = -1.0  # a variance below zero would make every action NaN
    save_file(weights, tmp_path / "p" / "policy.safetensors")
    with pytest.raises(CheckpointError, match=r"observation_normalizer\.m2 holds negative values"):
        load_policy(tmp_path / "p")


def test_the_continuous_control_recipe_normalises_both() -> None:
    cfg = build_run_config(CONTINUOUS_CONTROL)
    assert cfg.env.normalize_observations and cfg.env.normalize_rewards
    assert not build_run_config([]).env.normalize_observations, "off by default"


class ImageEnv(gym.Env[np.ndarray, np.int64]):
    """A 4x4 grey image and two actions: integer observations, as pixels are."""

    observation_space = gym.spaces.Box(0, 255, (4, 4, 1), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros((4, 4, 1), np.uint8), {}

    def step(self, action: np.int64) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros((4, 4, 1), np.uint8), 0.0, True, False, {}


@pytest.mark.parametrize("overrides,message", [
    (["env.name=mettagrid:arena", "env.normalize_rewards=true"],
     "env.normalize_rewards=true: observation and reward normalisation are for Gymnasium and PettingZoo feature "
     "envs, and mettagrid:arena gives MettaGrid tokens"),
    (["env.name=gym:mettle/TestImage-v0", "env.normalize_observations=true"],
     "env.normalize_observations=true: gym:mettle/TestImage-v0 observations hold uint8 values (shape (4, 4, 1): "
     "images or tokens), and running mean/variance normalisation is for real-valued features; scale them in the "
     "policy (divide images by 255) or drop env.normalize_observations"),
    # the token policy's own refusal comes first: dropping normalisation alone would not make the run train
    (["env.name=gym:CartPole-v1", "policy.kind=token", "env.normalize_observations=true"], "TokenPolicy"),
], ids=["mettagrid", "uint8-images", "token-policy"])
def test_normalisation_where_it_cannot_apply_is_one_line(overrides: list[str], message: str) -> None:
    if "gym:mettle/TestImage-v0" in overrides[0] and "mettle/TestImage-v0" not in gym.registry:
        gym.register("mettle/TestImage-v0", entry_point=ImageEnv)
    with pytest.raises(ConfigError) as error:
        build_run(build_run_config(overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_run_cannot_resume_with_normalisation_switched() -> None:
    saved = build_run_config(["env.name=gym:Pendulum-v1"])
    for option in ("env.normalize_observations", "env.normalize_rewards"):
        with pytest.raises(ConfigError, match=f"cannot resume: {option} was False in the saved run, now True"):
            check_resumable(saved, build_run_config(["env.name=gym:Pendulum-v1", f"{option}=true"]))
