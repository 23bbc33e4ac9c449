"""`mettle train` registers the configured components; `mettle report` and `mettle play` work on the result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_helpers import mettle_in_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mettle.rl.policy_files import list_checkpoints
from mettle.rl.training.checkpointer import read_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short CartPole run with every optional component switched on (in this process: what it writes is tested)."""
    root = tmp_path_factory.mktemp("runs")
    result = mettle_in_process(
        "train", "--env", "gym:CartPole-v1", "--run", "full", "--run-dir", str(root), "total_timesteps=6144",
        "batch_size=1024", "progress_interval_s=0.01", "evaluator.enabled=true", "evaluator.interval=2",
        "evaluator.episodes=4",
        "monitor.enabled=true", "gradients.enabled=true", "autotuner.enabled=true", "stats.wandb=offline",
        'schedules.learning_rate={"kind": "linear", "start": 0.001, "end": 0.0}', "checkpoint_interval=3",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "full"


def test_metrics_reach_jsonl_and_tensorboard_at_each_epoch(trained: Path) -> None:
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1024 * k for k in range(1, 7)]
    first = records[0]
    for key in ("environment/episode_return", "loss/ppo_actor/policy_loss", "loss/ppo_actor/approx_kl",
                "performance/steps_per_second", "timing/rollout", "timing/train_frac", "monitor/rss_mb",
                "gradients/norm"):
        assert key in first and math.isfinite(first[key]), key
    evaluated = [r["step"] for r in records if "eval/gym:CartPole-v1/mean_return" in r]
    assert evaluated == [2048, 4096, 6144], "evaluation every 2 epochs, logged once each"
    lrs = [r["performance/learning_rate"] for r in records]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12), "linear schedule to 0"

    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss/ppo_critic/value_loss", "environment/episode_return", "timing/rollout"} <= set(scalars)
    assert [e.step for e in events.Scalars("loss/ppo_critic/value_loss")] == [1024 * k for k in range(1, 7)]


def test_heartbeat_checkpoints_and_wandb_files(trained: Path) -> None:
    beat = json.loads((trained / "heartbeat.json").read_text())
    assert beat["agent_step"] == 6144 and beat["status"] == "complete"
    checkpoints = list_checkpoints(trained / "checkpoints")
    assert [p.name for p in checkpoints] == ["00000003", "00000006"]
    state, _ = read_checkpoint(checkpoints[-1])
    component_keys = set(state["components"])
    assert {"HyperparameterScheduler", "UpdateEpochsAutotuner", "Evaluator", "StatsReporter"} <= component_keys
    assert list((trained / "wandb").glob("offline-run-*/run-*.wandb")), "W&B offline run files"


def test_report_writes_png_plots(trained: Path) -> None:
    result = mettle_in_process("report", str(trained), cwd=trained)
    assert result.returncode == 0, result.stderr
    assert "agent steps" in result.stdout
    pngs = sorted((trained / "report").glob("*.png"))
    assert {p.name for p in pngs} == {"return.png", "sps.png", "losses.png"}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_report_of_a_run_without_metrics_is_one_line(tmp_path: Path) -> None:
    result = mettle_in_process("report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "metrics.jsonl" in result.stderr


def test_play_needs_a_run_or_a_replay(tmp_path: Path) -> None:
    result = mettle_in_process("play", cwd=tmp_path)
    assert result.returncode == 2 and "RUN_DIR" in result.stderr
