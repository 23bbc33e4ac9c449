"""Exact resume on the environments users train on: a run split by a checkpoint equals the unbroken run.

Each case trains once straight through and once stopped at an epoch boundary, rebuilt from the
checkpoint in fresh objects, and continued. The final weights must be bitwise equal, and so must every
epoch's losses and finished episodes (returns, lengths, ids), which is what metrics.jsonl logs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from resume_helpers import checkpointed

from mettle.agent.registry import build_policy
from mettle.config import EnvConfig
from mettle.envs.factory import make_environment
from mettle.envs.gymnasium import GymnasiumEnvironment
from mettle.envs.pettingzoo import PettingZooEnvironment, parse_pettingzoo_spec
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import AdvantageConfig, TrainerConfig
from mettle.rl.training import TrainerComponent

EPOCHS, STOP = 4, 2

CASES = {
    "cartpole-native": ("gym:CartPole-v1", "serial", 1, 1, "mlp"),
    "cartpole-sync": ("gym:CartPole-v1", "gymnasium_sync", 1, 1, "lstm"),
    "cartpole-workers": ("gym:CartPole-v1", "multiprocess", 2, 2, "mlp"),
    "mpe2-spread": ("pettingzoo:mpe2.simple_spread_v3:parallel_env", "serial", 1, 1, "mlp"),
    "mpe2-spread-workers": ("pettingzoo:mpe2.simple_spread_v3:parallel_env", "multiprocess", 2, 1, "lstm"),
    "arena": ("mettagrid:arena", "serial", 1, 1, "token"),
    "arena-workers": ("mettagrid:arena", "multiprocess", 2, 2, "token"),
}
"""case -> (env, vectorization, workers, async groups, policy)."""
ENV_KWARGS = {"mettagrid:arena": {"max_steps": 20}}
"""Short arena episodes, so that some start before the split and end after it."""


class EpochRecorder(TrainerComponent):
    """Keeps what metrics.jsonl would log each epoch, minus timings."""

    def __init__(self, log: list[tuple[int, dict[str, float], list[list[tuple[str, Any]]]]]) -> None:
        super().__init__(epoch_interval=1)
        self.log = log

    def on_epoch_end(self, epoch: int) -> None:
        """Record the epoch's losses and its finished episodes."""
        episodes = [sorted(info.items()) for info in self.context.stats.episodes]
        self.log.append((epoch, dict(self.context.stats.losses), episodes))


OVERLAP_CASES = ["cartpole-native", "cartpole-sync", "cartpole-workers", "arena", "arena-workers"]
"""Cases also run with overlapped training (the actor collects rollout k+1 during update k)."""


def build(case: str, run: Path, log: list[Any], stop: int | None = None, **trainer: Any) -> Trainer:
    name, vectorization, workers, groups, kind = CASES[case]
    env_cfg = EnvConfig(name=name, num_envs=4, vectorization=vectorization, num_workers=workers,
                        async_factor=groups, kwargs=ENV_KWARGS.get(name, {}))
    env = make_environment(env_cfg, seed=7)
    rows = env.batch_info.num_rows
    horizon = 8
    cfg = TrainerConfig(total_timesteps=EPOCHS * rows * horizon * 2, batch_size=rows * horizon * 2,
                        minibatch_size=rows * horizon, bptt_horizon=horizon, update_epochs=2, seed=11, **trainer)
    trainer = Trainer(cfg, env, build_policy(kind, hidden_size=32), "cpu")
    trainer.register(EpochRecorder(log))
    return checkpointed(trainer, run, stop)


def train_split(case: str, tmp_path: Path, **trainer: Any) -> tuple[Trainer, list[Any]]:
    """Stop at epoch STOP, then continue in a new trainer, env and policy rebuilt from the checkpoint."""
    log: list[Any] = []
    first = build(case, tmp_path / "split", log, stop=STOP, **trainer)
    try:
        first.train()
    finally:
        first.context.env.close()
    second = build(case, tmp_path / "split", log, **trainer)
    assert second.context.state.epoch == STOP
    try:
        second.train()
    finally:
        second.context.env.close()
    return second, log


def train_straight(case: str, tmp_path: Path, **overrides: Any) -> tuple[Trainer, list[Any]]:
    log: list[Any] = []
    trainer = build(case, tmp_path / "straight", log, **overrides)
    try:
        trainer.train()
    finally:
        trainer.context.env.close()
    return trainer, log


def assert_same_weights(a: Trainer, b: Trainer) -> None:
    for (name, x), (_, y) in zip(a.context.policy.state_dict().items(), b.context.policy.state_dict().items(),
                                 strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("case", list(CASES))
def test_split_run_equals_the_unbroken_run(case: str, tmp_path: Path, caplog: Any) -> None:
    torch.set_num_threads(1)
    straight, straight_log = train_straight(case, tmp_path)
    with caplog.at_level(logging.WARNING):
        split, split_log = train_split(case, tmp_path)
    assert "not exact" not in caplog.text
    assert split.context.state.epoch == straight.context.state.epoch == EPOCHS
    assert [epoch for epoch, *_ in split_log] == list(range(1, EPOCHS + 1))
    assert split_log == straight_log
    assert any(episodes for _, _, episodes in straight_log[STOP:]), "episodes must finish after the split"
    assert_same_weights(straight, split)


@pytest.mark.parametrize("case", OVERLAP_CASES)
def test_split_overlapped_run_equals_the_unbroken_run(case: str, tmp_path: Path, caplog: Any) -> None:
    """With overlap on the checkpoint holds the rollout collected ahead and the actor's state: still bitwise equal."""
    torch.set_num_threads(1)
    overlap = {"overlap": True, "advantage": AdvantageConfig(method="vtrace")}
    straight, straight_log = train_straight(case, tmp_path, **overlap)
    assert straight.overlapped
    with caplog.at_level(logging.WARNING):
        split, split_log = train_split(case, tmp_path, **overlap)
    assert "not exact" not in caplog.text and "synchronously" not in caplog.text
    assert [epoch for epoch, *_ in split_log] == list(range(1, EPOCHS + 1))
    assert split_log == straight_log
    assert any(episodes for _, _, episodes in straight_log[STOP:]), "episodes must finish after the split"
    assert_same_weights(straight, split)


def test_an_env_without_state_resumes_with_a_warning_and_diverges(tmp_path: Path, caplog: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: without saved env state the same split differs, and resume says it is not exact."""
    torch.set_num_threads(1)
    _, straight_log = train_straight("cartpole-native", tmp_path)
    monkeypatch.setattr(GymnasiumEnvironment, "state_dict", lambda self: None)
    with caplog.at_level(logging.WARNING):
        _, split_log = train_split("cartpole-native", tmp_path)
    assert "every episode restarts, so this resume is not exact" in caplog.text
    assert split_log[STOP:] != straight_log[STOP:]


def test_gymnasium_async_vector_env_cannot_save_its_state() -> None:
    """Its sub-envs live in Gymnasium's own processes, out of replay's reach: resume restarts (the warning above)."""
    env = GymnasiumEnvironment("CartPole-v1", num_envs=2, vectorization="async")
    try:
        env.reset(seed=0)
        assert env.state_dict() is None
    finally:
        env.close()


def test_a_replay_that_rebuilds_other_observations_is_reported(caplog: Any) -> None:
    """An environment that is not deterministic given its seed cannot be resumed exactly: resume says so."""
    def make() -> PettingZooEnvironment:
        return PettingZooEnvironment(parse_pettingzoo_spec("mpe2.simple_spread_v3:parallel_env"), num_envs=2, seed=1)

    env, rng = make(), np.random.default_rng(0)
    for _ in range(10):
        env.get_observations()
        env.send_actions(rng.integers(0, 5, (env.batch_info.num_rows, 1)))
    env.get_observations()
    state = env.state_dict()
    assert state is not None
    starts = json.loads(state["log"]["starts"])
    starts[1]["seed"] += 1  # as if instance 1's simulator drew other numbers from the same seed
    state["log"]["starts"] = json.dumps(starts)
    with caplog.at_level(logging.WARNING):
        make().load_state_dict(state)
    assert "not deterministic given its seed and actions" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make().load_state_dict(env.state_dict())
    assert "not deterministic" not in caplog.text
