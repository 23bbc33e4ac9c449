"""The PPO actor term: clipped surrogate objective plus entropy bonus."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mettle.agent.policy import PolicyOutput
from mettle.rl.loss.base import Loss, masked_mean
from mettle.rl.trainer_config import PPOConfig

if TYPE_CHECKING:
    from mettle.rl.hyperparameters import Hyperparameters
    from mettle.rl.minibatch import Minibatch


class PPOActorLoss(Loss):
    """Pessimistic (clipped) policy-gradient loss; reads coefficients live so schedules can move them."""

    name = "ppo_actor"

    def __init__(self, cfg: PPOConfig, hyperparameters: Hyperparameters | None = None) -> None:
        self.cfg = cfg
        self.hyperparameters = hyperparameters
        """The trainer's live values (entropy and clip coefficients); None: the config's, fixed."""

    @property
    def clip_coef(self) -> float:
        """The clip range in force now."""
        return self.cfg.clip_coef if self.hyperparameters is None else self.hyperparameters.clip_coef

    @property
    def entropy_coef(self) -> float:
        """The entropy bonus weight in force now."""
        return self.cfg.entropy_coef if self.hyperparameters is None else self.hyperparameters.entropy_coef

    def __call__(self, minibatch: Minibatch, output: PolicyOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        log_ratio = output.log_prob - minibatch.data["log_probs"]
        ratio = log_ratio.exp()
        policy_loss = masked_mean(self._policy_loss(ratio, minibatch.advantages), minibatch)
        entropy = masked_mean(output.entropy, minibatch)
        with torch.no_grad():
            approx_kl = masked_mean((ratio - 1.0) - log_ratio, minibatch)
            clipfrac = masked_mean(((ratio - 1.0).abs() > self.clip_coef).float(), minibatch)
        metrics = {"policy_loss": policy_loss.detach(), "entropy": entropy.detach(),
                   "approx_kl": approx_kl, "clipfrac": clipfrac}
        return policy_loss - self.entropy_coef * entropy, metrics

    def _policy_loss(self, ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        clip = self.clip_coef
        clipped = ratio.clamp(1.0 - clip, 1.0 + clip)
        return torch.maximum(-advantages * ratio, -advantages * clipped)
