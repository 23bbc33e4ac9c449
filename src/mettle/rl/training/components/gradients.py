"""GradientReporter: norm, mean and variance of the policy's gradients after an update."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from mettle.rl.training.component import TrainerComponent


class GradientConfig(BaseModel):
    """Whether and how often to report gradient statistics."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    enabled: bool = False
    """Report gradients/norm, gradients/mean and gradients/variance (of the update's last minibatch)."""
    interval: int = Field(1, ge=1)
    """Epochs between reports."""
    per_layer: bool = False
    """Also report the L2 norm of every parameter's gradient (gradients/norm/<parameter name>)."""


class GradientReporter(TrainerComponent):
    """Statistics of every policy gradient entry at epoch end, in `latest` under gradients/ keys.

    The update zeroes gradients before each minibatch and clips them in place before the
    optimizer step, so what remains in `param.grad` at epoch end, and what this describes, is
    the last minibatch's gradient after clipping (its norm is at most `ppo.max_grad_norm`; the
    mean pre-clip norm over all minibatches is loss/grad_norm). Mean and (population)
    variance are over all entries of all gradients taken as one vector.
    """

    master_only = True

    def __init__(self, epoch_interval: int = 1, per_layer: bool = False) -> None:
        super().__init__(epoch_interval)
        self.per_layer = per_layer
        self.latest: dict[str, float] = {}

    def on_epoch_end(self, epoch: int) -> None:
        """Measure the gradients the update left behind."""
        named = [(name, p.grad) for name, p in self.context.policy.named_parameters() if p.grad is not None]
        self.latest = gradient_stats(named, self.per_layer)
        self.context.stats.metrics.update(self.latest)


def gradient_stats(named_grads: list[tuple[str, torch.Tensor]], per_layer: bool = False) -> dict[str, float]:
    """Global L2 norm, mean and variance of all entries (two passes in float64, no concatenated copy)."""
    grads = [grad.detach() for _, grad in named_grads]
    count = sum(grad.numel() for grad in grads)
    if count == 0:
        return {}
    total = torch.stack([grad.sum(dtype=torch.float64) for grad in grads]).sum()
    mean = total / count
    squares = torch.stack([grad.double().square().sum() for grad in grads]).sum()
    deviations = torch.stack([(grad.double() - mean).square().sum() for grad in grads]).sum()
    values = torch.stack([squares.sqrt(), mean, deviations / count]).tolist()  # one device sync
    metrics = {"gradients/norm": values[0], "gradients/mean": values[1], "gradients/variance": values[2]}
    if per_layer:
        norms = torch.stack([grad.double().norm() for grad in grads]).tolist()
        metrics.update({f"gradients/norm/{name}": norm for (name, _), norm in zip(named_grads, norms, strict=True)})
    return metrics
