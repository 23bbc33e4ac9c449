"""`mettle train` with `losses.*`: kickstarting from a teacher run, a loss switched off, and bad loss settings."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import mettle_in_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SMALL = ("batch_size=1024", "progress_interval_s=0.01")
"""A few epochs of 1024 agent steps each (the CartPole recipe's other settings, overlap included, stay)."""


def train(root: Path, run: str, *overrides: str, env: str = "gym:CartPole-v1") -> subprocess.CompletedProcess[str]:
    """`mettle train` of run `run` under `root`, run from `root` in this process (how a run is read is tested)."""
    return mettle_in_process("train", "--env", env, "--run", run, "--run-dir", str(root), *SMALL, *overrides,
                             cwd=root)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records, one per epoch."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalar_tags(run_dir: Path) -> EventAccumulator:
    """The run's TensorBoard events, loaded."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished teacher runs: `cartpole` (2 actions, 2 epochs) and `acrobot` (3 actions, 1 epoch)."""
    root = tmp_path_factory.mktemp("teachers")
    for run, env, steps in (("cartpole", "gym:CartPole-v1", 2048), ("acrobot", "gym:Acrobot-v1", 1024)):
        result = train(root, run, f"total_timesteps={steps}", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


BAD_INPUT = [
    (["losses.kickstarter.enabled=true", "losses.kickstarter.teacher=nope/run"],
     "mettle: error: losses.kickstarter.teacher: nope/run does not exist; give a Mettle run directory or one of "
     "its checkpoints/<epoch> directories"),
    (["losses.kickstarter.enabled=true", "losses.kickstarter.teacher={teachers}/acrobot"],
     "mettle: error: losses.kickstarter.teacher: {teachers}/acrobot/checkpoints/00000001 acts in Discrete(3), this "
     "environment in Discrete(2); use a teacher trained on this environment's action space"),
    (["losses.distill.enabled=true"],
     "mettle: error: unknown config key 'losses.distill.enabled'; valid keys: ppo_actor, ppo_critic, kickstarter"),
    (["losses.kickstarter.enabled=true"],
     "mettle: error: invalid config: trainer.losses.kickstarter: losses.kickstarter.teacher is not set; set it to "
     "a Mettle run directory or checkpoint, e.g. losses.kickstarter.teacher=runs/teacher"),
    (["losses.ppo_actor.enabled=false", "losses.ppo_critic.enabled=false"],
     "mettle: error: no loss to train on: losses.ppo_actor, losses.ppo_critic and losses.kickstarter are all "
     "disabled; enable one (e.g. losses.ppo_actor.enabled=true)"),
]


@pytest.mark.parametrize("args,expected", BAD_INPUT, ids=["missing-teacher", "other-action-space", "unknown-loss",
                                                         "no-teacher", "no-loss"])
def test_bad_loss_settings_exit_2_with_one_line_and_train_nothing(tmp_path: Path, teachers: Path, args: list[str],
                                                                  expected: str) -> None:
    runs = tmp_path / "runs"
    result = mettle_in_process("train", "--env", "gym:CartPole-v1", "--run-dir", str(runs),
                         *(a.format(teachers=teachers) for a in args), *SMALL, "total_timesteps=2048", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [expected.format(teachers=teachers)]
    assert "epoch" not in result.stdout, "no epoch ran"
    assert not runs.exists() or not any(runs.iterdir()), "no run directory (no config, no checkpoint) is written"


@pytest.fixture(scope="module")
def student(teachers: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A CartPole student kickstarted from the CartPole teacher, annealed to zero after 3 of its 4 epochs."""
    root = teachers.parent / "students"
    root.mkdir()
    result = train(root, "student", "total_timesteps=4096", "losses.kickstarter.enabled=true",
                   f"losses.kickstarter.teacher={teachers / 'cartpole'}", "losses.kickstarter.anneal_steps=3072",
                   "losses.kickstarter.action_coef=0.5", "losses.kickstarter.value_coef=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "student", result


def test_kickstarted_student_logs_annealed_teacher_terms_beside_ppo(
        student: tuple[Path, subprocess.CompletedProcess[str]], teachers: Path) -> None:
    run_dir, result = student
    assert f"kickstarting from the teacher in {teachers}/cartpole/checkpoints/00000002" in result.stderr
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1024, 2048, 3072, 4096]
    share = [1 - 1024 / 3072, 1 - 2048 / 3072, 0.0, 0.0]  # the update after a rollout sees its steps counted
    assert [r["loss/kickstarter/action_coef"] for r in records] == pytest.approx([0.5 * s for s in share], abs=1e-6)
    assert [r["loss/kickstarter/value_coef"] for r in records] == pytest.approx([0.25 * s for s in share], abs=1e-6)
    for record in records[:2]:  # a fresh student differs from its trained teacher: both terms are positive
        assert math.isfinite(record["loss/kickstarter/kl"]) and record["loss/kickstarter/kl"] > 0
        assert math.isfinite(record["loss/kickstarter/value_mse"]) and record["loss/kickstarter/value_mse"] > 0
    for record in records[2:]:
        assert "loss/kickstarter/kl" not in record, "once annealed the teacher is not run, so there is no KL"
    for record in records:
        for key in ("loss/ppo_actor/policy_loss", "loss/ppo_actor/entropy", "loss/ppo_critic/value_loss"):
            assert math.isfinite(record[key]), key

    events = scalar_tags(run_dir)
    tags = set(events.Tags()["scalars"])
    assert {"loss/kickstarter/kl", "loss/kickstarter/action_coef", "loss/kickstarter/value_mse",
            "loss/ppo_actor/policy_loss", "loss/ppo_critic/value_loss"} <= tags
    logged = events.Scalars("loss/kickstarter/action_coef")
    assert [e.step for e in logged] == [1024, 2048, 3072, 4096]
    assert [e.value for e in logged] == pytest.approx([0.5 * s for s in share], abs=1e-6)
    assert [e.step for e in events.Scalars("loss/kickstarter/kl")] == [1024, 2048]


def test_without_the_critic_loss_training_logs_no_critic_terms(tmp_path: Path) -> None:
    result = train(tmp_path, "actor_only", "total_timesteps=2048", "losses.ppo_critic.enabled=false")
    assert result.returncode == 0, result.stderr[-3000:]
    progress = [line for line in result.stdout.splitlines() if line.startswith(("epoch", "done epoch"))]
    assert progress and all("| policy_loss " in line for line in progress), result.stdout
    assert not [line for line in progress if "value_loss" in line or "nan" in line], result.stdout
    records = metrics(tmp_path / "actor_only")
    assert [r["step"] for r in records] == [1024, 2048]
    assert all(math.isfinite(r["loss/ppo_actor/policy_loss"]) for r in records)
    assert not [k for r in records for k in r if k.startswith("loss/ppo_critic/")]
    tags = scalar_tags(tmp_path / "actor_only").Tags()["scalars"]
    assert "loss/ppo_actor/policy_loss" in tags and not [t for t in tags if t.startswith("loss/ppo_critic/")]
