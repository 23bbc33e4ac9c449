"""Shared handles for components (ComponentContext) and the serialisable progress (TrainerState)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mettle.rl.hyperparameters import Hyperparameters
from mettle.rl.trainer_config import TrainerConfig

if TYPE_CHECKING:
    from mettle.agent.policy import Policy
    from mettle.profiling.stopwatch import Stopwatch
    from mettle.rl.training.collector import RolloutSource
    from mettle.rl.training.component import TrainerComponent
    from mettle.rl.training.core import CoreTrainingLoop
    from mettle.rl.training.distributed import DistributedHelper
    from mettle.rl.training.environment import TrainingEnvironment
    from mettle.rl.training.experience import Experience


def _default_hyperparameters() -> Hyperparameters:
    """The defaults of TrainerConfig, for a TrainerState built without a config (tests, tools)."""
    return Hyperparameters.from_config(TrainerConfig())


@dataclass
class TrainerState:
    """Progress counters and live hyperparameters that survive a restart; plain values only."""

    agent_step: int = 0
    """Agent steps taken so far, summed over every rank."""
    epoch: int = 0
    """Completed epochs (rollout + update)."""
    hyperparameters: Hyperparameters = field(default_factory=_default_hyperparameters)
    """What schedules and the autotuner set; the Trainer starts it from its config."""

    def state_dict(self) -> dict[str, Any]:
        """Plain-container copy for checkpoints."""
        return {"agent_step": self.agent_step, "epoch": self.epoch,
                "hyperparameters": self.hyperparameters.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; checkpoints from before hyperparameters were kept leave them as they are."""
        agent_step, epoch = int(state["agent_step"]), int(state["epoch"])
        if "hyperparameters" in state:
            self.hyperparameters.load_state_dict(state["hyperparameters"])
        self.agent_step, self.epoch = agent_step, epoch


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
    """What was asked, read-only (frozen); values that change during training are in `state.hyperparameters`."""
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
    core_loop: CoreTrainingLoop | None = None
    """Advantages and the update, set by the Trainer: its losses' update state goes into checkpoints."""
    rollouts: RolloutSource | None = None
    """Where rollouts come from (a Collector, or the overlapped actor), set by the Trainer: its state (env,
    held decisions, memory, the losses' rollout state) goes into checkpoints."""

    @property
    def rollout_agent_steps(self) -> int:
        """Agent steps one rollout adds to `state.agent_step` (every rank's buffer)."""
        return self.experience.batch_size * self.distributed.get_world_size()
