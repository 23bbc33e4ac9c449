"""Schedules and the autotuner move TrainerState, never the config: config.json says what ran, resume is exact.

Both runs use CartPole with a learning-rate, entropy and clip schedule and an autotuner tight enough to move
update_epochs, so every value that changes during training does change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from resume_helpers import checkpointed, train_and_close

from mettle.agent.registry import build_policy
from mettle.config import RunConfig, build_run_config, fit_run_config
from mettle.envs.factory import make_environment
from mettle.rl.hyperparameters import Hyperparameters
from mettle.rl.loss import PPOActorLoss
from mettle.rl.policy_files import list_checkpoints, write_manifest
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import PPOConfig, TrainerConfig
from mettle.rl.training import TrainerComponent, TrainerState
from mettle.rl.training.checkpointer import TRAINER_STATE, load_trainer_state

EPOCHS, STOP = 6, 3
OVERRIDES = [
    "env.name=gym:CartPole-v1", "env.num_envs=4", "env.vectorization=serial", "policy.hidden_size=16",
    f"total_timesteps={EPOCHS * 64}", "batch_size=64", "minibatch_size=32", "bptt_horizon=8", "update_epochs=3",
    "seed=5",
    'schedules.learning_rate={"kind":"cosine","start":1e-3,"end":1e-5}',
    'schedules.entropy_coef={"kind":"linear","start":0.0,"end":0.02}',
    'schedules.clip_coef={"kind":"cosine","start":0.3,"end":0.1}',
    "autotuner.enabled=true", "autotuner.patience=1", "autotuner.kl_low=0.0005", "autotuner.kl_high=0.001",
    "autotuner.clipfrac_low=0.001", "autotuner.clipfrac_high=0.002",
]
"""The autotuner thresholds are tight, so that update_epochs moves in a few epochs."""


pytestmark = pytest.mark.usefixtures("one_thread")


class ValueRecorder(TrainerComponent):
    """Per epoch: the values the update ran with (at rollout end), what the optimizer used, and the losses."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self.log = log
        self._during: dict[str, float | int] = {}

    def on_rollout_end(self) -> None:
        """The values the coming update runs with."""
        self._during = self.context.state.hyperparameters.state_dict()

    def on_epoch_end(self, epoch: int) -> None:
        """What the update ran with and produced."""
        ctx = self.context
        self.log.append((epoch, self._during, ctx.optimizer.param_groups[0]["lr"], dict(ctx.stats.losses)))


def run_config() -> RunConfig:
    """The run's config as `mettle train` resolves it (sizes fitted to CartPole's 4 rows)."""
    cfg = build_run_config(OVERRIDES)
    return fit_run_config(cfg, cfg.env.num_envs)


def build(cfg: RunConfig, directory: Path, log: list[Any], stop: int | None = None) -> Trainer:
    """Trainer with schedules, autotuner, recorder and checkpointer, restored from `directory` if it holds one."""
    env = make_environment(cfg.env, seed=cfg.trainer.seed)
    trainer = Trainer(cfg.trainer, env, build_policy(cfg.policy.kind, hidden_size=cfg.policy.hidden_size), "cpu")
    for component in (cfg.schedules.build(), cfg.autotuner.build(), ValueRecorder(log)):
        assert component is not None
        trainer.register(component)
    return checkpointed(trainer, directory, stop)


train = train_and_close


def test_a_run_leaves_its_config_and_config_json_as_asked(tmp_path: Path) -> None:
    cfg = run_config()
    asked = cfg.model_copy(deep=True)
    config_json = tmp_path / "config.json"
    config_json.write_text(cfg.model_dump_json(indent=2))  # as `mettle train` writes it before training
    written = config_json.read_bytes()
    log: list[Any] = []
    trainer = train(build(cfg, tmp_path / "checkpoints", log))

    live = trainer.context.state.hyperparameters
    assert trainer.context.state.epoch == EPOCHS
    assert live.learning_rate != cfg.trainer.optimizer.learning_rate  # every value did move during the run...
    assert live.entropy_coef != cfg.trainer.ppo.entropy_coef
    assert live.clip_coef != cfg.trainer.ppo.clip_coef
    assert len({during["update_epochs"] for _, during, *_ in log}) > 1
    assert trainer.context.config is cfg.trainer  # ...and the config the run holds is the one passed in, unchanged
    assert cfg == asked and cfg.trainer == asked.trainer
    assert cfg.model_dump_json(indent=2).encode() == written == config_json.read_bytes()


def test_resume_with_schedules_and_autotuner_is_exact(tmp_path: Path, caplog: Any) -> None:
    """One config object serves all three trainers, as it would in a sweep or a notebook."""
    cfg = run_config()
    straight_log: list[Any] = []
    straight = train(build(cfg, tmp_path / "straight", straight_log))

    split_log: list[Any] = []
    train(build(cfg, tmp_path / "split", split_log, stop=STOP))
    with caplog.at_level(logging.WARNING):
        second = build(cfg, tmp_path / "split", split_log)
    assert "not exact" not in caplog.text
    assert second.context.state.epoch == STOP
    assert second.context.state.hyperparameters == Hyperparameters(**straight_log[STOP][1])  # what epoch 4 ran with
    train(second)

    assert [epoch for epoch, *_ in split_log] == list(range(1, EPOCHS + 1))
    assert split_log == straight_log
    assert len({during["update_epochs"] for _, during, *_ in straight_log}) > 1  # the autotuner moved
    for (name, x), (_, y) in zip(straight.context.policy.state_dict().items(),
                                 second.context.policy.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert second.context.state.hyperparameters == straight.context.state.hyperparameters


def test_the_actor_loss_reads_the_live_values_not_the_config() -> None:
    """Clip range and entropy weight come from the trainer's hyperparameters when it has them."""
    cfg = PPOConfig(clip_coef=0.2, entropy_coef=0.0)
    live = Hyperparameters.from_config(TrainerConfig(ppo=cfg))
    loss = PPOActorLoss(cfg, live)
    assert (loss.clip_coef, loss.entropy_coef) == (0.2, 0.0)
    live.clip_coef, live.entropy_coef = 0.05, 0.01
    assert (loss.clip_coef, loss.entropy_coef) == (0.05, 0.01)
    assert (PPOActorLoss(cfg).clip_coef, cfg.clip_coef) == (0.2, 0.2)


def test_trainer_state_round_trips_hyperparameters_and_reads_older_checkpoints() -> None:
    trainer_cfg = TrainerConfig(update_epochs=3)
    state = TrainerState(agent_step=128, epoch=2, hyperparameters=Hyperparameters(1e-5, 0.02, 0.1, 5))
    restored = TrainerState(hyperparameters=Hyperparameters.from_config(trainer_cfg))
    held = restored.hyperparameters
    restored.load_state_dict(state.state_dict())
    assert restored == state and restored.hyperparameters is held  # in place: the losses hold this object
    old = TrainerState(hyperparameters=Hyperparameters.from_config(trainer_cfg))
    old.load_state_dict({"agent_step": 64, "epoch": 1})  # written before hyperparameters were checkpointed
    assert (old.agent_step, old.hyperparameters) == (64, Hyperparameters.from_config(trainer_cfg))


def test_a_checkpoint_from_before_live_hyperparameters_still_resumes(tmp_path: Path) -> None:
    """Older checkpoints hold "lr_scheduler" (None) and no hyperparameters: the schedules and autotuner re-apply."""
    cfg = run_config()
    straight_log: list[Any] = []
    train(build(cfg, tmp_path / "straight", straight_log))
    train(build(cfg, tmp_path / "split", [], stop=STOP))
    checkpoint = list_checkpoints(tmp_path / "split")[-1]
    state = load_trainer_state(checkpoint / TRAINER_STATE)
    state["lr_scheduler"] = None
    del state["trainer"]["hyperparameters"]
    state["components"]["UpdateEpochsAutotuner"]["update_epochs"] = straight_log[STOP][1]["update_epochs"]
    torch.save(state, checkpoint / TRAINER_STATE)
    write_manifest(checkpoint)

    resumed = build(cfg, tmp_path / "split", [])
    assert resumed.context.state.epoch == STOP
    assert resumed.context.state.hyperparameters == Hyperparameters(**straight_log[STOP][1])
    resumed.context.env.close()
