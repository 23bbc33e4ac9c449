"""`mettle train | eval`: the command line over the Trainer."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from mettle.config import ConfigError, RunConfig, build_run_config
from mettle.recipes import recipe_for

if TYPE_CHECKING:
    from mettle.rl.training import DistributedHelper
    from mettle.run import Run
    from mettle.runlock import RunLock

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


EXIT_CRASH = 1  # a bug (a traceback follows), or the actor process died (one line)
EXIT_USAGE = 2  # bad input: one line says what to change
EXIT_IO = 74  # EX_IOERR: the disk or file system failed (full, read-only, I/O error); the last checkpoint is intact
EXIT_SIGNAL_BASE = 128  # stopped by signal N (after writing a checkpoint): 128 + N, as shells report it
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}
COMMAND_ENV = "METTLE_COMMAND"  # the command as the user ran it (set by the --nproc launcher for its ranks)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; see the README for every exit code."""
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
        return EXIT_USAGE


def resolve_train_config(args: argparse.Namespace, saved: RunConfig | None = None) -> RunConfig:
    """Recipe defaults (or the saved config when resuming), then --env/--policy, then key=value overrides."""
    overrides = [f"env.name={args.env}"] if args.env else []
    if args.policy:
        overrides.append(f"policy.kind={args.policy}")
    if saved is not None:
        from mettle.run import check_resumable

        cfg = build_run_config([*overrides, *args.overrides], base=saved.model_dump(mode="json"))
        check_resumable(saved, cfg)
        return cfg
    env_name = args.env or DEFAULT_ENV
    return build_run_config([f"env.name={env_name}", *overrides, *args.overrides],
                            defaults=recipe_for(env_name, args.policy))


def train_command(args: argparse.Namespace, argv: list[str]) -> int:
    """Launch torchrun for --nproc, else train in this process (one rank of many under torchrun)."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc} must be at least 1 (the number of ranks on this machine)")
    command = os.environ.get(COMMAND_ENV) or user_command(argv)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_torchrun(args.nproc, argv, command)
    from mettle.rl.training.components.signals import install_early_handlers

    install_early_handlers()
    from mettle.rl.training import DistributedHelper

    distributed = DistributedHelper("cuda" if torch.cuda.is_available() else "cpu")
    try:
        code = train_in_process(args, distributed, command)
    except BaseException:
        distributed.cleanup()
        raise
    distributed.cleanup(synchronize=code == 0 or code > EXIT_SIGNAL_BASE)
    return code


def user_command(argv: list[str]) -> str:
    """The command as it was typed: `mettle ...`, `.venv/bin/mettle ...` or `python -m mettle ...`."""
    program = sys.argv[0]
    if Path(program).name == "__main__.py":
        program = f"{Path(sys.executable).name} -m mettle"
    elif shutil.which(Path(program).name) == str(Path(program).resolve()) or Path(program).name == program:
        program = Path(program).name
    return f"{program} {shlex.join(argv)}"


def resume_command(command: str, run_name: str) -> str:
    """The user's command with `--run NAME` (a generated name included) and without --fresh."""
    words = shlex.split(command)
    at = words.index("train")
    rest = [word for word in strip_option(words[at + 1:], "--run") if word != "--fresh"]
    return shlex.join([*words[: at + 1], "--run", run_name, *rest])


def launch_torchrun(nproc: int, argv: list[str], command: str) -> int:
    """Run torchrun (quietly, in its own session) with `nproc` ranks; relay SIGINT/SIGTERM as a graceful stop.

    Terminal Ctrl-C reaches only this process, which asks the ranks (through torchrun) to finish their
    epoch and checkpoint; a second SIGINT kills them at once. Exit: the first failed rank's code, or 128+N.
    """
    rest = strip_option(argv, "--nproc")
    torchrun_args = ["--standalone", f"--nproc-per-node={nproc}", "-m", "mettle", "--", *rest]
    print("launching: torchrun " + shlex.join(torchrun_args), flush=True)
    child = subprocess.Popen([sys.executable, "-c", QUIET_TORCHRUN, *torchrun_args], start_new_session=True,
                             env={**os.environ, COMMAND_ENV: command}, preexec_fn=die_with_parent)
    received: list[int] = []

    def relay(signum: int, frame: FrameType | None) -> None:
        if received and signum == signal.SIGINT:
            os.killpg(child.pid, signal.SIGKILL)
        elif not received:
            os.kill(child.pid, signal.SIGTERM)
        received.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, relay)
    code = child.wait()
    if not received:
        return code if code >= 0 else EXIT_SIGNAL_BASE - code
    how = "at once, without a final checkpoint" if len(received) > 1 and received[-1] == signal.SIGINT \
        else "after the ranks' checkpoint"
    print(f"mettle: stopped by {signal.Signals(received[0]).name} {how}; resume with: {command}",
          file=sys.stderr, flush=True)
    return EXIT_SIGNAL_BASE + received[0]


QUIET_TORCHRUN = "import sys; from mettle.cli import run_torchrun; sys.exit(run_torchrun(sys.argv[1:]))"


def run_torchrun(torchrun_args: list[str]) -> int:
    """torchrun without its tracebacks: a stop by signal exits 128+N, a failed rank with that rank's code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        run(parse_args(torchrun_args))  # type: ignore[no-untyped-call]
    except SignalException as stop:
        return EXIT_SIGNAL_BASE + int(stop.sigval)
    except ChildFailedError as error:
        code = error.get_first_failure()[1].exitcode
        return code if code > 0 else EXIT_SIGNAL_BASE - code
    return 0


def die_with_parent() -> None:
    """In the torchrun child: SIGTERM (a graceful stop) when the launcher dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: ranks outlive a killed launcher (the lock says)
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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


def train_in_process(args: argparse.Namespace, distributed: DistributedHelper, command: str) -> int:
    """Lock the run (rank 0), validate everything on every rank, then train (resuming a run with checkpoints)."""
    from mettle.runlock import RunLock

    env_label = (args.env or DEFAULT_ENV).split(":")[-1].replace("/", "-")
    run_name = distributed.broadcast_from_master(args.run or f"{env_label}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(args.run_dir) / run_name
    resume = resume_command(command, run_name)
    with RunLock(run_dir) as lock:
        try:
            lock_run(lock, run_name, distributed)
            cfg = prepare_config(args, run_name, run_dir, distributed)
            return run_training(cfg, run_name, run_dir, distributed, resume)
        except KeyboardInterrupt:
            print(f"mettle: stopped at once by a second SIGINT, without a final checkpoint; {intact(run_dir)}; "
                  f"resume with: {resume}", file=sys.stderr, flush=True)
            return EXIT_SIGNAL_BASE + signal.SIGINT
        except Exception as error:
            if is_actor_death(error):
                print(f"mettle: error: {error}; resume with: {resume}; {intact(run_dir)}", file=sys.stderr,
                      flush=True)
                return EXIT_CRASH
            failure = environment_failure(error)
            if failure is None:
                raise
            print(f"mettle: error: {failure} (run {run_dir}); free space or fix the file system, then resume "
                  f"with: {resume}; {intact(run_dir)}", file=sys.stderr, flush=True)
            return EXIT_IO


def lock_run(lock: RunLock, run_name: str, distributed: DistributedHelper) -> None:
    """Rank 0 takes the run lock before anything is written; every rank learns the outcome and fails alike."""
    from mettle.runlock import RunLocked

    refusal = None
    if distributed.is_master():
        try:
            lock.acquire(run_name)
        except (RunLocked, OSError) as error:
            refusal = error
    message = distributed.broadcast_from_master(None if refusal is None else str(refusal))
    if isinstance(refusal, OSError):
        raise refusal
    if message is not None:
        raise RunLocked(message)


def prepare_config(args: argparse.Namespace, run_name: str, run_dir: Path, distributed: DistributedHelper) -> RunConfig:
    """The run's config on every rank: saved (when resuming) + command line, scaled to the world size."""
    from mettle.rl.training.checkpointer import list_checkpoints

    existing = (run_dir / "config.json").exists() or bool(list_checkpoints(run_dir / "checkpoints"))
    if existing and args.fresh:
        raise ConfigError(f"run {run_name!r} already exists in {run_dir}; --fresh refuses to resume it "
                          "(choose another --run name, or delete the directory)")
    from mettle.run import load_run_config

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
    return cfg


def is_actor_death(error: BaseException) -> bool:
    """The actor process of overlapped training died (killed, out of memory): one line says so, no traceback."""
    from mettle.rl.training.actor import ActorError

    return isinstance(error, ActorError) and not error.raised


def environment_failure(error: BaseException) -> str | None:
    """`[Errno 28] No space left on device: FILE` and the like, found anywhere in the exception chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in ENVIRONMENT_ERRNOS:
            return str(current)
        if "No space left on device" in str(current) or "errno 28" in str(current).lower():
            return f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} ({str(current).splitlines()[0][:200]})"
        current = current.__cause__ or current.__context__
    return None


def intact(run_dir: Path) -> str:
    """Which checkpoint a resume will start from."""
    from mettle.rl.training.checkpointer import list_checkpoints

    checkpoints = list_checkpoints(run_dir / "checkpoints")
    return f"the last checkpoint {checkpoints[-1]} is intact" if checkpoints else "no checkpoint was written yet"


def run_training(cfg: RunConfig, run_name: str, run_dir: Path, distributed: DistributedHelper, resume: str) -> int:
    """Build and restore the run, save its config, train, write the final policy (rank 0) and say what happened.

    Returns 0 when done, 128+N when signal N stopped the run (after its checkpoint).
    """
    from mettle.files import atomic_write
    from mettle.rl.training.checkpointer import save_policy
    from mettle.run import build_run

    master = distributed.is_master()
    with build_run(cfg, run_dir, distributed, run_name) as run:
        shutdown, state = run.shutdown, run.trainer.context.state
        assert shutdown is not None  # a run with a directory has its signal handler
        if distributed.any_rank(shutdown.received is not None):
            signum = shutdown.received or signal.SIGTERM
            if master:
                print(f"stopped by {signal.Signals(signum).name} before training started; resume with: {resume}",
                      flush=True)
            return EXIT_SIGNAL_BASE + signum
        if master:  # only now: a restore that fails leaves the saved config as it was
            atomic_write(run_dir / "config.json", lambda f: f.write(run.config.model_dump_json(indent=2).encode()))
            announce(run, run_name, distributed)
        run.trainer.train()
        if master:
            save_policy(run.policy, run.env.policy_env_info, run_dir, agent_step=state.agent_step, epoch=state.epoch)
            if shutdown.received is not None or state.agent_step < run.config.trainer.total_timesteps:
                print(f"stopped at agent step {state.agent_step:,}; resume with: {resume}", flush=True)
            else:
                print(f"policy written to {run_dir / 'policy.safetensors'}")
    return 0 if shutdown.received is None else EXIT_SIGNAL_BASE + shutdown.received


def announce(run: Run, run_name: str, distributed: DistributedHelper) -> None:
    """Say whether the run resumes (from which checkpoint) and what it trains."""
    state = run.trainer.context.state
    if run.resumed_from is not None:
        print(f"resuming run {run_name} from {run.resumed_from} at agent step {state.agent_step:,} "
              f"(epoch {state.epoch})")
    ranks = f" on {distributed.get_world_size()} ranks" if distributed.is_distributed else ""
    print(f"training {run.config.env.name} with {run.config.policy.kind} policy{ranks}; run dir {run.run_dir}",
          flush=True)


def eval_command(args: argparse.Namespace) -> int:
    """Load a run's policy, run whole episodes and print return statistics."""
    from mettle.envs.factory import make_environment
    from mettle.rl.evaluate import evaluate_policy, summarize_returns

    if args.episodes < 1:
        raise ConfigError(f"--episodes {args.episodes} must be at least 1")
    path = Path(args.run_dir)
    if not path.exists():
        raise ConfigError(f"run directory {path} does not exist")
    from mettle.run import load_newest_policy, load_run_config

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
