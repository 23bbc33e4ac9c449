"""StatsReporter and its loggers: what reaches TensorBoard, metrics.jsonl and W&B, at which steps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from mettle.agent.mlp import MLPPolicy
from mettle.envs.testing import BanditEnvironment
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import TrainerComponent
from mettle.rl.training.components.loggers import JsonlLogger, MetricsLogger, TensorBoardLogger, wandb_run_id
from mettle.rl.training.components.stats import (
    EpisodeSummary,
    StatsConfig,
    StatsReporter,
    build_loggers,
)

LOSSES = ("ppo_actor/policy_loss", "ppo_critic/value_loss", "ppo_actor/entropy", "ppo_actor/approx_kl",
          "ppo_actor/clipfrac", "explained_variance")


class Tally(TrainerComponent):
    """Counts the episodes on_step delivers and records the agent step after every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.episodes = 0
        self.steps: list[int] = []

    def on_step(self, infos: list[dict[str, Any]]) -> None:
        self.episodes += len(infos)

    def on_epoch_end(self, epoch: int) -> None:
        self.steps.append(self.context.state.agent_step)


class MemoryLogger(MetricsLogger):
    """Keeps every report in memory."""

    def __init__(self) -> None:
        self.reports: list[tuple[int, dict[str, float]]] = []
        self.closed = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.reports.append((step, dict(metrics)))

    def close(self) -> None:
        self.closed = True


def train(epochs: int, *components: TrainerComponent) -> Trainer:
    cfg = TrainerConfig(total_timesteps=epochs * 64, batch_size=64, minibatch_size=32, bptt_horizon=4,
                        update_epochs=1)
    trainer = Trainer(cfg, BanditEnvironment(num_envs=8, episode_length=4), MLPPolicy(), "cpu", run_name="stats")
    for component in components:
        trainer.register(component)
    trainer.train()
    return trainer


def test_tensorboard_and_jsonl_get_every_namespace_at_each_agent_step(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tally = Tally()
    reporter = StatsReporter([TensorBoardLogger(tmp_path / "tb"), JsonlLogger(tmp_path / "metrics.jsonl")])
    trainer = train(3, reporter, tally)
    assert tally.steps == [64, 128, 192]

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"environment/episode_return", "environment/episode_length", "environment/episodes",
                *(f"loss/{name}" for name in LOSSES), "performance/steps_per_second",
                "performance/agent_step", "performance/epoch", "performance/learning_rate", "timing/rollout",
                "timing/rollout.env", "timing/rollout.inference", "timing/train", "timing/other", "timing/wall",
                "timing/rollout_frac", "timing/train_frac", "timing/other_frac"}
    assert expected <= tags, expected - tags
    assert "environment/env_id" not in tags and "environment/agent_id" not in tags
    for tag in expected:
        assert [event.step for event in events.Scalars(tag)] == tally.steps, tag
    assert [event.value for event in events.Scalars("performance/epoch")] == [1, 2, 3]
    assert events.Scalars("performance/learning_rate")[0].value == pytest.approx(3e-4)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == tally.steps
    assert [record["epoch"] for record in records] == [1, 2, 3]
    assert all(expected <= record.keys() for record in records)

    watch = trainer.context.stopwatch
    for timer in ("rollout", "train", "rollout.env"):
        deltas = [record[f"timing/{timer}"] for record in records]
        assert all(0 < delta < watch.elapsed(timer) for delta in deltas), timer
        assert sum(deltas) == pytest.approx(watch.elapsed(timer), rel=1e-9), timer
    for record in records:
        wall = record["timing/wall"]
        assert record["timing/rollout"] + record["timing/train"] <= wall
        assert record["timing/rollout_frac"] == pytest.approx(record["timing/rollout"] / wall)
        parts = record["timing/rollout_frac"] + record["timing/train_frac"] + record["timing/other_frac"]
        assert parts == pytest.approx(1.0)


def test_interval_two_summarises_every_episode(tmp_path: Path) -> None:
    memory, tally = MemoryLogger(), Tally()
    train(5, StatsReporter([memory, JsonlLogger(tmp_path / "metrics.jsonl")], epoch_interval=2), tally)
    assert [step for step, _ in memory.reports] == [128, 256, 320]  # the odd last epoch is flushed at the end
    assert sum(report["environment/episodes"] for _, report in memory.reports) == tally.episodes > 0
    assert all(report["environment/episode_length"] == 4 for _, report in memory.reports)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [128, 256, 320]
    assert memory.closed


def test_loggers_close_on_failure() -> None:
    class Boom(TrainerComponent):
        def on_epoch_end(self, epoch: int) -> None:
            raise RuntimeError("boom")

    memory = MemoryLogger()
    with pytest.raises(RuntimeError, match="boom"):
        train(3, StatsReporter([memory]), Boom())
    assert memory.closed and len(memory.reports) == 1


def test_episode_summary_skips_identifiers_and_survives_a_restart() -> None:
    summary = EpisodeSummary()
    summary.add({"episode_return": 1.0, "env_id": 3, "agent_id": 1, "game/ore": 2, "label": "x"})
    summary.add({"episode_return": 3.0, "agent/moves": True})
    assert summary.episodes == 2
    assert summary.means() == {"episode_return": 2.0, "game/ore": 2.0, "agent/moves": 1.0}
    restored = EpisodeSummary()
    restored.load_state_dict(summary.state_dict())
    assert restored.means() == summary.means() and restored.episodes == 2


def test_jsonl_appends_and_writes_nan_as_null(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        with JsonlLogger(path) as sink:
            sink.log({"loss/ppo_critic/value_loss": math.nan, "performance/epoch": step}, step)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["loss/ppo_critic/value_loss"]) for r in records] == [(1, 1, None), (2, 2, None)]


def test_stats_config_rejects_unknown_fields_and_bad_interval() -> None:
    assert StatsConfig().model_dump() == {"tensorboard": True, "jsonl": True, "wandb": "off",
                                          "wandb_project": "mettle", "interval": 1}
    with pytest.raises(ValueError):
        StatsConfig(tensorbord=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        StatsConfig(interval=0)


def test_build_loggers_without_wandb_writes_under_the_run_dir(tmp_path: Path) -> None:
    cfg = StatsConfig(interval=1)
    reporter = StatsReporter.from_config(cfg, tmp_path, "run", {"lr": 1})
    assert [type(sink).__name__ for sink in reporter.loggers] == ["TensorBoardLogger", "JsonlLogger"]
    train(1, reporter)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert build_loggers(tmp_path, False, False, "off", "p", "run", {}) == []


def test_wandb_run_id_is_safe() -> None:
    assert wandb_run_id("bandit-2024/01 12:00") == "bandit-2024-01-12-00"
    assert len(wandb_run_id("x" * 100)) == 64


@pytest.mark.timeout(120)
def test_wandb_offline_writes_a_run_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DISABLE_CODE": "true", "WANDB_SILENT": "true",
                        "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data"),
                        "WANDB_API_KEY": ""}.items():
        monkeypatch.setenv(name, value)
    loggers = build_loggers(tmp_path, False, False, "offline", "mettle-test", "stats", {"seed": 1})
    train(2, StatsReporter(loggers))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("*.wandb"))
    assert files and files[0].stat().st_size > 0
