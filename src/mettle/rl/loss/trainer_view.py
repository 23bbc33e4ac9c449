"""What losses read from the trainer, as protocols: losses sit below the training loop and never import it.

`mettle.rl.training.context.ComponentContext` and `TrainerState` satisfy these by their fields alone.
"""

from __future__ import annotations

from typing import Protocol

import torch

from mettle.contracts import TrainingEnvironment
from mettle.rl.hyperparameters import Hyperparameters
from mettle.rl.trainer_config import TrainerConfig


class TrainingProgress(Protocol):
    """The live counters a loss reads as training goes (TrainerState is one)."""

    @property
    def agent_step(self) -> int:
        """Agent steps taken so far, summed over every rank."""

    @property
    def hyperparameters(self) -> Hyperparameters:
        """What schedules and the autotuner set, read at each update."""


class TrainerView(Protocol):
    """What building the configured losses reads from the trainer (ComponentContext is one)."""

    @property
    def config(self) -> TrainerConfig:
        """What was asked, read-only."""

    @property
    def state(self) -> TrainingProgress:
        """The live counters and hyperparameters."""

    @property
    def device(self) -> torch.device:
        """Where the learner's tensors live."""

    @property
    def env(self) -> TrainingEnvironment:
        """The training environment (its spaces, for a teacher that must read them)."""

    @property
    def rollout_agent_steps(self) -> int:
        """Agent steps one rollout adds, all ranks."""
