"""Experience stores each row's steps in contiguous windows and samples whole windows."""

from __future__ import annotations

import numpy as np
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


def store_step(exp: Experience, t: int, arrays: bool, memory: dict[str, torch.Tensor] | None = None) -> None:
    """One step of 2 rows, from numpy arrays (an env's batch) or from tensors, with the same values."""
    obs = np.array([[10.0 * t], [10.0 * t + 1]], dtype=np.float32)
    flags = np.array([t % 2 == 0, t % 3 == 0])
    out = PolicyOutput(actions=torch.tensor([[[t]], [[t + 1]]]), log_prob=torch.tensor([[-0.5 * t], [-0.25]]),
                       entropy=torch.zeros(2, 1), values=torch.tensor([[float(t)], [2.0]]), memory=memory or {})
    convert = (lambda a: a) if arrays else torch.from_numpy
    exp.store_decision(slice(0, 2), out, convert(obs), convert(flags), convert(~flags))
    exp.store_outcome(slice(0, 2), convert(np.array([t, -t], dtype=np.float32)), convert(flags), convert(~flags))


def test_numpy_arrays_and_tensors_store_the_same_steps() -> None:
    from_arrays, from_tensors = Experience(8, 2, 2, SPEC), Experience(8, 2, 2, SPEC)
    for t in range(4):
        store_step(from_arrays, t, arrays=True)
        store_step(from_tensors, t, arrays=False)
    assert from_arrays.full and from_tensors.full
    for name, buffer in from_tensors.buffers.items():
        assert torch.equal(from_arrays.buffers[name], buffer), name
    assert from_arrays.buffers["actions"][:, :, 0].tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]


def test_a_buffer_moved_to_shared_memory_after_a_store_still_receives_the_next_ones() -> None:
    """share_memory_() frees a tensor's old memory: a numpy view kept from before must not be written through."""
    exp = Experience(8, 2, 2, SPEC)
    store_step(exp, 0, arrays=True)
    for tensor in exp.buffers.values():
        tensor.share_memory_()
    for t in range(1, 4):
        store_step(exp, t, arrays=True)
    assert all(tensor.is_shared() for tensor in exp.buffers.values())
    assert exp.buffers["observations"][:, :, 0].tolist() == [[0.0, 10.0], [1.0, 11.0], [20.0, 30.0], [21.0, 31.0]]


def test_fields_numpy_cannot_hold_and_tensors_needing_grad_are_stored_too() -> None:
    spec = {**SPEC, "h": TensorSpec((3,), torch.bfloat16), "g": TensorSpec((3,), torch.float32)}
    exp = Experience(8, 2, 2, spec)
    weight = torch.ones(2, 3, requires_grad=True)
    for t in range(4):
        store_step(exp, t, arrays=True, memory={"h": torch.full((2, 3), float(t), dtype=torch.bfloat16),
                                                "g": weight * t})
    assert exp.buffers["h"].dtype == torch.bfloat16 and not exp.buffers["g"].requires_grad
    for name in ("h", "g"):
        assert exp.buffers[name][:, :, 0].tolist() == [[0.0, 1.0], [0.0, 1.0], [2.0, 3.0], [2.0, 3.0]]
