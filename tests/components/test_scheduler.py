"""Schedules: hand-computed values, live application in a Trainer, and exact continuation after resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mettle.agent.registry import build_policy
from mettle.envs.testing import BanditEnvironment
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import ContextCheckpointer, TrainerComponent
from mettle.rl.training.components.scheduler import HyperparameterScheduler, Schedule, SchedulesConfig
from mettle.rl.training.components.signals import StopAtEpoch

BATCH = 64
EPOCHS = 6
LR = Schedule(kind="linear", start=0.01, end=0.0)
ENTROPY = Schedule(kind="linear", start=0.0, end=0.03)
CLIP = Schedule(kind="cosine", start=0.3, end=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- pure values
@pytest.mark.parametrize(
    "schedule,step,expected",
    [
        (Schedule(kind="constant", start=0.5), 0, 0.5),
        (Schedule(kind="constant", start=0.5), 10_000, 0.5),
        (Schedule(kind="linear", start=1.0, end=0.0), 0, 1.0),
        (Schedule(kind="linear", start=1.0, end=0.0), 25, 0.75),
        (Schedule(kind="linear", start=1.0, end=0.0), 50, 0.5),
        (Schedule(kind="linear", start=1.0, end=0.0), 100, 0.0),
        (Schedule(kind="linear", start=1.0, end=0.0), 150, 0.0),
        (Schedule(kind="linear", start=1.0, end=0.0), -10, 1.0),
        (Schedule(kind="linear", start=0.2, end=0.6), 75, 0.5),
        (Schedule(kind="cosine", start=1.0, end=0.0), 0, 1.0),
        (Schedule(kind="cosine", start=1.0, end=0.0), 25, (1 + math.sqrt(0.5)) / 2),
        (Schedule(kind="cosine", start=1.0, end=0.0), 50, 0.5),
        (Schedule(kind="cosine", start=1.0, end=0.0), 75, (1 - math.sqrt(0.5)) / 2),
        (Schedule(kind="cosine", start=1.0, end=0.0), 100, 0.0),
        (Schedule(kind="cosine", start=0.1, end=0.3), 50, 0.2),
        (Schedule(kind="cosine", start=0.1, end=0.3), 200, 0.3),
    ],
)
def test_schedule_values(schedule: Schedule, step: int, expected: float) -> None:
    assert schedule.value(step, 100) == pytest.approx(expected, abs=1e-12)


def test_values_never_leave_the_start_end_range() -> None:
    schedules = [Schedule(kind="cosine", start=1.0, end=0.1), Schedule(kind="linear", start=0.1, end=1.0),
                 Schedule(kind="cosine", start=0.3, end=0.7)]
    for schedule in schedules:
        low, high = schedule.bounds
        assert all(low <= schedule.value(step, 997) <= high for step in range(0, 1000, 7))


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="constant", start=0.1, end=0.2), dict(kind="linear", start=0.1), dict(kind="cosine", start=-1.0, end=0),
     dict(kind="linear", start=float("nan"), end=0.0), dict(kind="exponential", start=1.0, end=0.0),
     dict(kind="constant", start=1.0, warmup=3)],
)
def test_malformed_schedules_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Schedule(**kwargs)


def test_schedules_are_checked_against_their_targets_bounds() -> None:
    HyperparameterScheduler(learning_rate=Schedule(kind="linear", start=3e-4, end=0.0))  # lr 0 only on the optimizer
    with pytest.raises(ValueError, match="clip_coef"):
        HyperparameterScheduler(clip_coef=Schedule(kind="linear", start=0.2, end=0.0))
    with pytest.raises(ValueError, match="clip_coef"):
        SchedulesConfig(clip_coef={"kind": "constant", "start": 1.5})
    with pytest.raises(ValueError, match="learning_rate"):
        SchedulesConfig(learning_rate={"kind": "cosine", "start": 2.0, "end": 0.1})
    with pytest.raises(ValueError):
        SchedulesConfig(momentum={"kind": "constant", "start": 0.9})  # type: ignore[call-arg]
    assert SchedulesConfig().build() is None
    built = SchedulesConfig(entropy_coef={"kind": "constant", "start": 0.01}).build()
    assert built is not None and set(built.schedules) == {"entropy_coef"}


# ---------------------------------------------------------------------- in a Trainer
def config() -> TrainerConfig:
    return TrainerConfig(total_timesteps=EPOCHS * BATCH, batch_size=BATCH, minibatch_size=32, bptt_horizon=8,
                         update_epochs=2, seed=3)


class Probe(TrainerComponent):
    """Records the values each update ran with (rollout end) and those shown after each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.during_update: list[tuple[float, float, float]] = []
        self.after_epoch: list[tuple[float, float, float]] = []

    def values(self) -> tuple[float, float, float]:
        ctx = self.context
        live = ctx.state.hyperparameters
        assert live.learning_rate == ctx.optimizer.param_groups[0]["lr"]
        return live.learning_rate, live.entropy_coef, live.clip_coef

    def on_rollout_end(self) -> None:
        self.during_update.append(self.values())

    def on_epoch_end(self, epoch: int) -> None:
        self.after_epoch.append(self.values())


def expected_at(step: int) -> tuple[float, float, float]:
    total = EPOCHS * BATCH
    return LR.value(step, total), ENTROPY.value(step, total), CLIP.value(step, total)


def scheduled_trainer(path: Path, kind: str = "mlp", stop_at: int | None = None) -> tuple[Trainer, Probe]:
    """Checkpointer and scheduler registered before restore, as the CLI does."""
    trainer = Trainer(config(), BanditEnvironment(num_envs=4, seed=5), build_policy(kind, hidden_size=16), "cpu")
    trainer.register(ContextCheckpointer(path, epoch_interval=1))
    trainer.register(HyperparameterScheduler(learning_rate=LR, entropy_coef=ENTROPY, clip_coef=CLIP))
    probe = trainer.register(Probe())
    if stop_at is not None:
        trainer.register(StopAtEpoch(stop_at))
    trainer.restore()
    return trainer, probe


def test_values_follow_the_schedules_over_agent_steps(tmp_path: Path) -> None:
    trainer, probe = scheduled_trainer(tmp_path)
    assert probe.values() == expected_at(0)  # applied at registration
    trainer.train()
    assert probe.after_epoch == [expected_at(k * BATCH) for k in range(1, EPOCHS + 1)]
    assert probe.during_update == [expected_at(k * BATCH) for k in range(EPOCHS)]
    assert probe.after_epoch[-1][0] == 0.0  # annealed to zero in the state and optimizer; the config is as asked
    assert trainer.context.config == config()


def test_resume_continues_with_the_same_values_and_weights(tmp_path: Path) -> None:
    straight, straight_probe = scheduled_trainer(tmp_path / "straight")
    straight.train()

    first, first_probe = scheduled_trainer(tmp_path / "split", stop_at=3)
    first.train()
    second, second_probe = scheduled_trainer(tmp_path / "split")
    assert second.context.state.epoch == 3
    assert second_probe.values() == expected_at(3 * BATCH)  # re-applied on load, to a fresh config
    second.train()
    assert first_probe.during_update + second_probe.during_update == straight_probe.during_update
    assert second_probe.after_epoch == straight_probe.after_epoch[3:]
    for (name, x), (_, y) in zip(straight.context.policy.state_dict().items(),
                                 second.context.policy.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_registered_after_a_restore_it_applies_the_restored_step(tmp_path: Path) -> None:
    first, _ = scheduled_trainer(tmp_path, stop_at=2)
    first.train()
    resumed = Trainer.load_or_create(str(tmp_path), config(), BanditEnvironment(num_envs=4, seed=5),
                                     build_policy("mlp", hidden_size=16), "cpu")
    resumed.register(HyperparameterScheduler(learning_rate=LR, entropy_coef=ENTROPY, clip_coef=CLIP))
    probe = resumed.register(Probe())
    assert probe.values() == expected_at(2 * BATCH)
