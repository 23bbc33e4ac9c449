"""Advantages of a real trainer's rollouts where episodes cross the epoch boundary through a held decision.

The last decision of an epoch is held: its value bootstraps the epoch's last step, and it is committed as
the first step of the next epoch. ScriptedEnvironment makes every observation, reward and flag known in
advance, so the test replays the script itself, asks the policy for the values of the scripted
observations, and computes GAE with its own loop; nothing is read back from the code under test except
what is being checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mettle.agent.mlp import MLPPolicy
from mettle.envs.testing import ScriptedEnvironment
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig

EPISODE_LENGTH = 4
REWARDS = [1.0, 2.0, 4.0, 8.0]
"""Reward for the step taken from t = 0..3: all different, so a step stored in the wrong place shows."""
OFFSETS = [0, 2]
"""Row 0 starts at t = 0, row 1 at t = 2: both rows are mid-episode at the first epoch boundary."""
HORIZON = 2
WINDOWS = 3
STEPS = HORIZON * WINDOWS
"""Steps per row per epoch: 6, so each row ends one episode inside an epoch and another crosses the boundary."""
ROWS = len(OFFSETS)
GAMMA, LAMBDA = 0.9, 0.8

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ScriptStep:
    """One stored decision as the script dictates it, and the outcome of its action."""

    t: int
    mask: bool
    start: bool
    reward: float
    terminal: bool
    truncation: bool


def script(offset: int, decisions: int, end: str) -> list[ScriptStep]:
    """The row's decisions from reset: observation t, the final observation [L] masked, then a start at 0."""
    steps, t, start = [], offset, True
    for _ in range(decisions):
        if t < EPISODE_LENGTH:
            ended = t + 1 == EPISODE_LENGTH
            steps.append(ScriptStep(t, True, start, REWARDS[t], ended and end == "terminal",
                                    ended and end == "truncation"))
            t, start = t + 1, False
        else:
            steps.append(ScriptStep(t, False, start, 0.0, False, False))
            t, start = 0, True
    return steps


def hand_gae(steps: list[ScriptStep], values: list[float], bootstrap: float) -> list[float]:
    """A_t = delta_t + gamma lambda A_{t+1} inside an episode; no bootstrap after a terminal step."""
    advantages = [0.0] * len(steps)
    next_advantage, next_value = 0.0, bootstrap
    for k in reversed(range(len(steps))):
        step = steps[k]
        target = step.reward + (0.0 if step.terminal else GAMMA * next_value)
        episode_goes_on = not (step.terminal or step.truncation)
        advantages[k] = target - values[k] + (GAMMA * LAMBDA * next_advantage if episode_goes_on else 0.0)
        next_advantage, next_value = advantages[k], values[k]
    return advantages


def value_of(policy: MLPPolicy, t: float) -> float:
    """The critic's estimate for observation [t], from a fresh forward pass."""
    with torch.inference_mode():
        output = policy(torch.tensor([[[float(t)]]]), torch.zeros(1, 1, dtype=torch.bool), rows=slice(0, 1))
    return float(output.values[0, 0])


def row_series(buffer: torch.Tensor, row: int) -> list[float]:
    """Row `row`'s steps in time order: step s lives in segment (s // T) * rows + row at position s % T."""
    return [float(buffer[(s // HORIZON) * ROWS + row, s % HORIZON]) for s in range(STEPS)]


@pytest.mark.parametrize("end", ["truncation", "terminal"])
def test_advantages_across_the_epoch_boundary(end: str) -> None:
    env = ScriptedEnvironment(num_envs=ROWS, episode_length=EPISODE_LENGTH, end=end, rewards=REWARDS,
                              row_offsets=OFFSETS)
    cfg = TrainerConfig(total_timesteps=10 * STEPS * ROWS, batch_size=STEPS * ROWS, minibatch_size=STEPS * ROWS,
                        bptt_horizon=HORIZON, update_epochs=1, advantage={"gamma": GAMMA, "gae_lambda": LAMBDA,
                                                                          "normalize": False})
    policy = MLPPolicy(hidden_size=8)
    trainer = Trainer(cfg, env, policy, "cpu")
    core, exp = trainer.core_loop, trainer.context.experience
    full_scripts = [script(offset, 2 * STEPS + 1, end) for offset in OFFSETS]

    held_values: list[float] = []
    for epoch in range(2):
        trainer.rollout_phase()
        policy.eval()
        advantages, returns = core.compute_advantages()
        for row in range(ROWS):
            steps = full_scripts[row][epoch * STEPS: (epoch + 1) * STEPS]
            held = full_scripts[row][(epoch + 1) * STEPS]
            # what was stored is what the script says
            assert row_series(exp.buffers["observations"][..., 0], row) == [s.t for s in steps]
            assert row_series(exp.buffers["rewards"], row) == [s.reward for s in steps]
            assert row_series(exp.buffers["terminals"], row) == [s.terminal for s in steps]
            assert row_series(exp.buffers["truncations"], row) == [s.truncation for s in steps]
            assert row_series(exp.buffers["mask"], row) == [s.mask for s in steps]
            assert row_series(exp.buffers["starts"], row) == [s.start for s in steps]
            # values: the policy's own estimates, except that step 0 of epoch 2 is the decision held at the end of
            # epoch 1, with the value the pre-update policy gave it (which also bootstrapped epoch 1)
            values = [value_of(policy, s.t) for s in steps]
            if epoch == 1:
                assert values[0] != pytest.approx(held_values[row], abs=1e-6), "the update must move the value"
                values[0] = held_values[row]
            assert row_series(exp.buffers["values"], row) == pytest.approx(values, abs=1e-5)
            bootstrap = value_of(policy, held.t)
            assert float(exp.bootstrap[row]) == pytest.approx(bootstrap, abs=1e-5)
            expected = hand_gae(steps, values, bootstrap)
            assert row_series(advantages, row) == pytest.approx(expected, abs=1e-4)
            assert row_series(returns, row) == pytest.approx([a + v for a, v in zip(expected, values, strict=True)],
                                                             abs=1e-4)
            if epoch == 0:
                held_values.append(bootstrap)
        core.training_phase()


def test_the_script_crosses_the_boundary_in_both_rows() -> None:
    """Guard on the scenario: at the end of epoch 1 both rows are mid-episode, and each row ended an episode."""
    for offset in OFFSETS:
        steps = script(offset, STEPS + 1, "truncation")
        assert steps[STEPS].mask and not steps[STEPS].start, "the held decision continues an episode"
        assert any(s.truncation for s in steps[:STEPS]), "an episode ends inside the epoch"
