"""Advantage estimators (GAE, V-trace) and distributed-friendly advantage normalisation.

All sequence tensors are ``[rows, T]`` with time along the last dimension. ``rewards[:, t]``,
``terminals[:, t]`` and ``truncations[:, t]`` describe the transition caused by the action at step t;
``values[:, t]`` is V(obs_t) and ``bootstrap[:]`` is V(obs_T), the observation after the last step.

Episode ends are "next-step" style: when an episode ends at step t, obs_{t+1} is that episode's final
observation (the step t+1 is masked out of the loss by the caller) and the reset observation is obs_{t+2}.
Hence a terminal step never bootstraps, a truncated step bootstraps from V_{t+1} (the final observation's
value, or ``bootstrap`` when t = T-1), and no estimator carries information backwards across either.

The functions are stateless and do not detach: pass detached values when no gradient is wanted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["explained_variance", "gae", "moment_sums", "normalize", "returns_from_advantages", "vtrace"]


def _check_shapes(rewards: torch.Tensor, bootstrap: torch.Tensor, **others: torch.Tensor) -> None:
    """Fail loudly on layout mistakes, which would otherwise broadcast into silently wrong advantages."""
    if rewards.dim() != 2:
        raise ValueError(f"expected [rows, T] tensors, got rewards of shape {tuple(rewards.shape)}")
    for name, tensor in others.items():
        if tensor.shape != rewards.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(rewards.shape)}")
    if bootstrap.shape != rewards.shape[:1]:
        raise ValueError(f"bootstrap has shape {tuple(bootstrap.shape)}, expected ({rewards.shape[0]},)")


def _next_values(values: torch.Tensor, bootstrap: torch.Tensor) -> torch.Tensor:
    """V(obs_{t+1}) for every t, so per-step TD errors can be formed without special-casing t = T-1."""
    return torch.cat([values[:, 1:], bootstrap.unsqueeze(1).to(values.dtype)], dim=1)


def _reverse_scan(deltas: torch.Tensor, decays: torch.Tensor) -> torch.Tensor:
    """x_t = deltas_t + decays_t * x_{t+1} backwards along time, with x_T = 0: the recursion of both estimators.

    Time-major copies make each step one fused multiply-add written in place, not a handful of strided ops.
    """
    deltas_by_step, decays_by_step = deltas.t().contiguous(), decays.t().contiguous()
    out = torch.empty_like(deltas_by_step)
    running = torch.zeros_like(deltas_by_step[0])
    for delta, decay, step_out in zip(
        reversed(deltas_by_step.unbind()), reversed(decays_by_step.unbind()), reversed(out.unbind()), strict=True
    ):
        running = torch.addcmul(delta, decay, running, out=step_out)
    return out.t().contiguous()


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap: torch.Tensor,
    terminals: torch.Tensor,
    truncations: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """Generalised Advantage Estimation: trades bias for variance in the policy-gradient signal.

    delta_t = r_t + gamma * (1 - term_t) * V_{t+1} - V_t and
    A_t = delta_t + gamma * lambda * (1 - term_t) * (1 - trunc_t) * A_{t+1}, with A_T = 0 and
    V_T = ``bootstrap``. Returns advantages shaped like ``rewards``.
    """
    _check_shapes(rewards, bootstrap, values=values, terminals=terminals, truncations=truncations)
    not_term = 1.0 - terminals.to(values.dtype)
    carry = not_term * (1.0 - truncations.to(values.dtype))
    deltas = rewards + gamma * not_term * _next_values(values, bootstrap) - values

    return _reverse_scan(deltas, (gamma * gae_lambda) * carry)


def vtrace(
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap: torch.Tensor,
    terminals: torch.Tensor,
    truncations: torch.Tensor,
    log_rhos: torch.Tensor,
    gamma: float,
    gae_lambda: float,
    rho_clip: float,
    c_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """V-trace (Espeholt et al., 2018): off-policy-corrected value targets and advantages for stale data.

    With rho_t = min(rho_clip, pi/mu), c_t = lambda * min(c_clip, pi/mu) and done_t = term_t or trunc_t:
    delta_t = rho_t * (r_t + gamma * (1 - term_t) * V_{t+1} - V_t),
    vs_t - V_t = delta_t + gamma * c_t * (1 - done_t) * (vs_{t+1} - V_{t+1}), with vs_T = V_T = ``bootstrap``;
    pg_t = rho_t * (r_t + gamma * (1 - term_t) * vs'_{t+1} - V_t), where vs'_{t+1} is vs_{t+1} inside an
    episode and V_{t+1} (the final observation's value, or ``bootstrap``) after a truncation.

    On-policy (log_rhos = 0, rho_clip >= 1, c_clip >= 1) ``vs - V`` equals ``gae(...)`` and
    pg_t = delta_t + gamma * (1 - done_t) * A_{t+1}, i.e. the GAE advantage with the trace after the first
    step taken at lambda = 1 (so pg equals GAE exactly when lambda = 1). Returns (pg_advantages, vs).
    """
    _check_shapes(
        rewards, bootstrap, values=values, terminals=terminals, truncations=truncations, log_rhos=log_rhos
    )
    not_term = 1.0 - terminals.to(values.dtype)
    not_done = not_term * (1.0 - truncations.to(values.dtype))
    ratios = log_rhos.to(values.dtype).exp()
    rhos = ratios.clamp(max=rho_clip)
    cs = gae_lambda * ratios.clamp(max=c_clip)
    next_values = _next_values(values, bootstrap)
    deltas = rhos * (rewards + gamma * not_term * next_values - values)

    vs_minus_v = _reverse_scan(deltas, gamma * cs * not_done)
    value_targets = values + vs_minus_v

    # vs'_{t+1}: the trace correction of step t+1 only applies when step t did not end the episode.
    next_correction = torch.cat([vs_minus_v[:, 1:], torch.zeros_like(vs_minus_v[:, :1])], dim=1)
    next_vs = next_values + not_done * next_correction
    pg_advantages = rhos * (rewards + gamma * not_term * next_vs - values)
    return pg_advantages, value_targets


def returns_from_advantages(advantages: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Value-function regression targets (the lambda-returns) implied by GAE advantages."""
    return advantages + values


def moment_sums(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Additive statistics ``[sum, sum_of_squares, count]`` (float64) that ranks can all-reduce with SUM.

    Only entries where ``mask`` is True contribute (all entries if ``mask`` is None). float64 keeps the
    later ``E[x^2] - E[x]^2`` free of catastrophic cancellation.
    """
    values = x.detach().to(torch.float64)
    if mask is None:
        selected = values.reshape(-1)
    else:
        if mask.shape != x.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(x.shape)}")
        selected = values[mask.to(torch.bool)]
    count = torch.tensor(float(selected.numel()), dtype=torch.float64, device=x.device)
    return torch.stack([selected.sum(), selected.square().sum(), count])


def normalize(
    advantages: torch.Tensor,
    sums: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Zero-mean, unit-std advantages so the policy step size does not depend on the reward scale.

    Uses ``sums`` from :func:`moment_sums` (possibly all-reduced across ranks) or, if None, the local
    ``moment_sums(advantages, mask)``. Computes (x - mean) / (std + eps) with the population std over the
    selected entries; entries where ``mask`` is False are returned as 0.
    """
    if sums is None:
        sums = moment_sums(advantages, mask)
    total, total_sq, count = sums.to(torch.float64).unbind()
    count = count.clamp(min=1.0)
    mean = total / count
    std = (total_sq / count - mean.square()).clamp(min=0.0).sqrt()
    normalized = (advantages - mean.to(advantages.dtype)) / (std.to(advantages.dtype) + eps)
    if mask is None:
        return normalized
    return torch.where(mask.to(torch.bool), normalized, torch.zeros_like(normalized))


def explained_variance(
    values: torch.Tensor,
    targets: torch.Tensor,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """``1 - Var(targets - values) / Var(targets)``; nan when the targets do not vary.

    ``all_reduce_sum`` (e.g. a rank all-reduce) combines the moment sums of several processes first, so
    the figure covers the global batch rather than one rank's share.
    """
    sums = torch.stack([moment_sums(targets), moment_sums(targets - values)])
    if all_reduce_sum is not None:
        sums = all_reduce_sum(sums)
    (t_sum, t_sq, count), (r_sum, r_sq, _) = sums.tolist()
    if count < 2:
        return float("nan")
    var_targets = t_sq / count - (t_sum / count) ** 2
    var_residual = r_sq / count - (r_sum / count) ** 2
    return float("nan") if var_targets <= 1e-12 * max(1.0, t_sq / count) else 1.0 - var_residual / var_targets
