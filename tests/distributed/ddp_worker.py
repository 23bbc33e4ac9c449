"""Run under torchrun by test_distributed.py: trains on the Bandit env (or CartPole) and records what each rank saw."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from mettle.agent.registry import build_policy
from mettle.envs.gymnasium import GymnasiumEnvironment
from mettle.envs.testing import BanditEnvironment
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import KickstarterConfig, LossesConfig, TrainerConfig
from mettle.rl.training import ContextCheckpointer, DistributedHelper, TrainerComponent, TrainingEnvironment
from mettle.rl.training.components.signals import StopAtEpoch


def checksum(module: torch.nn.Module) -> str:
    """Digest of every parameter's bytes."""
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class StepRecorder(TrainerComponent):
    """Records a parameter checksum after every optimizer step, and the stats each rank sees."""

    def __init__(self) -> None:
        super().__init__()
        self.checksums: list[str] = []
        self.epochs: list[dict[str, Any]] = []

    def register(self, context: Any) -> None:
        super().register(context)
        context.optimizer.register_step_post_hook(lambda *_: self.checksums.append(checksum(context.policy)))

    def on_epoch_end(self, epoch: int) -> None:
        ctx = self.context
        self.epochs.append({"epoch": epoch, "agent_step": ctx.state.agent_step, "episodes": len(ctx.stats.episodes),
                            "losses": ctx.stats.losses})


class LiveObservations(TrainerComponent):
    """Every live observation of this rank's rollouts, as the learner trains on them (normalisation's stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[float]] = []

    def on_rollout_end(self) -> None:
        exp = self.context.experience
        self.seen += exp.buffers["observations"][exp.buffers["mask"]].double().tolist()


def normalization_record(trainer: Trainer, observations: LiveObservations) -> dict[str, Any]:
    """This rank's live observations and the statistics it ended with (observations' and returns')."""
    normalizer, scaler = trainer.context.policy.observation_normalizer, trainer.core_loop.reward_scaler
    assert normalizer is not None and scaler is not None
    return {"seen": observations.seen, "count": float(normalizer.count), "mean": normalizer.mean.tolist(),
            "m2": normalizer.m2.tolist(), "returns": {k: v.tolist() for k, v in scaler.state_dict().items()}}


def make_env(name: str) -> TrainingEnvironment:
    """The Bandit (tiny and exact) or eight CartPoles (a real env, for a teacher and its student)."""
    if name == "cartpole":
        return GymnasiumEnvironment("CartPole-v1", num_envs=8)
    return BanditEnvironment(num_envs=4, episode_length=8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--stop-at", type=int, default=0)
    parser.add_argument("--overlap", action="store_true", help="collect rollouts in an actor process per rank")
    parser.add_argument("--env", choices=["bandit", "cartpole"], default="bandit")
    parser.add_argument("--policy", choices=["lstm", "mlp"], default="lstm")
    parser.add_argument("--teacher", default="", help="kickstart from this run directory")
    parser.add_argument("--anneal-steps", type=int, default=1_000_000)
    parser.add_argument("--gradient", choices=["auto", "analytic", "autograd"], default="auto")
    parser.add_argument("--normalize", action="store_true", help="normalise observations and rewards (fresh runs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed = DistributedHelper("cpu", timeout_s=60)
    kickstarter = KickstarterConfig(enabled=bool(args.teacher), teacher=args.teacher or None, value_coef=1.0,
                                    anneal_steps=args.anneal_steps)
    cfg = TrainerConfig(total_timesteps=args.epochs * 128 * distributed.get_world_size(), batch_size=128,
                        minibatch_size=64, bptt_horizon=8, update_epochs=2, seed=7, overlap=args.overlap,
                        gradient=args.gradient,
                        losses=LossesConfig(kickstarter=kickstarter))
    env = make_env(args.env)
    policy = build_policy(args.policy, hidden_size=16)
    if args.normalize:
        policy.attach_observation_normalizer(int(env.policy_env_info.observation_space.shape[0]))
    trainer = Trainer.load_or_create(str(Path(args.out) / "checkpoints"), cfg, env, policy, "cpu", distributed)
    if args.normalize:  # after restore, so for fresh runs only: a resumed one would lose the reward statistics
        trainer.core_loop.normalize_rewards()
    recorder, observations = StepRecorder(), LiveObservations()
    trainer.register(recorder)
    trainer.register(observations)
    if args.stop_at:
        trainer.register(StopAtEpoch(args.stop_at))
    checkpointer = next(c for c in trainer.components if isinstance(c, ContextCheckpointer))
    checkpointer.epoch_interval = 2
    start_epoch = trainer.context.state.epoch
    trainer.train()
    rank = distributed.get_rank()
    record = {"rank": rank, "world": distributed.get_world_size(), "start_epoch": start_epoch,
              "checksums": recorder.checksums, "epochs": recorder.epochs, "final": checksum(trainer.context.policy),
              "weights": torch.cat([p.detach().reshape(-1) for p in trainer.context.policy.parameters()]).tolist(),
              "agent_step": trainer.context.state.agent_step, "pid": os.getpid(),
              "overlapped": trainer.overlapped,
              "normalization": normalization_record(trainer, observations) if args.normalize else None}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
    distributed.cleanup(synchronize=True)


if __name__ == "__main__":
    main()
