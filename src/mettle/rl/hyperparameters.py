"""The config values a run moves as it goes (schedules, the autotuner), kept apart from the frozen config.

They live here, beside the config they start from, so that losses read them without reaching into the loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mettle.rl.trainer_config import TrainerConfig


@dataclass
class Hyperparameters:
    """The config values that schedules and the autotuner move during a run; the loop and losses read them here."""

    learning_rate: float
    """Optimizer step size; the core loop writes it to every param group before each update (0 allowed)."""
    entropy_coef: float
    """Weight of the PPO entropy bonus."""
    clip_coef: float
    """PPO policy ratio clip range."""
    update_epochs: int
    """Passes over the batch in the next update."""

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> Hyperparameters:
        """The starting values, as the (read-only) config asks."""
        return cls(learning_rate=cfg.optimizer.learning_rate, entropy_coef=cfg.ppo.entropy_coef,
                   clip_coef=cfg.ppo.clip_coef, update_epochs=cfg.update_epochs)

    def state_dict(self) -> dict[str, float | int]:
        """Plain-container copy for checkpoints."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore in place (losses hold this object), all fields or none."""
        values = (float(state["learning_rate"]), float(state["entropy_coef"]), float(state["clip_coef"]),
                  int(state["update_epochs"]))
        self.learning_rate, self.entropy_coef, self.clip_coef, self.update_epochs = values
