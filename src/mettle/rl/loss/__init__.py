"""Loss terms; the trainer sums those it is given."""

from mettle.rl.loss.base import Loss, masked_mean
from mettle.rl.loss.ppo_actor import PPOActorLoss
from mettle.rl.loss.ppo_critic import PPOCriticLoss

__all__ = ["Loss", "PPOActorLoss", "PPOCriticLoss", "masked_mean"]
