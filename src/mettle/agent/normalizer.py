"""Running feature statistics, and the observation normaliser a policy applies to its input.

Statistics are a count, a per-feature mean and M2 (the sum of squared deviations from the mean), kept in
float64 and merged a whole batch at a time with the parallel update of Chan, Golub and LeVeque, so a rollout's
statistics fold in at once and ranks' batches merge exactly. The policy owns the normaliser: its statistics are
buffers in policy.safetensors, so evaluation, play and any export apply them. Only the trainer changes them
(`merge`, once per epoch); a forward pass, in training or evaluation, only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CLIP = 10.0
"""Normalised values are clipped to [-CLIP, CLIP], as Stable-Baselines3's VecNormalize and CleanRL's wrappers do."""
EPSILON = 1e-8
"""Added to the variance before its square root, so a constant feature does not divide by zero."""
MAX_FEATURES = 1 << 24
"""Most features a normaliser may hold (the largest observation a policy spec may describe)."""


@dataclass(frozen=True)
class Moments:
    """Count, mean and M2 of a set of feature vectors, float64: what a batch adds to running statistics."""

    count: torch.Tensor
    """[] how many vectors."""
    mean: torch.Tensor
    """[F] their mean."""
    m2: torch.Tensor
    """[F] the sum of their squared deviations from `mean`."""

    @property
    def var(self) -> torch.Tensor:
        """[F] population variance (M2 / count); 1 for an empty set, so it scales nothing."""
        if float(self.count) == 0:
            return torch.ones_like(self.m2)
        return self.m2 / self.count


def empty_moments(features: int, device: torch.device | str = "cpu") -> Moments:
    """The statistics of no vectors at all."""
    zeros = torch.zeros(features, dtype=torch.float64, device=device)
    return Moments(torch.zeros((), dtype=torch.float64, device=device), zeros, zeros.clone())


def batch_moments(x: torch.Tensor) -> Moments:
    """Statistics of the rows of `x` [N, F] (computed in float64)."""
    x = x.to(torch.float64)
    if x.shape[0] == 0:
        return empty_moments(x.shape[1], x.device)
    mean = x.mean(dim=0)
    return Moments(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), mean,
                   (x - mean).square().sum(dim=0))


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The statistics of both sets together, from theirs alone (Chan et al.'s parallel update)."""
    count = a.count + b.count
    if float(count) == 0:
        return a
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / count)
    return Moments(count, mean, a.m2 + b.m2 + delta.square() * (a.count * b.count / count))


def shifted_sums(moments: Moments, shift: torch.Tensor) -> torch.Tensor:
    """[count, sum(x - shift), sum((x - shift)^2)] as one flat tensor: adding these from several sets (an
    all-reduce over ranks) gives the sums of their union, which `moments_from_sums` turns back into statistics.

    `shift` is any point the sets share (the running mean, the same on every rank); near the data it keeps the
    sums small, so nothing cancels."""
    offset = moments.mean - shift
    return torch.cat([moments.count.reshape(1), moments.count * offset, moments.m2 + moments.count * offset.square()])


def moments_from_sums(sums: torch.Tensor, shift: torch.Tensor) -> Moments:
    """Inverse of `shifted_sums` (for the same `shift`), also for the sums of several sets."""
    features = shift.numel()
    count, first, second = sums[0], sums[1 : 1 + features], sums[1 + features :]
    if float(count) == 0:
        return empty_moments(features, sums.device)
    offset = first / count
    return Moments(count, shift.to(torch.float64) + offset, (second - first * offset).clamp_min(0.0))


class ObservationNormalizer(nn.Module):
    """(x - mean) / sqrt(var + EPSILON), clipped to [-CLIP, CLIP], per feature of [N, F] input.

    The statistics (`count`, `mean`, `m2`) are float64 buffers, saved with the policy; the float32 `offset` and
    `scale` that forward uses are worked out from them whenever they change or are loaded. Before any statistics
    (count 0) the input passes through unchanged.
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    offset: torch.Tensor
    scale: torch.Tensor

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(features, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(features, dtype=torch.float64))
        self.register_buffer("offset", torch.zeros(features), persistent=False)
        self.register_buffer("scale", torch.ones(features), persistent=False)
        self.fitted = False
        """Whether there are statistics to apply (count > 0)."""
        self.register_load_state_dict_post_hook(_refresh_after_load)  # type: ignore[no-untyped-call]

    @property
    def moments(self) -> Moments:
        """The running statistics."""
        return Moments(self.count, self.mean, self.m2)

    @torch.no_grad()
    def merge(self, batch: Moments) -> None:
        """Fold a batch's statistics in (the trainer does, once per epoch; nothing else changes them)."""
        merged = merge_moments(self.moments, batch)
        self.count.copy_(merged.count)
        self.mean.copy_(merged.mean)
        self.m2.copy_(merged.m2)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Work out forward's float32 offset and scale from the statistics."""
        self.fitted = float(self.count) > 0
        moments = self.moments
        self.offset.copy_(moments.mean if self.fitted else torch.zeros_like(moments.mean))
        self.scale.copy_(torch.rsqrt(moments.var + EPSILON) if self.fitted else torch.ones_like(moments.mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised features [N, F] (the input itself before any statistics)."""
        if not self.fitted:
            return x
        return torch.clamp((x - self.offset) * self.scale, -CLIP, CLIP)

    def extra_repr(self) -> str:
        return f"features={self.features}, clip={CLIP}"


def _refresh_after_load(module: nn.Module, incompatible: Any) -> None:
    """Loaded statistics (a checkpoint, or the actor receiving the learner's weights) take effect at once."""
    assert isinstance(module, ObservationNormalizer)
    module.refresh()
