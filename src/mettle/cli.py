"""`mettle train | eval`: the command line over the Trainer."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mettle.config import ConfigError, RunConfig, build_run_config
from mettle.recipes import recipe_for

if TYPE_CHECKING:
    from mettle.agent.policy import Policy
    from mettle.rl.trainer import Trainer
    from mettle.rl.training import DistributedHelper
    from mettle.rl.training.components.signals import GracefulShutdown
    from mettle.rl.training.environment import PolicyEnvInfo, TrainingEnvironment

DEFAULT_ENV = "mettagrid:arena"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="mettle", description="Train and evaluate multi-agent PPO policies.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a policy")
    train.add_argument("--env", default=None, help=f"environment, family:name (default {DEFAULT_ENV})")
    train.add_argument("--policy", choices=["mlp", "lstm", "token"], default=None, help="policy architecture")
    train.add_argument("--run", default=None, help="run name (default: <env>-<time>)")
    train.add_argument("--run-dir", default="runs", help="directory that holds runs (default ./runs)")
    train.add_argument("--fresh", action="store_true", help="refuse to resume: fail if the run already exists")
    train.add_argument("--nproc", type=int, default=1, help="ranks on this machine (launches torchrun)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. batch_size=4096")
    evaluate = sub.add_parser("eval", help="evaluate a trained run")
    evaluate.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    evaluate.add_argument("--episodes", type=int, default=20, help="episodes to run (default 20)")
    evaluate.add_argument("--sample", action="store_true", help="sample actions instead of taking the argmax")
    evaluate.add_argument("--seed", type=int, default=12345, help="environment seed (default 12345)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    play = sub.add_parser("play", help="watch a trained MettaGrid policy act, or replay a saved episode")
    play.add_argument("run_dir", nargs="?", help="a run directory (or one checkpoint directory)")
    play.add_argument("--replay", type=Path, default=None, metavar="FILE", help="show a saved episode again")
    play.add_argument("--save", type=Path, default=None, metavar="FILE", help="also save the episode to FILE")
    play.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: one episode)")
    play.add_argument("--fps", type=float, default=8.0, help="frames per second (0: as fast as possible)")
    play.add_argument("--seed", type=int, default=0, help="environment seed (default 0)")
    play.add_argument("--sample", action="store_true", help="sample actions instead of taking the argmax")
    report = sub.add_parser("report", help="plots and a text summary of a run")
    report.add_argument("run_dir", help="a run directory made by `mettle train`")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "train":
            return train_command(args, argv)
        if args.command == "play":
            return play_command(args)
        if args.command == "report":
            from mettle.report import report_command

            return report_command(args.run_dir)
        return eval_command(args)
    except ConfigError as error:
        print(f"mettle: error: {error}", file=sys.stderr)
        return 2


def resolve_train_config(args: argparse.Namespace, saved: RunConfig | None = None) -> RunConfig:
    """Recipe defaults (or the saved config when resuming), then --env/--policy, then key=value overrides."""
    overrides = [f"env.name={args.env}"] if args.env else []
    if args.policy:
        overrides.append(f"policy.kind={args.policy}")
    if saved is not None:
        cfg = build_run_config([*overrides, *args.overrides], base=saved.model_dump(mode="json"))
        check_resumable(saved, cfg)
        return cfg
    env_name = args.env or DEFAULT_ENV
    return build_run_config([*recipe_for(env_name, args.policy), f"env.name={env_name}", *overrides, *args.overrides])


RESUME_FIXED = ("env.name", "env.kwargs", "env.num_envs", "policy", "trainer.optimizer.type", "trainer.bptt_horizon")


def check_resumable(saved: RunConfig, new: RunConfig) -> None:
    """Refuse to resume into another environment, policy architecture or optimizer."""
    old, cur = saved.model_dump(mode="json"), new.model_dump(mode="json")
    for key in RESUME_FIXED:
        before, after = old, cur
        for part in key.split("."):
            before, after = before[part], after[part]
        if before != after:
            raise ConfigError(
                f"cannot resume: {key} was {before!r} in the saved run, now {after!r}; "
                "start a new run with another --run name"
            )


def train_command(args: argparse.Namespace, argv: list[str]) -> int:
    """Launch torchrun for --nproc, else train in this process (one rank of many under torchrun)."""
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_torchrun(args.nproc, argv)
    from mettle.rl.training import DistributedHelper

    distributed = DistributedHelper("cuda" if torch.cuda.is_available() else "cpu")
    try:
        code = train_in_process(args, distributed)
    except BaseException:
        distributed.cleanup()
        raise
    distributed.cleanup(synchronize=True)
    return code


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` ranks on this machine (torchrun forwards signals)."""
    rest = strip_option(argv, "--nproc")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "mettle", "--", *rest]
    print("launching: " + " ".join(command[1:]), flush=True)
    os.execv(sys.executable, command)
    return 0  # not reached


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == name:
            skip = True
        elif not item.startswith(name + "="):
            out.append(item)
    return out


def train_in_process(args: argparse.Namespace, distributed: DistributedHelper) -> int:
    """Validate everything on every rank, then train (resuming a run that has checkpoints)."""
    from mettle.rl.training.checkpointer import list_checkpoints

    env_label = (args.env or DEFAULT_ENV).split(":")[-1].replace("/", "-")
    run_name = distributed.broadcast_from_master(args.run or f"{env_label}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(args.run_dir) / run_name
    existing = (run_dir / "config.json").exists() or bool(list_checkpoints(run_dir / "checkpoints"))
    if existing and args.fresh:
        raise ConfigError(f"run {run_name!r} already exists in {run_dir}; --fresh refuses to resume it "
                          "(choose another --run name, or delete the directory)")
    saved = load_run_config(run_dir) if (run_dir / "config.json").exists() else None
    cfg = resolve_train_config(args, saved)
    distributed.synchronize()  # every rank has read the run dir before rank 0 writes to it
    if cfg.global_batch:
        try:
            cfg = cfg.model_copy(update={"trainer": distributed.scale_batches_by_world_size(cfg.trainer)})
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    return run_training(cfg, run_name, run_dir, distributed)


def run_training(cfg: RunConfig, run_name: str, run_dir: Path, distributed: DistributedHelper) -> int:
    """Build env, policy and trainer with its components; train; write the final policy (rank 0)."""
    from mettle.agent.registry import build_policy
    from mettle.envs.factory import make_environment
    from mettle.rl.trainer import Trainer
    from mettle.rl.training.checkpointer import CheckpointError, atomic_write, save_policy

    master = distributed.is_master()
    env = make_environment(cfg.env, seed=cfg.trainer.seed)
    try:
        policy = build_policy(cfg.policy.kind, hidden_size=cfg.policy.hidden_size)
        try:
            trainer = Trainer(cfg.trainer, env, policy, distributed.local_device(cfg.device), distributed, run_name)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if master:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / "config.json", lambda f: f.write(cfg.model_dump_json(indent=2).encode()))
        shutdown = register_components(trainer, cfg, run_dir)
        try:
            resumed = trainer.restore()
        except CheckpointError as error:
            raise ConfigError(str(error)) from None
        state = trainer.context.state
        if resumed is not None and master:
            print(f"resuming run {run_name} from {resumed} at agent step {state.agent_step:,} (epoch {state.epoch})")
        if master:
            ranks = f" on {distributed.get_world_size()} ranks" if distributed.is_distributed else ""
            print(f"training {cfg.env.name} with {cfg.policy.kind} policy{ranks}; run dir {run_dir}", flush=True)
        trainer.train()
        if master:
            save_policy(policy, env.policy_env_info, run_dir, agent_step=state.agent_step, epoch=state.epoch)
            if shutdown.received is not None or state.agent_step < cfg.trainer.total_timesteps:
                print(f"stopped at agent step {state.agent_step:,}; resume with: "
                      f"mettle train --run {run_name} --run-dir {run_dir.parent}", flush=True)
            else:
                print(f"policy written to {run_dir / 'policy.safetensors'}")
    finally:
        env.close()
    return 0


def register_components(trainer: Trainer, cfg: RunConfig, run_dir: Path) -> GracefulShutdown:
    """The run's components in callback order: tuners, then measurements, reporters, and the checkpointer last."""
    from mettle.rl.training import ContextCheckpointer
    from mettle.rl.training.components.gradients import GradientReporter
    from mettle.rl.training.components.heartbeat import Heartbeat
    from mettle.rl.training.components.monitor import Monitor
    from mettle.rl.training.components.profiler import TorchProfiler
    from mettle.rl.training.components.progress import ProgressLogger
    from mettle.rl.training.components.signals import GracefulShutdown
    from mettle.rl.training.components.stats import StatsReporter

    optional = [
        cfg.schedules.build(),
        cfg.autotuner.build(),
        Monitor(cfg.monitor.interval) if cfg.monitor.enabled else None,
        GradientReporter(cfg.gradients.interval, cfg.gradients.per_layer) if cfg.gradients.enabled else None,
        cfg.evaluator.build(evaluation_envs(cfg), seed=cfg.trainer.seed + 12345),
        TorchProfiler(run_dir / "profiles", cfg.profiler.interval, cfg.profiler.record_shapes)
        if cfg.profiler.enabled else None,
        StatsReporter.from_config(cfg.stats, run_dir, trainer.context.run_name or run_dir.name,
                                  cfg.model_dump(mode="json")) if trainer.context.distributed.is_master() else None,
        ProgressLogger(interval_s=cfg.progress_interval_s),
        Heartbeat(run_dir / "heartbeat.json", cfg.heartbeat.interval) if cfg.heartbeat.enabled else None,
    ]
    for component in optional:
        if component is not None:
            trainer.register(component)
    shutdown = GracefulShutdown()
    trainer.register(shutdown)
    trainer.register(ContextCheckpointer(run_dir / "checkpoints", epoch_interval=cfg.checkpoint_interval))
    return shutdown


def evaluation_envs(cfg: RunConfig) -> dict[str, Callable[[], TrainingEnvironment]]:
    """Factories for the Evaluator: the training env and any extra ones, in-process, with the evaluator's size."""
    from mettle.envs.factory import make_environment

    def factory(name: str) -> Callable[[], TrainingEnvironment]:
        kwargs = cfg.env.kwargs if name == cfg.env.name else {}
        env_cfg = cfg.env.model_copy(update={"name": name, "vectorization": "serial", "kwargs": kwargs})
        return lambda: make_environment(env_cfg, seed=cfg.trainer.seed + 777, num_envs=cfg.evaluator.num_envs)

    names = [cfg.env.name, *(name for name in cfg.evaluator.envs if name != cfg.env.name)]
    return {name: factory(name) for name in names}


def load_newest_policy(path: Path, device: str) -> tuple[Policy, PolicyEnvInfo, Path]:
    """The newest intact checkpoint's policy under `path` (or `path` itself), named on stderr; flaws are one line."""
    from mettle.rl.training.checkpointer import CheckpointError, newest_usable_policy

    try:
        policy, env_info, used = newest_usable_policy(path, device)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    print(f"using checkpoint {used}", file=sys.stderr, flush=True)
    return policy, env_info, used


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

    if args.episodes < 1:
        raise ConfigError(f"--episodes {args.episodes} must be at least 1")
    path = Path(args.run_dir)
    if not path.exists():
        raise ConfigError(f"run directory {path} does not exist")
    cfg = load_run_config(path)
    policy, _, _ = load_newest_policy(path, cfg.device)
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


def play_command(args: argparse.Namespace) -> int:
    """`mettle play RUN_DIR [--save FILE]` or `mettle play --replay FILE`."""
    from mettle.play import play_run, replay_file

    if args.replay is not None:
        if args.run_dir is not None:
            raise ConfigError("give either RUN_DIR or --replay FILE, not both")
        return replay_file(args.replay, args.fps, sys.stdout)
    if args.run_dir is None:
        raise ConfigError("mettle play needs a RUN_DIR (or --replay FILE)")
    return play_run(Path(args.run_dir), args.steps, args.fps, args.save, sys.stdout, args.seed, not args.sample)


if __name__ == "__main__":
    sys.exit(main())
