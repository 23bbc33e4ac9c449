"""Component state in a checkpoint reaches components registered after restore(), and unclaimed state is named."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mettle.agent.registry import build_policy
from mettle.envs.testing import BanditEnvironment
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import ContextCheckpointer, TrainerComponent


class EpochCounter(TrainerComponent):
    """Counts the epochs it has seen; its count is checkpointed."""

    def __init__(self) -> None:
        super().__init__(epoch_interval=1)
        self.seen = 0

    def on_epoch_end(self, epoch: int) -> None:
        self.seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])


def config(epochs: int) -> TrainerConfig:
    return TrainerConfig(total_timesteps=epochs * 64, batch_size=64, minibatch_size=32, bptt_horizon=8,
                         update_epochs=1, seed=1)


def train_with_counter(path: Path, epochs: int) -> None:
    trainer = Trainer(config(epochs), BanditEnvironment(num_envs=4), build_policy("mlp", hidden_size=8), "cpu")
    trainer.register(EpochCounter())
    trainer.register(ContextCheckpointer(path, epoch_interval=1))
    trainer.train()


def test_a_component_registered_after_load_or_create_gets_its_saved_state(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    train_with_counter(tmp_path, epochs=3)
    trainer = Trainer.load_or_create(str(tmp_path), config(5), BanditEnvironment(num_envs=4),
                                     build_policy("mlp", hidden_size=8), "cpu")
    assert trainer.context.state.epoch == 3
    counter = trainer.register(EpochCounter())
    assert isinstance(counter, EpochCounter) and counter.seen == 3
    trainer.train()
    assert counter.seen == 5


def test_state_no_registered_component_claims_is_named_when_training_starts(tmp_path: Path, caplog: Any) -> None:
    torch.set_num_threads(1)
    train_with_counter(tmp_path, epochs=2)
    trainer = Trainer.load_or_create(str(tmp_path), config(3), BanditEnvironment(num_envs=4),
                                     build_policy("mlp", hidden_size=8), "cpu")
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "state for component 'EpochCounter'" in caplog.text and "ignored" in caplog.text
