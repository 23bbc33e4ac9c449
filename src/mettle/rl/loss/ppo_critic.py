"""The PPO critic term: squared error to the returns, optionally clipped around the rollout value."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mettle.agent.policy import PolicyOutput
from mettle.rl.loss.base import Loss, masked_mean
from mettle.rl.trainer_config import PPOConfig

if TYPE_CHECKING:
    from mettle.rl.minibatch import Minibatch


class PPOCriticLoss(Loss):
    """Value regression; clipping keeps the critic from moving far from the values it acted on."""

    name = "ppo_critic"

    def __init__(self, cfg: PPOConfig) -> None:
        self.cfg = cfg

    def __call__(self, minibatch: Minibatch, output: PolicyOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        value_loss = masked_mean(self._value_loss(output.values, minibatch), minibatch)
        return self.cfg.value_coef * value_loss, {"value_loss": value_loss.detach()}

    def _value_loss(self, values: torch.Tensor, minibatch: Minibatch) -> torch.Tensor:
        unclipped = (values - minibatch.returns).pow(2)
        if not self.cfg.clip_value_loss:
            return 0.5 * unclipped
        old = minibatch.data["values"]
        clipped_values = old + (values - old).clamp(-self.cfg.value_clip_coef, self.cfg.value_clip_coef)
        clipped = (clipped_values - minibatch.returns).pow(2)
        return 0.5 * torch.maximum(unclipped, clipped)
