"""Experience stores each row's steps in contiguous windows and samples whole windows."""

from __future__ import annotations

import torch

from mettle.agent.policy import PolicyOutput, TensorSpec
from mettle.rl.trainer_config import SamplingConfig
from mettle.rl.training.experience import Experience, importance_weights, prioritized_probabilities

SPEC = {"observations": TensorSpec((1,), torch.float32), "actions": TensorSpec((1,), torch.int64)}


def fill(exp: Experience, rows: int, steps: int) -> None:
    """Store step t of row r with observation 100*r + t and reward t."""
    for t in range(steps):
        obs = torch.tensor([[100.0 * r + t] for r in range(rows)])
        out = PolicyOutput(
            actions=torch.zeros(rows, 1, 1, dtype=torch.int64), log_prob=torch.zeros(rows, 1),
            entropy=torch.zeros(rows, 1), values=obs.view(rows, 1),
        )
        exp.store_decision(slice(0, rows), out, obs, torch.ones(rows, dtype=torch.bool),
                           torch.zeros(rows, dtype=torch.bool))
        exp.store_outcome(slice(0, rows), torch.full((rows,), float(t)), torch.zeros(rows, dtype=torch.bool),
                          torch.zeros(rows, dtype=torch.bool))


def test_layout_keeps_each_row_contiguous_in_time() -> None:
    rows, horizon, windows = 3, 4, 2
    exp = Experience(rows * horizon * windows, horizon, rows, SPEC)
    assert exp.segments == rows * windows and exp.steps_per_row == horizon * windows
    fill(exp, rows, horizon * windows)
    assert exp.full
    obs = exp.buffers["observations"][..., 0]
    # segment (t // T) * rows + r holds row r's steps t .. t+T-1
    for r in range(rows):
        for w in range(windows):
            expected = torch.tensor([100.0 * r + w * horizon + i for i in range(horizon)])
            torch.testing.assert_close(obs[w * rows + r], expected)
    series = exp.as_row_series(obs)
    torch.testing.assert_close(series[1], torch.arange(8.0) + 100)
    torch.testing.assert_close(exp.from_row_series(series), obs)


def test_rows_become_full_and_reset_clears() -> None:
    exp = Experience(8, 2, 2, SPEC)
    fill(exp, 2, 3)
    assert not exp.full and not exp.rows_full(slice(0, 2))
    fill(exp, 2, 1)
    assert exp.full
    exp.reset()
    assert not exp.full


def test_sequential_minibatches_cover_every_segment_once() -> None:
    exp = Experience(48, 4, 3, SPEC)
    fill(exp, 3, 16)
    adv = torch.arange(48.0).view(12, 4)
    seen = []
    for mb in exp.minibatches(adv, adv, 4, SamplingConfig(), 0.0, torch.Generator().manual_seed(0)):
        assert mb.data["observations"].shape == (4, 4, 1)
        torch.testing.assert_close(mb.advantages, adv[mb.indices])
        torch.testing.assert_close(mb.weights, torch.ones(4, 1))
        seen.extend(mb.indices.tolist())
    assert sorted(seen) == list(range(12))


def test_prioritized_sampling_prefers_large_advantages() -> None:
    exp = Experience(48, 4, 3, SPEC)
    fill(exp, 3, 16)
    adv = torch.zeros(12, 4)
    adv[5] = 10.0
    adv[7] = 0.01
    cfg = SamplingConfig(method="prioritized", prio_alpha=1.0, prio_beta0=0.5)
    gen = torch.Generator().manual_seed(0)
    picks = [mb.indices.tolist() for _ in range(20) for mb in exp.minibatches(adv, adv, 1, cfg, 0.0, gen)]
    counts = torch.bincount(torch.tensor(picks).flatten(), minlength=12)
    assert counts[5] > 0.9 * counts.sum()


def test_priority_math() -> None:
    adv = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 0.0]])
    probs = prioritized_probabilities(adv, alpha=1.0)
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(prioritized_probabilities(adv, alpha=0.0), torch.full((3,), 1 / 3))
    weights = importance_weights(torch.tensor([0.5, 0.25]), population=4, beta=1.0)
    # (4 * 0.5) ** -1 = 0.5 and (4 * 0.25) ** -1 = 1; normalised by the max
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.0]))
