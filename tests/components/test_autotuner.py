"""UpdateEpochsAutotuner: direction, bounds, patience and resume on synthetic stats, then in a real Trainer."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from mettle.agent.registry import build_policy
from mettle.envs.testing import BanditEnvironment
from mettle.rl.hyperparameters import Hyperparameters
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import DistributedHelper, EpochStats, TrainerComponent, TrainerState
from mettle.rl.training.components.autotuner import AutotunerConfig, UpdateEpochsAutotuner

HIGH_KL = (0.1, 0.1)  # approx_kl above kl_high
HIGH_CLIP = (0.01, 0.5)  # clipfrac above clipfrac_high
LOW = (0.001, 0.01)  # both below their low thresholds
MID = (0.01, 0.1)  # between the thresholds


pytestmark = pytest.mark.usefixtures("one_thread")


def bare_context(update_epochs: int) -> SimpleNamespace:
    """The parts of a context the autotuner uses: a read-only config and the state it tunes."""
    config = TrainerConfig(batch_size=64, minibatch_size=32, bptt_horizon=4, update_epochs=update_epochs)
    state = TrainerState(hyperparameters=Hyperparameters.from_config(config))
    return SimpleNamespace(config=config, state=state, stats=EpochStats(), distributed=DistributedHelper("cpu"))


def registered(update_epochs: int = 4, **kwargs: Any) -> UpdateEpochsAutotuner:
    """An autotuner on a bare context."""
    tuner = UpdateEpochsAutotuner(**kwargs)
    tuner.register(bare_context(update_epochs))
    return tuner


def tuned(tuner: UpdateEpochsAutotuner) -> int:
    """The update_epochs the next update will run."""
    return int(tuner.context.state.hyperparameters.update_epochs)


def feed(tuner: UpdateEpochsAutotuner, *signals: tuple[float, float]) -> list[int]:
    """Run one epoch end per (approx_kl, clipfrac); return update_epochs after each."""
    seen = []
    for epoch, (kl, clipfrac) in enumerate(signals, start=1):
        tuner.context.stats.losses = {"ppo_actor/approx_kl": kl, "ppo_actor/clipfrac": clipfrac}
        tuner.on_epoch_end(epoch)
        seen.append(tuned(tuner))
    return seen


def test_high_kl_or_clipfrac_lowers_after_patience_and_stops_at_the_minimum() -> None:
    tuner = registered(4, min_epochs=2, patience=2)
    assert feed(tuner, HIGH_KL, HIGH_KL, HIGH_CLIP, HIGH_KL, HIGH_KL, HIGH_KL, HIGH_KL) == [4, 3, 3, 2, 2, 2, 2]
    assert tuner.adjustments == [(2, 3), (4, 2)]


def test_low_kl_and_clipfrac_raise_after_patience_and_stop_at_the_maximum() -> None:
    tuner = registered(4, max_epochs=5, patience=2)
    assert feed(tuner, LOW, LOW, LOW, LOW, LOW, LOW) == [4, 5, 5, 5, 5, 5]


def test_low_kl_alone_is_not_enough_to_raise() -> None:
    tuner = registered(4, patience=1)
    assert feed(tuner, (0.001, 0.1), (0.01, 0.01), MID) == [4, 4, 4]


def test_an_epoch_in_between_resets_the_streak_and_missing_signals_are_skipped() -> None:
    tuner = registered(4, patience=2)
    assert feed(tuner, HIGH_KL, MID, HIGH_KL, LOW, HIGH_KL) == [4, 4, 4, 4, 4]
    assert feed(tuner, MID, HIGH_KL, (float("nan"), 0.1), HIGH_KL) == [4, 4, 4, 3]
    tuner.context.stats.losses = {}
    tuner.on_epoch_end(9)
    assert tuned(tuner) == 3


def test_patience_one_reacts_every_epoch() -> None:
    assert feed(registered(3, patience=1), HIGH_KL, HIGH_KL, LOW, LOW, LOW) == [2, 1, 2, 3, 4]


def test_registration_brings_update_epochs_into_bounds() -> None:
    assert tuned(registered(20, max_epochs=16)) == 16
    assert tuned(registered(1, min_epochs=3)) == 3


def test_streaks_round_trip_and_the_tuned_value_lives_in_trainer_state() -> None:
    tuner = registered(6, patience=3)
    feed(tuner, HIGH_KL, HIGH_KL, HIGH_KL, HIGH_KL)
    state = tuner.state_dict()
    assert state == {"high_streak": 1, "low_streak": 0, "adjustments": [[3, 5]]}
    assert tuner.context.state.state_dict()["hyperparameters"]["update_epochs"] == 5
    assert tuner.context.config.update_epochs == 6  # the config keeps what was asked
    context = bare_context(4)
    context.state.load_state_dict(tuner.context.state.state_dict())  # the checkpointer loads TrainerState first
    restored = UpdateEpochsAutotuner(patience=3)
    restored.load_state_dict(state)
    restored.register(context)
    assert tuned(restored) == 5
    assert feed(restored, HIGH_KL, HIGH_KL) == [5, 4]  # the restored streak of 1 continues: 2 more reach 3 in all
    assert restored.state_dict()["adjustments"] == [[3, 5], [2, 4]]


def test_an_older_checkpoints_tuned_value_is_applied_even_before_registration() -> None:
    restored = UpdateEpochsAutotuner(patience=3)
    restored.load_state_dict({"update_epochs": 5, "high_streak": 1, "low_streak": 0, "adjustments": [[3, 5]]})
    restored.register(bare_context(4))
    assert tuned(restored) == 5


def test_inconsistent_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="kl_low"):
        UpdateEpochsAutotuner(kl_low=0.05, kl_high=0.03)
    with pytest.raises(ValueError, match="min_epochs"):
        UpdateEpochsAutotuner(min_epochs=5, max_epochs=4)
    with pytest.raises(ValueError, match="clipfrac_low"):
        AutotunerConfig(clipfrac_low=0.4)
    with pytest.raises(ValueError):
        AutotunerConfig(patience=0)
    with pytest.raises(ValueError):
        AutotunerConfig(target=1)  # type: ignore[call-arg]
    assert AutotunerConfig().build() is None
    built = AutotunerConfig(enabled=True, max_epochs=8, patience=3).build()
    assert built is not None and (built.max_epochs, built.patience) == (8, 3)


class EpochsProbe(TrainerComponent):
    """Records the tuned update_epochs at each update and the passes the update actually ran."""

    def __init__(self) -> None:
        super().__init__()
        self.configured: list[int] = []
        self.ran: list[int] = []

    def on_rollout_end(self) -> None:
        self.configured.append(self.context.state.hyperparameters.update_epochs)

    def on_epoch_end(self, epoch: int) -> None:
        self.ran.append(int(self.context.stats.losses["update_epochs_run"]))


def test_a_very_high_learning_rate_drives_update_epochs_down_in_a_real_run() -> None:
    config = TrainerConfig(total_timesteps=5 * 64, batch_size=64, minibatch_size=32, bptt_horizon=4, update_epochs=6,
                           seed=2, optimizer={"learning_rate": 0.3})
    trainer = Trainer(config, BanditEnvironment(num_envs=4), build_policy("mlp", hidden_size=16), "cpu")
    tuner = trainer.register(UpdateEpochsAutotuner(patience=1))
    probe = trainer.register(EpochsProbe())
    trainer.train()
    assert probe.ran == probe.configured  # every update ran the value set after the previous epoch
    # The first updates overshoot, so each one lowers update_epochs; once the bandit's policy has settled, its
    # updates are small and the epochs may climb again (how soon depends on the sampled actions).
    assert probe.configured[:3] == [6, 5, 4]
    assert tuner.adjustments
