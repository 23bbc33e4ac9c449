"""A minibatch of whole rollout segments: what every loss reads, made by the rollout buffer's sampler."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class Minibatch:
    """A set of whole segments and the training targets for them."""

    indices: torch.Tensor
    """Segment indices into the buffer, [n]."""
    data: dict[str, torch.Tensor]
    """Every stored field for those segments, [n, T, ...]."""
    advantages: torch.Tensor
    returns: torch.Tensor
    weights: torch.Tensor
    """Importance weights of prioritised sampling ([n, 1]; ones when sampling is uniform)."""
    step_weights: torch.Tensor | None = None
    """`loss_weights` when worked out ahead (for all of a pass's minibatches at once); None: on first use."""

    def rows(self, rows: slice) -> Minibatch:
        """The segments at positions `rows` of this minibatch, as views (weights are per minibatch, kept whole)."""
        data = {name: tensor[rows] for name, tensor in self.data.items()}
        return Minibatch(self.indices[rows], data, self.advantages[rows], self.returns[rows], self.weights)

    @functools.cached_property
    def loss_weights(self) -> torch.Tensor:
        """Per-step weights of a loss mean, [n, T]: live steps times importance weights, summing to one."""
        if self.step_weights is not None:
            return self.step_weights
        weight = self.data["mask"].to(self.weights.dtype) * self.weights
        return weight / weight.sum().clamp_min(1e-8)
