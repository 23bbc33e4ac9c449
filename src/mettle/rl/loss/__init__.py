"""Loss terms; the trainer sums those the config enables and those added with `Trainer.add_loss`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mettle.rl.loss.base import Loss, RolloutBatch, masked_mean
from mettle.rl.loss.kickstarter import Kickstarter
from mettle.rl.loss.ppo_actor import PPOActorLoss
from mettle.rl.loss.ppo_critic import PPOCriticLoss

if TYPE_CHECKING:
    from mettle.rl.loss.trainer_view import TrainerView

__all__ = ["Kickstarter", "Loss", "PPOActorLoss", "PPOCriticLoss", "RolloutBatch", "losses_from_config",
           "masked_mean"]


def losses_from_config(context: TrainerView) -> list[Loss]:
    """The losses `trainer.losses` enables, in a fixed order (PPO actor, PPO critic, kickstarter)."""
    cfg = context.config
    chosen = cfg.losses
    losses: list[Loss] = []
    if chosen.ppo_actor.enabled:
        losses.append(PPOActorLoss(cfg.ppo, context.state.hyperparameters))
    if chosen.ppo_critic.enabled:
        losses.append(PPOCriticLoss(cfg.ppo))
    if chosen.kickstarter.enabled:
        losses.append(Kickstarter.from_config(chosen.kickstarter, context))
    return losses
