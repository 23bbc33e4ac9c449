"""Advantage estimators checked against hand-worked numbers, per-element references and SB3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from mettle.rl.advantage import explained_variance, gae, moment_sums, normalize, returns_from_advantages, vtrace

GAMMA = 0.9
LAMBDA = 0.8


def _random_rollout(rows: int, horizon: int, seed: int, p_term: float = 0.15, p_trunc: float = 0.15):
    """Random rewards/values and independent terminal/truncation flags (they may coincide)."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(rows, horizon, generator=gen)
    values = torch.randn(rows, horizon, generator=gen)
    bootstrap = torch.randn(rows, generator=gen)
    terminals = torch.rand(rows, horizon, generator=gen) < p_term
    truncations = torch.rand(rows, horizon, generator=gen) < p_trunc
    log_rhos = 0.7 * torch.randn(rows, horizon, generator=gen)
    return rewards, values, bootstrap, terminals, truncations, log_rhos


def _episode_end(terminals: list[bool], truncations: list[bool], t: int) -> int:
    """Index of the first step >= t that ends an episode, or the last step of the rollout."""
    horizon = len(terminals)
    for k in range(t, horizon):
        if terminals[k] or truncations[k]:
            return k
    return horizon - 1


def _td_error(r, v, boot, term, k, gamma):
    """r_k + gamma * V_{k+1} - V_k with V_T = bootstrap and no bootstrap after a terminal step."""
    next_value = boot if k == len(r) - 1 else v[k + 1]
    return r[k] + (0.0 if term[k] else gamma * next_value) - v[k]


def _reference_gae(rewards, values, bootstrap, terminals, truncations, gamma, lam) -> torch.Tensor:
    """Forward, per-element GAE: A_t = sum_{k=t}^{end} (gamma*lam)^(k-t) delta_k, stopping at episode end."""
    out = []
    for i in range(rewards.shape[0]):
        r, v = rewards[i].tolist(), values[i].tolist()
        term, trunc = terminals[i].tolist(), truncations[i].tolist()
        boot = float(bootstrap[i])
        row = []
        for t in range(len(r)):
            end = _episode_end(term, trunc, t)
            total = 0.0
            for k in range(t, end + 1):
                total += (gamma * lam) ** (k - t) * _td_error(r, v, boot, term, k, gamma)
            row.append(total)
        out.append(row)
    return torch.tensor(out, dtype=torch.float32)


def _reference_vtrace(rewards, values, bootstrap, terminals, truncations, log_rhos, gamma, lam, rho_clip,
                      c_clip) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, per-element V-trace (paper eq. 1): vs_t = V_t + sum_s gamma^(s-t) (prod_{i<s} c_i) delta_s."""
    pg_out, vs_out = [], []
    for i in range(rewards.shape[0]):
        r, v = rewards[i].tolist(), values[i].tolist()
        term, trunc = terminals[i].tolist(), truncations[i].tolist()
        boot = float(bootstrap[i])
        ratios = [math.exp(x) for x in log_rhos[i].tolist()]
        rho = [min(rho_clip, x) for x in ratios]
        c = [lam * min(c_clip, x) for x in ratios]
        horizon = len(r)
        vs = []
        for t in range(horizon):
            end = _episode_end(term, trunc, t)
            total, trace = 0.0, 1.0
            for s in range(t, end + 1):
                total += gamma ** (s - t) * trace * rho[s] * _td_error(r, v, boot, term, s, gamma)
                trace *= c[s]
            vs.append(v[t] + total)
        pg = []
        for t in range(horizon):
            if t == horizon - 1:
                nxt = boot
            elif term[t] or trunc[t]:
                nxt = v[t + 1]  # final observation's value; no trace across the episode boundary
            else:
                nxt = vs[t + 1]
            pg.append(rho[t] * (r[t] + (0.0 if term[t] else gamma * nxt) - v[t]))
        pg_out.append(pg)
        vs_out.append(vs)
    return torch.tensor(pg_out, dtype=torch.float32), torch.tensor(vs_out, dtype=torch.float32)


def _discounted_returns(rewards, bootstrap, terminals, gamma) -> torch.Tensor:
    """G_t = sum_k gamma^(k-t) r_k up to a terminal (no bootstrap) or the rollout end (+ gamma^(T-t) V_T)."""
    out = []
    for i in range(rewards.shape[0]):
        r, term = rewards[i].tolist(), terminals[i].tolist()
        row = []
        for t in range(len(r)):
            total, k = 0.0, t
            while True:
                total += gamma ** (k - t) * r[k]
                if term[k]:
                    break
                if k == len(r) - 1:
                    total += gamma ** (k + 1 - t) * float(bootstrap[i])
                    break
                k += 1
            row.append(total)
        out.append(row)
    return torch.tensor(out, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- GAE


def test_gae_hand_computed():
    # gamma=0.9, lambda=0.8 (gamma*lambda=0.72); every row has r=[1,2,3], V=[0.5,1.0,1.5], V_T=2.0.
    rewards = torch.tensor([[1.0, 2.0, 3.0]] * 4)
    values = torch.tensor([[0.5, 1.0, 1.5]] * 4)
    bootstrap = torch.full((4,), 2.0)
    terminals = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    truncations = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([
        # No flags. d2 = 3 + 0.9*2.0 - 1.5 = 3.3 (bootstrap); d1 = 2 + 0.9*1.5 - 1.0 = 2.35;
        # d0 = 1 + 0.9*1.0 - 0.5 = 1.4.  A2 = 3.3; A1 = 2.35 + 0.72*3.3 = 4.726;
        # A0 = 1.4 + 0.72*4.726 = 4.80272.
        [4.80272, 4.726, 3.3],
        # Terminal at t=1: d1 = 2 - 1.0 = 1.0 (no bootstrap) and A1 does not carry A2.
        # A2 = 3.3; A1 = 1.0; A0 = 1.4 + 0.72*1.0 = 2.12.
        [2.12, 1.0, 3.3],
        # Truncation at t=0: d0 = 1 + 0.9*V_1 - 0.5 = 1.4 bootstraps from the final obs value, no carry.
        # A2 = 3.3; A1 = 4.726; A0 = 1.4.
        [1.4, 4.726, 3.3],
        # Terminal at the last step: bootstrap is ignored. A2 = 3 - 1.5 = 1.5;
        # A1 = 2.35 + 0.72*1.5 = 3.43; A0 = 1.4 + 0.72*3.43 = 3.8696.
        [3.8696, 3.43, 1.5],
    ])
    advantages = gae(rewards, values, bootstrap, terminals, truncations, GAMMA, LAMBDA)
    assert advantages.dtype == torch.float32
    assert_close(advantages, expected)
    assert_close(returns_from_advantages(advantages, values), expected + values)


def test_gae_truncation_at_last_step_bootstraps():
    rewards, values = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0]])
    bootstrap = torch.tensor([4.0])
    truncations = torch.tensor([[False, True]])
    # d1 = 2 + 0.9*4.0 - 1.0 = 4.6 (bootstrap is the final obs value); d0 = 1 + 0.9*1.0 - 0.5 = 1.4;
    # A0 = 1.4 + 0.72*4.6 = 4.712 (t=0 itself did not end the episode, so it carries).
    advantages = gae(rewards, values, bootstrap, torch.zeros_like(truncations), truncations, GAMMA, LAMBDA)
    assert_close(advantages, torch.tensor([[4.712, 4.6]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("gamma", "lam"), [(0.99, 0.95), (0.9, 0.0), (0.97, 1.0)])
def test_gae_matches_per_element_reference(seed, gamma, lam):
    rewards, values, bootstrap, terminals, truncations, _ = _random_rollout(5, 23, seed)
    advantages = gae(rewards, values, bootstrap, terminals, truncations, gamma, lam)
    expected = _reference_gae(rewards, values, bootstrap, terminals, truncations, gamma, lam)
    assert_close(advantages, expected, rtol=1e-5, atol=1e-5)


def test_gae_accepts_float_flags():
    rewards, values, bootstrap, terminals, truncations, _ = _random_rollout(3, 11, seed=7)
    from_bool = gae(rewards, values, bootstrap, terminals, truncations, GAMMA, LAMBDA)
    from_float = gae(rewards, values, bootstrap, terminals.float(), truncations.float(), GAMMA, LAMBDA)
    assert_close(from_bool, from_float)


def test_gae_rejects_mismatched_shapes():
    rewards, values, bootstrap, terminals, truncations, _ = _random_rollout(3, 5, seed=0)
    with pytest.raises(ValueError, match="values"):
        gae(rewards, values.T, bootstrap, terminals, truncations, GAMMA, LAMBDA)
    with pytest.raises(ValueError, match="bootstrap"):
        gae(rewards, values, bootstrap[:2], terminals, truncations, GAMMA, LAMBDA)


def _sb3_advantages(rewards, values, bootstrap, terminals, gamma, lam) -> torch.Tensor:
    """Run SB3's RolloutBuffer GAE on our [rows, T] data and return advantages as [rows, T]."""
    pytest.importorskip("stable_baselines3")
    from gymnasium import spaces
    from stable_baselines3.common.buffers import RolloutBuffer

    rows, horizon = rewards.shape
    buffer = RolloutBuffer(horizon, spaces.Box(-1.0, 1.0, (1,), np.float32), spaces.Discrete(2),
                           device="cpu", gae_lambda=lam, gamma=gamma, n_envs=rows)
    buffer.rewards[:] = rewards.T.numpy()
    buffer.values[:] = values.T.numpy()
    # SB3: episode_starts[t] = 1 means obs_t begins an episode, i.e. the episode ended at step t-1.
    episode_starts = np.zeros((horizon, rows), dtype=np.float32)
    episode_starts[1:] = terminals[:, :-1].T.numpy()
    buffer.episode_starts[:] = episode_starts
    buffer.compute_returns_and_advantage(last_values=bootstrap.clone(), dones=terminals[:, -1].numpy())
    return torch.from_numpy(np.asarray(buffer.advantages, dtype=np.float32).T.copy())


@pytest.mark.parametrize("seed", [0, 1])
def test_gae_matches_stable_baselines3_terminals_only(seed):
    rewards, values, bootstrap, terminals, _, _ = _random_rollout(4, 17, seed, p_term=0.2)
    no_truncations = torch.zeros_like(terminals)
    advantages = gae(rewards, values, bootstrap, terminals, no_truncations, 0.99, 0.95)
    expected = _sb3_advantages(rewards, values, bootstrap, terminals, 0.99, 0.95)
    assert_close(advantages, expected, rtol=1e-5, atol=1e-5)


def test_gae_truncation_matches_stable_baselines3_reward_bootstrap():
    # SB3 handles a timeout by adding gamma * V(final obs) to the reward and ending the episode there.
    rewards, values, bootstrap, _, truncations, _ = _random_rollout(4, 17, seed=3, p_trunc=0.2)
    advantages = gae(rewards, values, bootstrap, torch.zeros_like(truncations), truncations, 0.99, 0.95)
    next_values = torch.cat([values[:, 1:], bootstrap[:, None]], dim=1)
    sb3_rewards = rewards + 0.99 * truncations.float() * next_values
    expected = _sb3_advantages(sb3_rewards, values, bootstrap, truncations, 0.99, 0.95)
    assert_close(advantages, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- V-trace


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_vtrace_on_policy_reduces_to_gae(seed, lam):
    rewards, values, bootstrap, terminals, truncations, _ = _random_rollout(5, 19, seed)
    on_policy = torch.zeros_like(rewards)
    pg, vs = vtrace(rewards, values, bootstrap, terminals, truncations, on_policy, GAMMA, lam, 1.0, 1.0)
    advantages = gae(rewards, values, bootstrap, terminals, truncations, GAMMA, lam)
    assert_close(vs - values, advantages, rtol=1e-5, atol=1e-5)
    # pg_t = delta_t + gamma * (1 - done_t) * A_{t+1}, with delta the one-step TD error (GAE at lambda=0).
    deltas = gae(rewards, values, bootstrap, terminals, truncations, GAMMA, 0.0)
    not_done = 1.0 - (terminals | truncations).float()
    next_advantages = torch.cat([advantages[:, 1:], torch.zeros_like(advantages[:, :1])], dim=1)
    assert_close(pg, deltas + GAMMA * not_done * next_advantages, rtol=1e-5, atol=1e-5)
    if lam == 1.0:
        assert_close(pg, advantages, rtol=1e-5, atol=1e-5)


def test_vtrace_hand_computed_with_clipping():
    # gamma=0.9, lambda=0.8, rho_clip=1.5, c_clip=1.0; pi/mu = [2.0, 0.5].
    # rho = [min(1.5, 2.0), min(1.5, 0.5)] = [1.5, 0.5]; c = 0.8 * [min(1, 2), min(1, 0.5)] = [0.8, 0.4].
    rewards, values = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0]])
    bootstrap = torch.tensor([2.0])
    log_rhos = torch.tensor([[math.log(2.0), math.log(0.5)]])
    flags = torch.zeros(1, 2, dtype=torch.bool)
    pg, vs = vtrace(rewards, values, bootstrap, flags, flags, log_rhos, 0.9, 0.8, 1.5, 1.0)
    # delta1 = 0.5 * (2 + 0.9*2.0 - 1.0) = 1.4          -> vs1 = 1.0 + 1.4 = 2.4
    # delta0 = 1.5 * (1 + 0.9*1.0 - 0.5) = 2.1
    # vs0 - V0 = 2.1 + 0.9 * c0 * (vs1 - V1) = 2.1 + 0.9*0.8*1.4 = 3.108 -> vs0 = 3.608
    # (without c clipping c0 would be 1.6 and vs0 = 4.616.)
    assert_close(vs, torch.tensor([[3.608, 2.4]]))
    # pg1 = 0.5 * (2 + 0.9*2.0 - 1.0) = 1.4;  pg0 = 1.5 * (1 + 0.9*vs1 - 0.5) = 1.5 * 2.66 = 3.99
    assert_close(pg, torch.tensor([[3.99, 1.4]]))


def test_vtrace_truncation_hand_computed():
    # Truncation at t=0, on-policy, lambda=1: no trace crosses the boundary, pg uses V_1 (final obs value).
    rewards, values = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0]])
    bootstrap = torch.tensor([2.0])
    truncations = torch.tensor([[True, False]])
    zeros = torch.zeros(1, 2)
    pg, vs = vtrace(rewards, values, bootstrap, zeros, truncations, zeros, 0.9, 1.0, 1.0, 1.0)
    # vs1 = 1.0 + (2 + 0.9*2.0 - 1.0) = 3.8; vs0 = 0.5 + (1 + 0.9*1.0 - 0.5) = 1.9 (no carry of vs1 - V1).
    assert_close(vs, torch.tensor([[1.9, 3.8]]))
    # pg0 = 1 + 0.9*V_1 - 0.5 = 1.4 (not 1 + 0.9*vs1 - 0.5); pg1 = 2 + 0.9*2.0 - 1.0 = 2.8.
    assert_close(pg, torch.tensor([[1.4, 2.8]]))


@pytest.mark.parametrize("seed", [0, 1])
def test_vtrace_lambda_one_on_policy_gives_discounted_returns(seed):
    rewards, values, bootstrap, terminals, _, _ = _random_rollout(4, 13, seed, p_term=0.15)
    no_truncations = torch.zeros_like(terminals)
    on_policy = torch.zeros_like(rewards)
    _, vs = vtrace(rewards, values, bootstrap, terminals, no_truncations, on_policy, 0.97, 1.0, 1.0, 1.0)
    assert_close(vs, _discounted_returns(rewards, bootstrap, terminals, 0.97), rtol=1e-5, atol=1e-5)
    # And with no episode ends at all it is the plain bootstrapped discounted return.
    no_flags = torch.zeros_like(terminals)
    _, vs = vtrace(rewards, values, bootstrap, no_flags, no_flags, on_policy, 0.97, 1.0, 1.0, 1.0)
    assert_close(vs, _discounted_returns(rewards, bootstrap, no_flags, 0.97), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("lam", "rho_clip", "c_clip"), [(1.0, 1.0, 1.0), (0.95, 1.0, 0.9), (0.9, 2.0, 1.2)])
def test_vtrace_matches_per_element_reference(seed, lam, rho_clip, c_clip):
    rewards, values, bootstrap, terminals, truncations, log_rhos = _random_rollout(5, 21, seed)
    pg, vs = vtrace(rewards, values, bootstrap, terminals, truncations, log_rhos, 0.98, lam, rho_clip, c_clip)
    ref_pg, ref_vs = _reference_vtrace(rewards, values, bootstrap, terminals, truncations, log_rhos, 0.98,
                                       lam, rho_clip, c_clip)
    assert_close(vs, ref_vs, rtol=1e-5, atol=1e-5)
    assert_close(pg, ref_pg, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ normalize


def test_normalize_excludes_and_zeroes_masked_entries():
    gen = torch.Generator().manual_seed(0)
    advantages = 3.0 + 2.0 * torch.randn(6, 50, generator=gen)
    mask = torch.rand(6, 50, generator=gen) < 0.7
    advantages[~mask] = 1e6  # would dominate the statistics if they leaked in
    out = normalize(advantages, mask=mask)
    assert torch.all(out[~mask] == 0.0)
    kept = out[mask].double()
    assert abs(kept.mean().item()) < 1e-5
    assert abs(kept.std(unbiased=False).item() - 1.0) < 1e-5
    selected = advantages[mask]
    expected = (advantages - selected.mean()) / (selected.std(unbiased=False) + 1e-8)
    assert_close(out[mask], expected[mask], rtol=1e-5, atol=1e-5)


def test_normalize_without_mask_uses_every_entry():
    advantages = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # mean 3, population std sqrt(3.5)
    expected = (advantages - 3.0) / (math.sqrt(3.5) + 1e-8)
    assert_close(normalize(advantages), expected)
    assert_close(moment_sums(advantages), torch.tensor([12.0, 50.0, 4.0], dtype=torch.float64))


def test_moment_sums_combine_across_shards():
    gen = torch.Generator().manual_seed(1)
    advantages = torch.randn(8, 16, generator=gen)
    mask = torch.rand(8, 16, generator=gen) < 0.6
    whole = moment_sums(advantages, mask)
    halves = moment_sums(advantages[:4], mask[:4]) + moment_sums(advantages[4:], mask[4:])
    assert_close(halves, whole)
    # Each "rank" normalising its shard with the combined sums matches normalising the whole batch.
    sharded = torch.cat([normalize(advantages[:4], halves, mask[:4]), normalize(advantages[4:], halves, mask[4:])])
    assert_close(sharded, normalize(advantages, mask=mask))


def test_normalize_with_empty_mask_returns_zeros():
    advantages = torch.randn(2, 3)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert torch.all(normalize(advantages, mask=mask) == 0.0)


def test_explained_variance_matches_stable_baselines3() -> None:
    from stable_baselines3.common.utils import explained_variance as sb3_explained_variance

    gen = torch.Generator().manual_seed(3)
    targets = torch.randn(500, generator=gen, dtype=torch.float64)
    values = 0.7 * targets + 0.3 * torch.randn(500, generator=gen, dtype=torch.float64)
    expected = float(sb3_explained_variance(values.numpy(), targets.numpy()))
    assert explained_variance(values, targets) == pytest.approx(expected, rel=1e-9)
    assert math.isnan(explained_variance(values, torch.full_like(targets, 2.0)))


def test_explained_variance_of_two_shards_equals_the_whole() -> None:
    gen = torch.Generator().manual_seed(4)
    targets, values = torch.randn(2, 300, generator=gen, dtype=torch.float64)
    shards = [(values[:100], targets[:100]), (values[100:], targets[100:])]
    other = [torch.stack([moment_sums(t), moment_sums(t - v)]) for v, t in shards]

    def all_reduce(local: torch.Tensor, index: int) -> torch.Tensor:
        return local + other[1 - index]

    whole = explained_variance(values, targets)
    for index, (v, t) in enumerate(shards):
        assert explained_variance(v, t, lambda sums, i=index: all_reduce(sums, i)) == pytest.approx(whole, rel=1e-9)
