"""Loss: one named term of the training objective, computed on a minibatch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from mettle.agent.policy import PolicyOutput

if TYPE_CHECKING:
    from mettle.rl.training.experience import Minibatch


class Loss(ABC):
    """A term of the objective; the trainer sums every loss's value before backward."""

    @abstractmethod
    def __call__(self, minibatch: Minibatch, output: PolicyOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the scalar loss and detached diagnostics (name -> scalar tensor)."""


def masked_mean(values: torch.Tensor, minibatch: Minibatch) -> torch.Tensor:
    """Mean over live steps ([n, T]), weighted by the minibatch's importance weights."""
    return (values * minibatch.loss_weights).sum()
