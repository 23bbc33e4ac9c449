"""`mettle train | eval`: the command line over the Trainer."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mettle.config import ConfigError, RunConfig, build_run_config
from mettle.recipes import recipe_for

DEFAULT_ENV = "gym:CartPole-v1"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="mettle", description="Train and evaluate multi-agent PPO policies.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a policy")
    train.add_argument("--env", default=None, help=f"environment, family:name (default {DEFAULT_ENV})")
    train.add_argument("--policy", choices=["mlp", "lstm"], default=None, help="policy architecture")
    train.add_argument("--run", default=None, help="run name (default: <env>-<time>)")
    train.add_argument("--run-dir", default="runs", help="directory that holds runs (default ./runs)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. batch_size=4096")
    evaluate = sub.add_parser("eval", help="evaluate a trained run")
    evaluate.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    evaluate.add_argument("--episodes", type=int, default=20, help="episodes to run (default 20)")
    evaluate.add_argument("--sample", action="store_true", help="sample actions instead of taking the argmax")
    evaluate.add_argument("--seed", type=int, default=12345, help="environment seed (default 12345)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "train":
            return train_command(args)
        return eval_command(args)
    except ConfigError as error:
        print(f"mettle: error: {error}", file=sys.stderr)
        return 2


def resolve_train_config(args: argparse.Namespace) -> RunConfig:
    """Recipe defaults for the env, then --env/--policy, then key=value overrides."""
    env_name = args.env or DEFAULT_ENV
    overrides = [f"env.name={env_name}"]
    if args.policy:
        overrides.append(f"policy.kind={args.policy}")
    return build_run_config([*recipe_for(env_name, args.policy), *overrides, *args.overrides])


def train_command(args: argparse.Namespace) -> int:
    """Validate everything, then train and write config.json and the final policy into the run dir."""
    from mettle.agent.registry import build_policy
    from mettle.envs.factory import make_environment
    from mettle.rl.trainer import Trainer
    from mettle.rl.training import ContextCheckpointer
    from mettle.rl.training.checkpointer import atomic_write, save_policy
    from mettle.rl.training.components.progress import ProgressLogger

    cfg = resolve_train_config(args)
    run_name = args.run or f"{cfg.env.name.split(':')[-1].replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(args.run_dir) / run_name
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    env = make_environment(cfg.env, seed=cfg.trainer.seed)
    try:
        policy = build_policy(cfg.policy.kind, hidden_size=cfg.policy.hidden_size)
        try:
            trainer = Trainer(cfg.trainer, env, policy, cfg.device, run_name=run_name)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.json", lambda f: f.write(cfg.model_dump_json(indent=2).encode()))
        trainer.register(ProgressLogger(interval_s=cfg.progress_interval_s))
        trainer.register(ContextCheckpointer(run_dir / "checkpoints", epoch_interval=cfg.checkpoint_interval))
        resumed = trainer.restore()
        if resumed is not None:
            print(f"resuming {run_name} from {resumed} at agent step {trainer.context.state.agent_step:,}")
        print(f"training {cfg.env.name} with {cfg.policy.kind} policy; run dir {run_dir}", flush=True)
        trainer.train()
        state = trainer.context.state
        save_policy(policy, env.policy_env_info, run_dir, agent_step=state.agent_step, epoch=state.epoch)
        print(f"policy written to {run_dir / 'policy.safetensors'}")
    finally:
        env.close()
    return 0


def find_policy_dir(path: Path) -> Path:
    """A directory holding policy files: the path itself, or the newest checkpoint of a run."""
    from mettle.rl.training.checkpointer import POLICY_SPEC, list_checkpoints, resolve_checkpoint_dir

    if (path / POLICY_SPEC).exists():
        return path
    checkpoints = list_checkpoints(resolve_checkpoint_dir(path))
    if not checkpoints:
        raise ConfigError(f"{path} holds no policy; pass a run directory made by `mettle train`")
    return checkpoints[-1]


def load_run_config(path: Path) -> RunConfig:
    """The config.json of a run directory or of the run that holds a checkpoint directory."""
    for candidate in (path, *path.parents[:3]):
        if (candidate / "config.json").exists():
            return RunConfig.model_validate_json((candidate / "config.json").read_text())
    raise ConfigError(f"no config.json found at or above {path}")


def eval_command(args: argparse.Namespace) -> int:
    """Load a run's policy, run whole episodes and print return statistics."""
    from mettle.envs.factory import make_environment
    from mettle.rl.evaluate import evaluate_policy, summarize_returns
    from mettle.rl.training.checkpointer import load_policy

    if args.episodes < 1:
        raise ConfigError(f"--episodes {args.episodes} must be at least 1")
    path = Path(args.run_dir)
    if not path.exists():
        raise ConfigError(f"run directory {path} does not exist")
    cfg = load_run_config(path)
    policy, _ = load_policy(find_policy_dir(path), cfg.device)
    env = make_environment(cfg.env, seed=args.seed, num_envs=min(args.episodes, cfg.env.num_envs))
    try:
        infos = evaluate_policy(policy, env, args.episodes, cfg.device, not args.sample, args.seed)
    finally:
        env.close()
    summary: dict[str, Any] = summarize_returns(infos)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['episodes']} episodes: mean return {summary['mean_return']:.2f} "
              f"± {summary['std_return']:.2f} (min {summary['min_return']:.2f}, max {summary['max_return']:.2f}), "
              f"mean length {summary['mean_length']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
