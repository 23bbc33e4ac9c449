"""PPO actor and critic terms against numbers worked out element by element in plain Python.

The minibatch is 4 rows x 2 steps. Live elements are chosen so that every branch of the clipped objectives
is taken by some element (ratio above and below the clip range, with positive and negative advantages, and
inside it; a value update inside and outside the value clip range, with the clipped and the unclipped error
the larger). Masked elements hold extreme numbers, so any leak of them into a mean shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from mettle.agent.policy import PolicyOutput
from mettle.rl.loss import PPOActorLoss, PPOCriticLoss
from mettle.rl.minibatch import Minibatch
from mettle.rl.trainer_config import PPOConfig

CLIP = 0.2
VALUE_CLIP = 0.2
ENTROPY_COEF = 0.01
VALUE_COEF = 0.5

MASK = [[True, True], [True, True], [True, False], [True, False]]
RATIOS = [[1.5, 0.5], [1.5, 0.6], [1.1, 3.0], [0.9, 0.1]]
"""pi_new / pi_old per element; (2, 1) and (3, 1) are masked."""
ADVANTAGES = [[2.0, 1.0], [-1.0, -2.0], [0.5, 100.0], [-0.5, -50.0]]
OLD_LOG_PROBS = [[-0.7, -1.2], [-0.3, -2.0], [-1.0, -0.1], [-0.6, -0.9]]
ENTROPIES = [[0.6, 0.5], [0.4, 0.7], [0.3, 9.0], [0.2, 9.0]]
VALUES = [[1.0, 1.0], [0.0, 2.0], [-1.0, 50.0], [0.3, -50.0]]
OLD_VALUES = [[0.5, 0.9], [0.5, 1.0], [0.0, 0.0], [0.2, 0.0]]
RETURNS = [[2.0, 0.0], [-1.0, 0.0], [0.5, -20.0], [0.3, 20.0]]
LIVE = [(i, t) for i in range(4) for t in range(2) if MASK[i][t]]


def make_minibatch(weights: list[float] | None = None) -> Minibatch:
    """A minibatch holding the tables above; `weights` are per-row importance weights (default: ones)."""
    w = torch.tensor(weights or [1.0] * 4).unsqueeze(1)
    data = {
        "log_probs": torch.tensor(OLD_LOG_PROBS),
        "values": torch.tensor(OLD_VALUES),
        "mask": torch.tensor(MASK),
    }
    return Minibatch(torch.arange(4), data, torch.tensor(ADVANTAGES), torch.tensor(RETURNS), w)


def make_output() -> PolicyOutput:
    """The learner's output: log-probs that give RATIOS, ENTROPIES and VALUES, all requiring grad."""
    new_log_probs = [[OLD_LOG_PROBS[i][t] + math.log(RATIOS[i][t]) for t in range(2)] for i in range(4)]
    return PolicyOutput(
        actions=torch.zeros(4, 2, 1, dtype=torch.int64),
        log_prob=torch.tensor(new_log_probs, requires_grad=True),
        entropy=torch.tensor(ENTROPIES, requires_grad=True),
        values=torch.tensor(VALUES, requires_grad=True),
    )


def weighted_mean(per_element: dict[tuple[int, int], float], weights: list[float]) -> float:
    """sum(w_i x_it) / sum(w_i) over live elements only."""
    total = sum(weights[i] * x for (i, _), x in per_element.items())
    return total / sum(weights[i] for i, _ in per_element)


def expected_actor(weights: list[float]) -> dict[str, float]:
    """Textbook PPO: L = -mean(min(r A, clip(r, 1-e, 1+e) A)) - c_ent * mean(H), plus KL and clip diagnostics."""
    surrogate, entropy, kl, clipped = {}, {}, {}, {}
    for i, t in LIVE:
        r, a = RATIOS[i][t], ADVANTAGES[i][t]
        r_clipped = min(max(r, 1 - CLIP), 1 + CLIP)
        surrogate[i, t] = -min(r * a, r_clipped * a)
        entropy[i, t] = ENTROPIES[i][t]
        kl[i, t] = (r - 1) - math.log(r)
        clipped[i, t] = 1.0 if abs(r - 1) > CLIP else 0.0
    policy_loss = weighted_mean(surrogate, weights)
    mean_entropy = weighted_mean(entropy, weights)
    return {
        "loss": policy_loss - ENTROPY_COEF * mean_entropy,
        "policy_loss": policy_loss,
        "entropy": mean_entropy,
        "approx_kl": weighted_mean(kl, weights),
        "clipfrac": weighted_mean(clipped, weights),
    }


def expected_value_loss(clip_value_loss: bool, weights: list[float]) -> float:
    """0.5 * mean((V - R)^2), or with clipping 0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old) - R)^2))."""
    per_element = {}
    for i, t in LIVE:
        v, old, ret = VALUES[i][t], OLD_VALUES[i][t], RETURNS[i][t]
        error = (v - ret) ** 2
        if clip_value_loss:
            v_clipped = old + min(max(v - old, -VALUE_CLIP), VALUE_CLIP)
            error = max(error, (v_clipped - ret) ** 2)
        per_element[i, t] = 0.5 * error
    return weighted_mean(per_element, weights)


def ppo_config(clip_value_loss: bool = True) -> PPOConfig:
    return PPOConfig(clip_coef=CLIP, value_clip_coef=VALUE_CLIP, entropy_coef=ENTROPY_COEF, value_coef=VALUE_COEF,
                     clip_value_loss=clip_value_loss)


def test_the_tables_exercise_every_branch() -> None:
    """Guard on the test data itself: each branch of both clipped objectives is taken by a live element."""
    actor_branches = set()
    for i, t in LIVE:
        r, a = RATIOS[i][t], ADVANTAGES[i][t]
        inside = abs(r - 1) <= CLIP
        actor_branches.add("inside" if inside else ("clipped" if (r - 1) * a > 0 else "unclipped outside"))
    assert actor_branches == {"inside", "clipped", "unclipped outside"}
    critic_branches = set()
    for i, t in LIVE:
        v, old, ret = VALUES[i][t], OLD_VALUES[i][t], RETURNS[i][t]
        if abs(v - old) <= VALUE_CLIP:
            critic_branches.add("inside")
            continue
        v_clipped = old + math.copysign(VALUE_CLIP, v - old)
        critic_branches.add("clipped wins" if (v_clipped - ret) ** 2 > (v - ret) ** 2 else "unclipped wins")
    assert critic_branches == {"inside", "clipped wins", "unclipped wins"}


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 0.25, 0.8]], ids=["uniform", "importance"])
def test_actor_loss_and_diagnostics(weights: list[float]) -> None:
    loss, metrics = PPOActorLoss(ppo_config())(make_minibatch(weights), make_output())
    expected = expected_actor(weights)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected["loss"], rel=1e-5)
    for name in ("policy_loss", "entropy", "approx_kl", "clipfrac"):
        assert metrics[name].item() == pytest.approx(expected[name], rel=1e-5), name
    assert not any(value.requires_grad for value in metrics.values())


def test_actor_gradient_vanishes_exactly_where_clipped() -> None:
    """d loss / d log pi_new = -r A / n on unclipped live elements, 0 where clipped or masked; entropy -c/n."""
    output = make_output()
    loss, _ = PPOActorLoss(ppo_config())(make_minibatch(), output)
    loss.backward()
    n = len(LIVE)
    for i in range(4):
        for t in range(2):
            r, a = RATIOS[i][t], ADVANTAGES[i][t]
            r_clipped = min(max(r, 1 - CLIP), 1 + CLIP)
            live = MASK[i][t]
            active = live and -r * a >= -r_clipped * a
            expected = -r * a / n if active else 0.0
            assert output.log_prob.grad[i, t].item() == pytest.approx(expected, abs=1e-6), (i, t)
            assert output.entropy.grad[i, t].item() == pytest.approx(-ENTROPY_COEF / n if live else 0.0), (i, t)


@pytest.mark.parametrize("clip_value_loss", [True, False])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 0.25, 0.8]], ids=["uniform", "importance"])
def test_critic_loss(clip_value_loss: bool, weights: list[float]) -> None:
    loss, metrics = PPOCriticLoss(ppo_config(clip_value_loss))(make_minibatch(weights), make_output())
    expected = expected_value_loss(clip_value_loss, weights)
    assert metrics["value_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(VALUE_COEF * expected, rel=1e-5)


def test_clipping_changes_the_critic_loss() -> None:
    """The two settings really differ on these tables, so the parametrised test above tells them apart."""
    assert abs(expected_value_loss(True, [1.0] * 4) - expected_value_loss(False, [1.0] * 4)) > 0.1


def test_critic_gradient_vanishes_where_the_clipped_error_wins() -> None:
    """d loss / d V = c_v (V - R) / n where the unclipped error counts, 0 where the clipped one wins or masked."""
    output = make_output()
    loss, _ = PPOCriticLoss(ppo_config(True))(make_minibatch(), output)
    loss.backward()
    n = len(LIVE)
    for i in range(4):
        for t in range(2):
            v, old, ret = VALUES[i][t], OLD_VALUES[i][t], RETURNS[i][t]
            v_clipped = old + min(max(v - old, -VALUE_CLIP), VALUE_CLIP)
            counts = MASK[i][t] and (v - ret) ** 2 >= (v_clipped - ret) ** 2
            expected = VALUE_COEF * (v - ret) / n if counts else 0.0
            assert output.values.grad[i, t].item() == pytest.approx(expected, abs=1e-6), (i, t)
