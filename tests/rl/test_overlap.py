"""Overlapped training: the actor's fixed one-update lag, V-trace's ratios for it, failures and the fallback."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import numpy as np
import psutil
import pytest
import torch

from mettle.agent.registry import build_policy
from mettle.config import EnvConfig
from mettle.contracts import EnvBatch
from mettle.envs.factory import make_environment
from mettle.envs.testing import BanditEnvironment
from mettle.envs.vector import VectorEnvironment
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import AdvantageConfig, OptimizerConfig, TrainerConfig
from mettle.rl.training import TrainerComponent
from mettle.rl.training.actor import ActorError
from mettle.rl.training.components.signals import StopAtEpoch
from mettle.rl.training.overlap import OverlappedRollouts

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS = 5


class RolloutRecorder(TrainerComponent):
    """Keeps each rollout as the learner trains on it, with the learner's weights at that moment (before the update)."""

    def __init__(self) -> None:
        super().__init__(epoch_interval=1)
        self.rollouts: list[dict[str, Any]] = []

    def on_rollout_end(self) -> None:
        """Copy the buffer, the V-trace log ratios and the weights the update is about to start from."""
        exp = self.context.experience
        record = {name: exp.buffers[name].clone() for name in ("observations", "actions", "log_probs", "mask")}
        record["starts"] = exp.buffers["starts"].clone()
        record["log_ratio"] = exp.log_ratio.clone()
        record["weights"] = {k: v.clone() for k, v in self.context.policy.state_dict().items()}
        self.rollouts.append(record)


def train_cartpole(overlap: bool) -> tuple[Trainer, RolloutRecorder]:
    env = make_environment(EnvConfig(name="gym:CartPole-v1", num_envs=4, vectorization="serial"), seed=3)
    cfg = TrainerConfig(total_timesteps=EPOCHS * 64, batch_size=64, minibatch_size=32, bptt_horizon=8,
                        update_epochs=2, seed=5, overlap=overlap, advantage=AdvantageConfig(method="vtrace"),
                        optimizer=OptimizerConfig(learning_rate=0.01))
    trainer = Trainer(cfg, env, build_policy("mlp", hidden_size=32), "cpu")
    recorder = RolloutRecorder()
    trainer.register(recorder)
    try:
        trainer.train()
    finally:
        env.close()
    return trainer, recorder


def log_probs_under(trainer: Trainer, weights: dict[str, torch.Tensor], rollout: dict[str, Any]) -> torch.Tensor:
    """Log-probabilities of the rollout's actions under the given weights, [segments, T]."""
    policy = build_policy("mlp", hidden_size=32)
    policy.initialize_to_environment(trainer.context.env.policy_env_info, "cpu")
    policy.load_state_dict(weights)
    with torch.no_grad():
        output = policy(rollout["observations"], rollout["starts"], actions=rollout["actions"])
    return output.log_prob


def close(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> bool:
    return torch.allclose(a[mask], b[mask], atol=1e-5, rtol=0)


def split_held(mask: torch.Tensor, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps decided in this rollout, steps held from the last one): each row's first step is the decision held
    at the end of the previous rollout (segment r, position 0), made with that rollout's weights."""
    held = torch.zeros_like(mask)
    held[:rows, 0] = True
    return mask & ~held, mask & held


def test_the_actor_acts_with_the_weights_from_before_the_previous_update() -> None:
    """Rollouts 0 and 1 use the initial weights, rollout k+1 those from before update k; V-trace sees the ratio."""
    trainer, recorder = train_cartpole(overlap=True)
    assert trainer.overlapped
    rollouts = recorder.rollouts
    assert len(rollouts) == EPOCHS
    weights = [r["weights"] for r in rollouts]  # weights[k]: the learner's before update k
    for k, rollout in enumerate(rollouts):
        mask, held = split_held(rollout["mask"])
        behaviour = weights[max(k - 1, 0)]
        assert close(log_probs_under(trainer, behaviour, rollout), rollout["log_probs"], mask), k
        if k >= 1:
            previous = log_probs_under(trainer, weights[max(k - 2, 0)], rollout)
            assert close(previous, rollout["log_probs"], held), f"rollout {k}'s held steps: the last rollout's weights"
        learner = log_probs_under(trainer, weights[k], rollout)
        if k >= 1:
            assert not close(learner, rollout["log_probs"], mask), f"rollout {k} must not be on-policy"
        everywhere = rollout["mask"]
        assert close(rollout["log_ratio"], learner - rollout["log_probs"], everywhere), "V-trace: learner / behaviour"


def test_synchronous_training_is_on_policy() -> None:
    """The control: without overlap every rollout uses the weights of the update that follows it."""
    trainer, recorder = train_cartpole(overlap=False)
    assert not trainer.overlapped
    for rollout in recorder.rollouts:
        mask, _ = split_held(rollout["mask"])
        assert close(log_probs_under(trainer, rollout["weights"], rollout), rollout["log_probs"], mask)


def test_overlapped_training_is_reproducible() -> None:
    """A seed gives one run whatever the timing of actor and learner."""
    first, _ = train_cartpole(overlap=True)
    second, _ = train_cartpole(overlap=True)
    for (name, a), b in zip(first.context.policy.state_dict().items(), second.context.policy.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


class FailingBandit(BanditEnvironment):
    """Raises on the 20th receive: in the actor process, which must report it by name."""

    def __init__(self) -> None:
        super().__init__(num_envs=2, episode_length=4)
        self.receives = 0

    def get_observations(self) -> EnvBatch:
        self.receives += 1
        if self.receives == 20:
            raise RuntimeError("the simulator broke")
        return super().get_observations()


def test_an_error_in_the_actor_ends_training_naming_the_actor() -> None:
    cfg = TrainerConfig(total_timesteps=10_000, batch_size=16, minibatch_size=8, bptt_horizon=4, update_epochs=1,
                        overlap=True)
    trainer = Trainer(cfg, FailingBandit(), build_policy("mlp", hidden_size=8), "cpu")
    with pytest.raises(ActorError, match=r"actor process \(pid \d+\) raised RuntimeError: the simulator broke"):
        trainer.train()
    assert isinstance(trainer.rollouts, OverlappedRollouts) and trainer.rollouts.actor is None, "the actor is ended"


def test_without_fork_training_is_synchronous_with_a_warning(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    monkeypatch.setattr("mettle.rl.training.overlap.fork_problem", lambda device: "no fork here")
    cfg = TrainerConfig(total_timesteps=32, batch_size=16, minibatch_size=8, bptt_horizon=4, update_epochs=1,
                        overlap=True)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg, BanditEnvironment(num_envs=2, episode_length=4), build_policy("mlp", hidden_size=8),
                          "cpu")
    assert "overlap=true: training synchronously instead, because no fork here" in caplog.text
    assert not trainer.overlapped
    assert trainer.train().agent_step == 32


def test_an_actor_that_can_no_longer_fork_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA set up after the Trainer chose overlap (a loss added later) is named, before a broken fork."""
    cfg = TrainerConfig(total_timesteps=32, batch_size=16, minibatch_size=8, bptt_horizon=4, update_epochs=1,
                        overlap=True)
    trainer = Trainer(cfg, BanditEnvironment(num_envs=2, episode_length=4), build_policy("mlp", hidden_size=8), "cpu")
    assert trainer.overlapped
    monkeypatch.setattr("mettle.rl.training.overlap.fork_problem", lambda device: "CUDA is set up here now")
    with pytest.raises(RuntimeError, match="the actor process cannot start, because CUDA is set up here now"):
        trainer.train()
    assert trainer.context.state.agent_step == 0


def test_a_second_train_call_continues_from_the_stopped_actor() -> None:
    """train() ends its actor; a later train() forks a new one from the parked state: same as one longer call."""
    def run(stops: list[int]) -> list[np.ndarray]:
        cfg = TrainerConfig(total_timesteps=64, batch_size=16, minibatch_size=8, bptt_horizon=4, update_epochs=1,
                            overlap=True, seed=2)
        trainer = Trainer(cfg, BanditEnvironment(num_envs=2, episode_length=3), build_policy("mlp", hidden_size=8),
                          "cpu")
        for stop in stops:
            trainer.register(StopAtEpoch(stop))
            trainer.context.stop_requested = False
            trainer.train()
            trainer.context.components.pop()
        assert trainer.context.state.epoch == 4
        return [p.detach().numpy().copy() for p in trainer.context.policy.parameters()]

    once, twice = run([4]), run([2, 4])
    assert all(np.array_equal(a, b) for a, b in zip(once, twice, strict=True))


class KillWorker(TrainerComponent):
    """SIGKILLs env worker 1 after the first epoch, while the actor steps the env (the worker is not its child)."""

    def __init__(self) -> None:
        super().__init__(epoch_interval=1)

    def on_epoch_end(self, epoch: int) -> None:
        """Kill the worker once."""
        env = self.context.env
        assert isinstance(env, VectorEnvironment)
        if epoch == 1:
            os.kill(env.worker_pids[1], signal.SIGKILL)


def test_an_env_worker_dying_under_the_actor_is_named() -> None:
    env = make_environment(EnvConfig(name="gym:CartPole-v1", num_envs=4, vectorization="multiprocess",
                                     num_workers=2), seed=1)
    cfg = TrainerConfig(total_timesteps=10_000, batch_size=64, minibatch_size=32, bptt_horizon=8, update_epochs=1,
                        overlap=True)
    trainer = Trainer(cfg, env, build_policy("mlp", hidden_size=8), "cpu")
    trainer.register(KillWorker())
    assert isinstance(env, VectorEnvironment)
    victim = env.worker_pids[1]
    try:
        with pytest.raises(ActorError, match=rf"actor process \(pid \d+\) raised EnvironmentWorkerError: environment "
                                             rf"worker 1 \(pid {victim}\) (was killed by signal SIGKILL|exited)"):
            trainer.train()
    finally:
        env.close()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in env.worker_pids)


def test_an_actor_on_another_device_acts_as_one_on_the_learners() -> None:
    """actor_device gets a copy of the policy and the held decisions (cpu:0 stands in for a GPU here)."""
    def final(actor_device: str | None) -> list[torch.Tensor]:
        cfg = TrainerConfig(total_timesteps=96, batch_size=16, minibatch_size=8, bptt_horizon=4, update_epochs=1,
                            overlap=True, actor_device=actor_device, seed=4)
        trainer = Trainer(cfg, BanditEnvironment(num_envs=2, episode_length=3), build_policy("lstm", hidden_size=8),
                          "cpu")
        trainer.train()
        return list(trainer.context.policy.state_dict().values())

    assert all(torch.equal(a, b) for a, b in zip(final(None), final("cpu:0"), strict=True))
