"""Trainer behaviour end to end on the package's tiny deterministic environments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mettle.agent.mlp import MLPPolicy
from mettle.agent.registry import build_policy
from mettle.envs.testing import BanditEnvironment, ScriptedEnvironment
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import DistributedHelper, TrainerComponent
from mettle.rl.training.component import crossed_interval


class Recorder(TrainerComponent):
    """Writes every hook call into a shared list."""

    def __init__(self, name: str, log: list[tuple[str, Any]], epoch_interval: int = 1) -> None:
        super().__init__(epoch_interval)
        self.name, self.log = name, log

    @property
    def state_key(self) -> str:
        return f"Recorder-{self.name}"

    def on_step(self, infos: list[dict[str, Any]]) -> None:
        self.log.append((self.name, "step"))

    def on_rollout_end(self) -> None:
        self.log.append((self.name, "rollout_end"))

    def on_epoch_end(self, epoch: int) -> None:
        self.log.append((self.name, f"epoch_end {epoch}"))

    def on_training_complete(self) -> None:
        self.log.append((self.name, "complete"))

    def on_failure(self, error: BaseException) -> None:
        self.log.append((self.name, error))


def small_config(**changes: Any) -> TrainerConfig:
    base: dict[str, Any] = dict(total_timesteps=4 * 64, batch_size=64, minibatch_size=32, bptt_horizon=4,
                                update_epochs=1)
    return TrainerConfig(**{**base, **changes})


def test_callbacks_run_in_order_each_epoch() -> None:
    log: list[tuple[str, Any]] = []
    trainer = Trainer(small_config(), BanditEnvironment(num_envs=4), MLPPolicy(), "cpu")
    trainer.register(Recorder("a", log))
    trainer.register(Recorder("b", log))
    trainer.train()
    per_epoch = [("a", "step"), ("b", "step"), ("a", "rollout_end"), ("b", "rollout_end")]
    expected: list[tuple[str, Any]] = []
    for epoch in range(1, 5):
        expected += [*per_epoch, ("a", f"epoch_end {epoch}"), ("b", f"epoch_end {epoch}")]
    expected += [("a", "complete"), ("b", "complete")]
    assert log == expected
    assert trainer.context.state.epoch == 4
    assert trainer.context.state.agent_step == 4 * 64


def test_epoch_interval_gates_on_epoch_end() -> None:
    log: list[tuple[str, Any]] = []
    trainer = Trainer(small_config(total_timesteps=7 * 64), BanditEnvironment(num_envs=4), MLPPolicy(), "cpu")
    trainer.register(Recorder("every3", log, epoch_interval=3))
    trainer.train()
    assert [e for _, e in log if str(e).startswith("epoch_end")] == ["epoch_end 3", "epoch_end 6"]


@pytest.mark.parametrize(
    "previous,current,interval,fires",
    [(0, 1, 1, True), (2, 3, 3, True), (3, 4, 3, False), (2, 7, 3, True), (4, 5, 3, False), (5, 10, 5, True),
     (6, 9, 5, False), (0, 0, 1, False)],
)
def test_crossed_interval_never_misses_a_boundary(previous: int, current: int, interval: int, fires: bool) -> None:
    assert crossed_interval(previous, current, interval) is fires


class Exploding(Recorder):
    def on_epoch_end(self, epoch: int) -> None:
        super().on_epoch_end(epoch)
        if epoch == 2:
            raise RuntimeError("boom at epoch 2")


def test_failing_component_notifies_everyone_and_reraises() -> None:
    log: list[tuple[str, Any]] = []
    trainer = Trainer(small_config(), BanditEnvironment(num_envs=4), MLPPolicy(), "cpu")
    trainer.register(Recorder("before", log))
    trainer.register(Exploding("bomb", log))
    trainer.register(Recorder("after", log))
    with pytest.raises(RuntimeError, match="boom at epoch 2") as info:
        trainer.train()
    failures = [(name, event) for name, event in log if isinstance(event, BaseException)]
    assert [name for name, _ in failures] == ["before", "bomb", "after"]
    assert all(event is info.value for _, event in failures)
    assert ("before", "complete") not in log


class BrokenEnv(BanditEnvironment):
    def get_observations(self):  # type: ignore[no-untyped-def]
        if self.broken:
            raise OSError("env worker died")
        return super().get_observations()

    broken = False


def test_loop_error_reaches_components_and_a_failing_hook_does_not_hide_it() -> None:
    log: list[tuple[str, Any]] = []

    class BadHook(Recorder):
        def on_failure(self, error: BaseException) -> None:
            super().on_failure(error)
            raise ValueError("hook failed too")

    env = BrokenEnv(num_envs=4)
    trainer = Trainer(small_config(), env, MLPPolicy(), "cpu")
    trainer.register(BadHook("bad", log))
    trainer.register(Recorder("good", log))
    env.broken = True
    with pytest.raises(OSError, match="env worker died") as info:
        trainer.train()
    assert [name for name, e in log if isinstance(e, BaseException)] == ["bad", "good"]
    assert any("hook failed too" in note for note in getattr(info.value, "__notes__", []))


def test_master_only_components_are_skipped_off_rank_zero() -> None:
    class Rank1(DistributedHelper):
        def get_rank(self) -> int:
            return 1

    class MasterOnly(TrainerComponent):
        master_only = True

    trainer = Trainer(small_config(), BanditEnvironment(num_envs=4), MLPPolicy(), "cpu", distributed_helper=Rank1())
    assert trainer.register(MasterOnly()) is None
    assert trainer.components == []
    plain = TrainerComponent()
    assert trainer.register(plain) is plain


def test_rollout_stores_each_transition_at_its_step() -> None:
    """Rows desynchronised by offsets; episodes of 3 steps ending in a terminal, reward t + 1."""
    env = ScriptedEnvironment(num_envs=2, episode_length=3, end="terminal", row_offsets=[0, 1])
    cfg = TrainerConfig(total_timesteps=16, batch_size=16, minibatch_size=8, bptt_horizon=4, update_epochs=1)
    trainer = Trainer(cfg, env, MLPPolicy(), "cpu")
    trainer.rollout_phase()
    exp = trainer.context.experience
    series = {k: exp.as_row_series(exp.buffers[k]) for k in ("observations", "rewards", "terminals", "mask",
                                                              "starts")}
    # row 0: t = 0,1,2, final obs 3 (masked, reward 0), then a new episode 0,1,2,3
    assert series["observations"][0, :, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert series["rewards"][0].tolist() == [1, 2, 3, 0, 1, 2, 3, 0]
    assert series["terminals"][0].tolist() == [False, False, True, False, False, False, True, False]
    assert series["mask"][0].tolist() == [True, True, True, False, True, True, True, False]
    assert series["starts"][0].tolist() == [True, False, False, False, True, False, False, False]
    # row 1 starts mid-episode at t = 1
    assert series["observations"][1, :, 0].tolist() == [1, 2, 3, 0, 1, 2, 3, 0]
    assert series["rewards"][1].tolist() == [2, 3, 0, 1, 2, 3, 0, 1]
    assert trainer.context.state.agent_step == 16


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_learns_the_bandit(kind: str) -> None:
    """The fast end-to-end learning check: PPO must copy the shown target almost always."""
    torch.set_num_threads(1)
    env = BanditEnvironment(num_envs=8, episode_length=8, seed=1)
    cfg = TrainerConfig(total_timesteps=16_384, batch_size=512, minibatch_size=128, bptt_horizon=8,
                        update_epochs=4, optimizer={"learning_rate": 3e-3}, seed=1)
    trainer = Trainer(cfg, env, build_policy(kind), "cpu")
    returns: list[float] = []

    class Returns(TrainerComponent):
        def on_step(self, infos: list[dict[str, Any]]) -> None:
            returns.extend(float(i["episode_return"]) for i in infos)

    trainer.register(Returns())
    trainer.train()
    recent = returns[-64:]
    assert sum(recent) / len(recent) >= 0.9 * 8, recent
    assert sum(returns[:16]) / 16 < 0.5 * 8, "starts near random (1/4 of the best return)"


def test_load_or_create_starts_fresh_on_an_empty_path_and_resumes_from_a_checkpoint(tmp_path: Path) -> None:
    from mettle.rl.training import ContextCheckpointer

    cfg = small_config()
    fresh = Trainer.load_or_create(str(tmp_path), cfg, BanditEnvironment(num_envs=4), MLPPolicy(), "cpu")
    assert fresh.context.state.agent_step == 0
    fresh.train()
    assert any(isinstance(c, ContextCheckpointer) for c in fresh.components)
    resumed = Trainer.load_or_create(str(tmp_path), small_config(total_timesteps=8 * 64),
                                     BanditEnvironment(num_envs=4), MLPPolicy(), "cpu")
    assert resumed.context.state.epoch == 4 and resumed.context.state.agent_step == 4 * 64
    for a, b in zip(fresh.context.policy.parameters(), resumed.context.policy.parameters(), strict=True):
        assert torch.equal(a, b)
