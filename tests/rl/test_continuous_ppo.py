"""PPO on Box actions: the ratio is of the stored, unclipped sample; the env gets it clipped; the gradient falls back.

The hand-worked case: the behaviour policy N(0, 1) drew a = 2.7, which Pendulum's bound clips to 2.0. After an
update the mean is 0.05. log pi_old(2.7) = -2.7^2 / 2 - log(2 pi) / 2 = -4.5639385; log pi_new(2.7) =
-2.65^2 / 2 - log(2 pi) / 2, so log ratio = (2.7^2 - 2.65^2) / 2 = 0.13375 and ratio = e^0.13375 = 1.1431070.
Had the clipped 2.0 been stored, the ratio would be e^((2.0^2 - 1.95^2) / 2) = e^0.09875 = 1.1037903 instead.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pytest
import torch

from mettle.agent.mlp import MLPPolicy
from mettle.agent.registry import build_policy
from mettle.config import ConfigError, build_run_config
from mettle.contracts import PolicyEnvInfo
from mettle.envs.gymnasium import GymnasiumEnvironment
from mettle.recipes import CONTINUOUS_CONTROL, HALFCHEETAH, PENDULUM, recipe_for
from mettle.rl.loss import PPOActorLoss, PPOCriticLoss
from mettle.rl.minibatch import Minibatch
from mettle.rl.policy_files import CheckpointError, load_policy, read_policy_spec, save_policy
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import PPOConfig
from mettle.rl.training import TrainerComponent
from mettle.rl.training.analytic import analytic_problem
from mettle.run import build_run

HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)
PENDULUM_INFO = PolicyEnvInfo(gym.spaces.Box(-1.0, 1.0, (3,), dtype=np.float32),
                              gym.spaces.Box(-2.0, 2.0, (1,), dtype=np.float32))


def policy_with_mean(mean: float) -> MLPPolicy:
    """An MLP whose Gaussian mean is `mean` in every state (actor weights zero) and whose std is 1."""
    policy = MLPPolicy(hidden_size=4)
    policy.initialize_to_environment(PENDULUM_INFO, "cpu")
    with torch.no_grad():
        policy.actor_head.weight.zero_()
        policy.actor_head.bias.fill_(mean)
    return policy


def test_ppo_ratio_is_of_the_unclipped_sample_by_hand() -> None:
    obs, starts = torch.zeros(1, 1, 3), torch.ones(1, 1, dtype=torch.bool)
    stored = torch.tensor([[[2.7]]])
    behaviour = policy_with_mean(0.0)(obs, starts, actions=stored)
    assert behaviour.log_prob.item() == pytest.approx(-0.5 * 2.7**2 - HALF_LOG_TWO_PI, abs=1e-6)
    assert behaviour.log_prob.item() == pytest.approx(-4.5639385, abs=1e-6)
    learner = policy_with_mean(0.05)(obs, starts, actions=stored)
    data = {"log_probs": behaviour.log_prob.detach(), "mask": torch.ones(1, 1, dtype=torch.bool)}
    minibatch = Minibatch(torch.arange(1), data, torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1))
    loss, metrics = PPOActorLoss(PPOConfig(clip_coef=0.2, entropy_coef=0.0))(minibatch, learner)
    ratio = math.exp(0.13375)
    assert ratio == pytest.approx(1.1431070, abs=1e-7)
    assert metrics["policy_loss"].item() == pytest.approx(-ratio, abs=1e-5), "inside the clip range: -A * ratio"
    assert metrics["approx_kl"].item() == pytest.approx(ratio - 1 - 0.13375, abs=1e-6)
    assert loss.item() == pytest.approx(-ratio, abs=1e-5)
    clipped_ratio = math.exp((2.0**2 - 1.95**2) / 2)
    assert clipped_ratio == pytest.approx(1.1037903, abs=1e-7)
    assert abs(metrics["policy_loss"].item() + clipped_ratio) > 0.03, "the clipped action would give another ratio"


class RecordedActions(gym.ActionWrapper):
    """Keeps every action the simulator was given."""

    seen: ClassVar[list[np.ndarray]] = []

    def action(self, action: np.ndarray) -> np.ndarray:
        """Record and pass on."""
        RecordedActions.seen.append(np.array(action, copy=True))
        return action


class RolloutProbe(TrainerComponent):
    """After each rollout: the stored actions of live steps, and what the simulator was given meanwhile."""

    def __init__(self) -> None:
        super().__init__(epoch_interval=1)
        self.rollouts: list[tuple[np.ndarray, np.ndarray]] = []

    def on_rollout_end(self) -> None:
        """Pair the experience's live actions with the simulator's, then start the next rollout's record."""
        buffers = self.context.experience.buffers
        stored = buffers["actions"][buffers["mask"]].numpy().copy()
        self.rollouts.append((stored, np.array(RecordedActions.seen).reshape(-1, 1)))
        RecordedActions.seen = []


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_rollouts_store_the_unclipped_sample_and_the_simulator_gets_it_clipped(kind: str) -> None:
    cfg = build_run_config(["env.name=gym:Pendulum-v1", "batch_size=512", "minibatch_size=128", "bptt_horizon=16",
                            "total_timesteps=1536", "update_epochs=1", f"policy.kind={kind}"])
    RecordedActions.seen = []
    env = GymnasiumEnvironment("Pendulum-v1", 4, seed=0, wrappers=(RecordedActions,))
    try:
        trainer = Trainer(cfg.trainer, env, build_policy(kind, hidden_size=16), "cpu")
        probe = trainer.register(RolloutProbe())
        trainer.train()
    finally:
        env.close()
    assert len(probe.rollouts) == 3
    for stored, given in probe.rollouts:
        assert stored.dtype == np.float32 and (np.abs(stored) > 2.0).any(), "some samples lie outside the bounds"
        assert (np.abs(given) <= 2.0).all()
        np.testing.assert_array_equal(np.sort(np.clip(stored, -2.0, 2.0), axis=0), np.sort(given, axis=0))


def test_auto_takes_the_analytic_gradient_for_a_gaussian_mlp_and_autograd_for_an_lstm_saying_which(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert analytic_problem(policy_with_mean(0.0), [PPOActorLoss(PPOConfig()), PPOCriticLoss(PPOConfig())]) is None
    small = ["env.name=gym:Pendulum-v1", "env.num_envs=2", "batch_size=64", "minibatch_size=32", "total_timesteps=64",
             "update_epochs=1"]
    lstm_said = "gradient steps: autograd (it is written for MLPPolicy, and the policy is LSTMPolicy)"
    for kind, said in [("mlp", "gradient steps: analytic"), ("lstm", lstm_said)]:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="mettle.rl.training.core"), \
                build_run(build_run_config([*small, f"policy.kind={kind}"])) as run:
            run.trainer.train()
        assert said in caplog.text, kind


@pytest.mark.parametrize("override,message", [
    ("gradient=analytic policy.kind=lstm", "gradient=analytic cannot be used: it is written for MLPPolicy"),
    ("losses.kickstarter.enabled=true", "losses.kickstarter: this environment's actions are Box(1,) (a Gaussian head)"),
])
def test_what_cannot_serve_a_gaussian_head_is_refused_in_one_line(override: str, message: str) -> None:
    cfg = build_run_config(["env.name=gym:Pendulum-v1", "env.num_envs=2", "batch_size=64", "minibatch_size=32",
                            "total_timesteps=64", *override.split(), "losses.kickstarter.teacher=runs/nowhere"])
    with pytest.raises(ConfigError) as error:
        build_run(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_continuous_recipe_is_picked_for_box_action_ids_only() -> None:
    assert recipe_for("gym:Pendulum-v1", None) == CONTINUOUS_CONTROL + PENDULUM
    assert recipe_for("gym:MountainCarContinuous-v0", "lstm") == CONTINUOUS_CONTROL
    assert recipe_for("gym:HalfCheetah-v5", None) == CONTINUOUS_CONTROL + HALFCHEETAH
    cheetah = build_run_config(recipe_for("gym:HalfCheetah-v5", None))
    assert (cheetah.trainer.batch_size, cheetah.trainer.update_epochs, cheetah.policy.log_std_init) == (512, 20, -2.0)
    assert recipe_for("gym:Acrobot-v1", None) == [] and recipe_for("gym:NoSuchEnv-v0", None) == []
    settings: dict[str, Any] = dict(item.split("=", 1) for item in CONTINUOUS_CONTROL)
    assert (settings["batch_size"], settings["minibatch_size"], settings["update_epochs"]) == ("2048", "64", "10")
    cfg = build_run_config(recipe_for("gym:Pendulum-v1", None))
    assert cfg.trainer.ppo.entropy_coef == 0.0 and cfg.trainer.ppo.max_grad_norm == 0.5


def test_a_box_policy_round_trips_through_its_files_and_a_damaged_box_spec_is_refused(tmp_path: Path) -> None:
    policy = policy_with_mean(0.3)
    with torch.no_grad():
        policy.log_std.fill_(-0.5)  # type: ignore[union-attr]
    save_policy(policy, PENDULUM_INFO, tmp_path / "p")
    loaded, info = load_policy(tmp_path / "p")
    assert info.action_space == PENDULUM_INFO.action_space
    assert torch.equal(loaded.state_dict()["log_std"], torch.tensor([-0.5]))
    spec_path = tmp_path / "p" / "policy.json"
    spec = json.loads(spec_path.read_text())
    for damaged in ({"type": "Box", "low": [0.0] * 2000, "high": [1.0] * 2000, "dtype": "float32"},
                    {"type": "Box", "low": [0], "high": [3], "dtype": "int64"}):
        spec_path.write_text(json.dumps({**spec, "action_space": damaged}))
        with pytest.raises(CheckpointError, match=r"must hold floats in 1 to 1024 dimensions") as error:
            read_policy_spec(spec_path)
        assert error.value.reason == "bad-spec"
