"""Shared handles for components (ComponentContext) and the serialisable progress (TrainerState)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mettle.agent.policy import Policy
    from mettle.profiling.stopwatch import Stopwatch
    from mettle.rl.trainer_config import TrainerConfig
    from mettle.rl.training.component import TrainerComponent
    from mettle.rl.training.distributed import DistributedHelper
    from mettle.rl.training.environment import TrainingEnvironment
    from mettle.rl.training.experience import Experience


@dataclass
class TrainerState:
    """Progress counters that survive a restart; plain values only."""

    agent_step: int = 0
    """Agent steps taken so far, summed over every rank."""
    epoch: int = 0
    """Completed epochs (rollout + update)."""

    def state_dict(self) -> dict[str, int]:
        """Plain-container copy for checkpoints."""
        return {"agent_step": self.agent_step, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters saved by `state_dict`."""
        self.agent_step = int(state["agent_step"])
        self.epoch = int(state["epoch"])


@dataclass
class EpochStats:
    """What the last epoch produced, for components to report."""

    episodes: list[dict[str, Any]] = field(default_factory=list)
    """Infos of the episodes that finished during the last rollout (all ranks)."""
    losses: dict[str, float] = field(default_factory=dict)
    """Mean loss terms and diagnostics of the last update (policy_loss, approx_kl, ...)."""
    steps_per_second: float = 0.0
    """Agent steps per second over the last epoch, all ranks."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Figures components publish for reporters (eval/, monitor/, gradients/); the StatsReporter logs, then clears."""


@dataclass
class ComponentContext:
    """Live handles every component can use; built once by the Trainer."""

    config: TrainerConfig
    state: TrainerState
    policy: Policy
    env: TrainingEnvironment
    experience: Experience
    optimizer: torch.optim.Optimizer
    stopwatch: Stopwatch
    distributed: DistributedHelper
    device: torch.device
    run_name: str | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    """Drives minibatch shuffling and sampling, so that it is checkpointed and resumed exactly."""
    stats: EpochStats = field(default_factory=EpochStats)
    components: list[TrainerComponent] = field(default_factory=list)
    """Registered components in callback order (their state goes into checkpoints)."""
    stop_requested: bool = False
    """Set (by a signal handler or any component) to end training cleanly after the current epoch."""
    lr_scheduler: Any = None
    """An optional learning-rate scheduler stepped once per epoch (set by a schedule component)."""
