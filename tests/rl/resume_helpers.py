"""What the resume tests share: make a trainer checkpoint every epoch (optionally stopping early), and train it."""

from __future__ import annotations

from pathlib import Path

from mettle.rl.trainer import Trainer
from mettle.rl.training import ContextCheckpointer
from mettle.rl.training.components.signals import StopAtEpoch


def checkpointed(trainer: Trainer, directory: Path, stop: int | None = None) -> Trainer:
    """`trainer`, stopping after epoch `stop` (if given), checkpointing every epoch into `directory`, restored."""
    if stop is not None:
        trainer.register(StopAtEpoch(stop))
    trainer.register(ContextCheckpointer(directory, epoch_interval=1))
    trainer.restore()
    return trainer


def train_and_close(trainer: Trainer) -> Trainer:
    """Train to the end (or the stop epoch), closing the env either way."""
    try:
        trainer.train()
    finally:
        trainer.context.env.close()
    return trainer
