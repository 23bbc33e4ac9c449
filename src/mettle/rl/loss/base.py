"""Loss: one named term of the training objective, with hooks to store rollout data and carry state."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mettle.agent.policy import PolicyOutput, TensorSpec

if TYPE_CHECKING:
    from mettle.rl.minibatch import Minibatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutBatch:
    """What the policy saw at one rollout step for a batch of agent rows (tensors on the rollout's device)."""

    rows: slice
    """The agent rows these are (a recurrent helper keeps per-row memory by them)."""
    observations: torch.Tensor
    """[n, ...] as the policy took them."""
    starts: torch.Tensor
    """[n] bool: the step is an episode's first."""
    mask: torch.Tensor
    """[n] bool: the row holds a live agent."""
    agent_step: int
    """The agent step (all ranks) at which this rollout began; the update on it sees one rollout's more."""


class Loss:
    """A term of the objective; the trainer sums every loss's value before backward.

    Hooks run in this order each epoch: `on_rollout_step` for every step of the rollout (in the actor
    process when `overlap` is on, so it must only touch rollout-side state), then `__call__` for every
    minibatch, then `on_update_end`. Two kinds of state are checkpointed: `state_dict` (the update's) and
    `rollout_state_dict` (what `on_rollout_step` carries between steps, e.g. a teacher's recurrent memory).
    """

    name: ClassVar[str] = "loss"
    """Unique among a trainer's losses: names its metrics (loss/<name>/...) and its checkpointed state."""

    def experience_spec(self) -> dict[str, TensorSpec]:
        """Extra per-step fields (shape without batch dimensions, dtype) that `on_rollout_step` fills."""
        return {}

    def on_rollout_step(self, batch: RolloutBatch, output: PolicyOutput) -> dict[str, torch.Tensor]:
        """This step's values ([n, *shape]) of every field in `experience_spec`, as new tensors; runs under
        inference_mode, where rollouts run (in the actor process with overlap: read the step from
        `batch.agent_step`, not from the trainer's state, which the actor does not follow)."""
        return {}

    def __call__(self, minibatch: Minibatch, output: PolicyOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar term to minimise and detached diagnostics (name -> scalar tensor)."""
        raise NotImplementedError(f"{type(self).__name__} must define __call__(minibatch, output)")

    def on_update_end(self) -> None:
        """Called once the update epochs of an epoch are done (e.g. to advance a schedule)."""

    def state_dict(self) -> dict[str, Any]:
        """The update side's state, saved in checkpoints so resume is exact (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def rollout_state_dict(self) -> dict[str, Any]:
        """The rollout side's state (taken where rollouts run), saved in checkpoints."""
        return {}

    def load_rollout_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `rollout_state_dict` returned."""


def masked_mean(values: torch.Tensor, minibatch: Minibatch) -> torch.Tensor:
    """Mean over live steps ([n, T]), weighted by the minibatch's importance weights."""
    return (values * minibatch.loss_weights).sum()


def load_loss_states(losses: Sequence[Loss], saved: dict[str, Any], rollout: bool) -> None:
    """Hand each loss its saved update (or `rollout`) state; a loss with state but none saved starts fresh (said)."""
    kind = "rollout_state_dict" if rollout else "state_dict"
    for loss in losses:
        load, current = ((loss.load_rollout_state_dict, loss.rollout_state_dict) if rollout
                         else (loss.load_state_dict, loss.state_dict))
        if loss.name in saved:
            load(saved[loss.name])
        elif current():
            logger.warning("the checkpoint holds no %s for loss %r (added since it was written): it starts fresh",
                           kind, loss.name)
    for name in sorted(set(saved) - {loss.name for loss in losses}):
        logger.warning("the checkpoint holds a %s for loss %r, which this run does not have: it is ignored",
                       kind, name)
