"""`mettle train | eval | play | report | sweep`: the command line over the Trainer."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mettle.config import ConfigError, RunConfig, build_run_config, parse_value
from mettle.errors import exception_chain, one_line
from mettle.files import is_plain_name
from mettle.launch import COMMAND_ENV, EXIT_SIGNAL_BASE, ProcessDied, launch_torchrun, launched_rank, strip_option
from mettle.recipes import recipe_for
from mettle.runtime import use_torch_threads

if TYPE_CHECKING:
    from mettagrid.config.mettagrid_config import MettaGridConfig

    from mettle.agent.policy import Policy
    from mettle.contracts import PolicyEnvInfo, TrainingEnvironment
    from mettle.envs.mettagrid_families import Suite
    from mettle.rl.training import DistributedHelper, TrainerComponent
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
    train.add_argument("--fresh", action="store_true", help="start a new run: refuse one with an intact checkpoint; "
                       "an earlier run without one is moved aside into RUN/previous-<time>/")
    train.add_argument("--nproc", type=int, default=1, help="ranks on this machine (launches torchrun)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. batch_size=4096")
    evaluate = sub.add_parser("eval", help="evaluate a trained run")
    evaluate.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    evaluate.add_argument("--episodes", type=int, default=20, help="episodes to run (default 20)")
    add_action_options(evaluate)
    evaluate.add_argument("--seed", type=int, default=12345, help="environment seed (default 12345)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--env", default=None, help="environment to evaluate on (default: the run's); a module a "
                          "run's config.json names is imported only when it is typed here")
    evaluate.add_argument("--suite", default=None, metavar="NAME|FILE", help="score held-out MettaGrid variants "
                          "instead: a shipped suite (arena-heldout, navigation-heldout) or a suite .yaml/.json; "
                          "--episodes agent-episodes on each")
    play = sub.add_parser("play", help="watch a trained MettaGrid policy act, or play back a MettaScope replay")
    play.add_argument("run_dir", nargs="?", help="a run directory (or one checkpoint directory)")
    play.add_argument("--replay", type=Path, default=None, metavar="FILE", help="play back a replay (.json.z)")
    play.add_argument("--save", nargs="?", const="", default=None, metavar="DIR",
                      help="also save the episode as a MettaScope replay in DIR (default RUN_DIR/replays)")
    play.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: one episode)")
    play.add_argument("--fps", type=float, default=8.0, help="frames per second (0: as fast as possible)")
    play.add_argument("--seed", type=int, default=0, help="environment seed (default 0)")
    add_action_options(play)
    report = sub.add_parser("report", help="plots and a text summary of a run")
    report.add_argument("run_dir", help="a run directory made by `mettle train`")
    report.add_argument("--out", default=None, metavar="DIR", help="where to write the plots (default RUN_DIR/report)")
    export = sub.add_parser("export", help="write a run's acting policy as an ONNX or TorchScript file")
    export.add_argument("run_dir", help="a run directory (or one checkpoint directory)")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="graph format (default onnx)")
    export.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="file to write (default RUN_DIR/policy.onnx or .pt); FILE.json describes it")
    from mettle.sweep import add_sweep_parser

    add_sweep_parser(sub)
    return parser


def add_action_options(command: argparse.ArgumentParser) -> None:
    """--sample / --greedy (one at most) into `args.actions`; unset, the env family decides (MettaGrid samples)."""
    group = command.add_mutually_exclusive_group()
    group.add_argument("--sample", dest="actions", action="store_const", const="sampled", default="auto",
                       help="sample actions from the policy (default on MettaGrid, where greedy agents block "
                            "each other)")
    group.add_argument("--greedy", dest="actions", action="store_const", const="greedy",
                       help="take each action head's argmax, a Gaussian head's mean (default on Gymnasium and "
                            "PettingZoo)")


EXIT_CRASH = 1  # a bug (a traceback follows), or a process the run needs died (one line: actor, env worker, rank)
EXIT_USAGE = 2  # bad input: one line says what to change
EXIT_IO = 74  # EX_IOERR: the disk or file system failed (full, read-only, I/O error); the last checkpoint is intact
# EXIT_SIGNAL_BASE (launch.py): stopped by signal N (after writing a checkpoint): 128 + N, as shells report it
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; see the README for every exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "train":
            check_run_location(args.run, args.run_dir)
            return train_command(args, argv)
        if args.command == "play":
            return play_command(args)
        if args.command == "report":
            from mettle.report import report_command

            return report_command(args.run_dir, args.out)
        if args.command == "export":
            from mettle.export import export_command

            return export_command(Path(args.run_dir), args.format, args.out)
        if args.command == "sweep":
            from mettle.sweep import sweep_command

            return sweep_command(args, argv)
        return eval_command(args)
    except ConfigError as error:
        print(f"mettle: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # train catches it itself once anything is written: this is before that
        before = ", before training started; nothing was written" if args.command == "train" else ""
        print(f"mettle: stopped by SIGINT{before}", file=sys.stderr, flush=True)
        return EXIT_SIGNAL_BASE + signal.SIGINT


def parse_args(argv: list[str]) -> argparse.Namespace:
    """argparse, with key=value overrides accepted before, between and after the options of every subcommand that
    takes them (train, sweep)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [item for item in extra if "=" in item and not item.startswith("-")]
        extra = [item for item in extra if "=" not in item or item.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def check_run_location(run: str | None, run_dir: str) -> None:
    """A run name is one path component, and where a run is written is a directory (or does not exist yet)."""
    if run is not None and not is_plain_name(run):
        raise ConfigError(f"--run {run!r} must be a name, not a path (no '/', '.' or '..'); "
                          "choose where runs are kept with --run-dir")
    where = Path(run_dir)
    for path in (where / run if run else where, where, *where.parents):
        if path.exists() and not path.is_dir():
            option = "--run" if run and path == where / run else "--run-dir"
            raise ConfigError(f"{option}: {path} is a file, not a directory; choose another {option}")
        if path.exists():
            return


def typed_env_names(args: argparse.Namespace) -> set[str]:
    """Env names the user typed on this command line (--env, env.name=, evaluator.envs=): trusted to import."""
    names = {args.env} if getattr(args, "env", None) else set()
    for item in getattr(args, "overrides", []):
        key, _, raw = item.partition("=")
        if key.strip() in ("env.name", "evaluator.envs"):
            value = parse_value(raw)
            names.update(value if isinstance(value, list) else [value])
    return {name for name in names if isinstance(name, str)}


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


def train_command(args: argparse.Namespace, argv: list[str], components: Sequence[TrainerComponent] = ()) -> int:
    """Launch torchrun for --nproc, else train in this process (one rank of many under torchrun), with `components`
    (a sweep's trial reporter) after the config's."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc} must be at least 1 (the number of ranks on this machine)")
    command = os.environ.get(COMMAND_ENV) or user_command(argv)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_ranks(args, argv, command)
    from mettle.rl.training.components.signals import install_early_handlers

    install_early_handlers(announce=not launched_rank())
    from mettle.rl.training import DistributedHelper

    distributed = DistributedHelper("cuda" if torch.cuda.is_available() else "cpu")
    master = distributed.is_master()
    try:
        code = train_in_process(args, distributed, command, components)
    except BaseException as error:
        distributed.cleanup()
        if isinstance(error, ConfigError) and not master:
            return EXIT_USAGE  # every rank fails alike: rank 0 says it, once
        raise
    distributed.cleanup(synchronize=code == 0 or code > EXIT_SIGNAL_BASE)
    return code


def launch_ranks(args: argparse.Namespace, argv: list[str], command: str) -> int:
    """Check the command line once, then torchrun `--nproc` ranks under one run name; a killed rank is one line."""
    run_name = args.run or default_run_name(args.env)
    run_dir = Path(args.run_dir) / run_name
    check_before_launch(args, run_name, run_dir)
    resume = resume_command(command, run_name)
    try:
        return launch_torchrun(args.nproc, argv if args.run else with_run(argv, run_name), command,
                               lambda: resume_hint(resume, run_dir))
    except ProcessDied as death:
        print(f"mettle: error: {death}; {resume_hint(resume, run_dir)}", file=sys.stderr, flush=True)
        return EXIT_CRASH


def check_before_launch(args: argparse.Namespace, run_name: str, run_dir: Path) -> None:
    """What every rank would reject (a bad override, batches that do not split), said once before torchrun starts.

    Read-only, as prepare_config reads the run; the ranks still check everything (the run lock included).
    """
    from mettle.rl.training.distributed import split_batches
    from mettle.run import check_normalization_env

    cfg, _ = read_run_config(args, run_name, run_dir)
    check_normalization_env(cfg)
    if cfg.global_batch:
        try:
            split_batches(cfg.trainer, args.nproc)
        except ValueError as error:
            raise ConfigError(str(error)) from None


def default_run_name(env: str | None) -> str:
    """`<env>-<time>`: the name of a run started without --run."""
    env_label = (env or DEFAULT_ENV).split(":")[-1].replace("/", "-")
    return f"{env_label}-{time.strftime('%Y%m%d-%H%M%S')}"


def with_run(argv: list[str], run_name: str) -> list[str]:
    """argv with `--run NAME` right after `train` (the launcher names the run, so every rank uses that name)."""
    at = argv.index("train")
    return [*argv[: at + 1], "--run", run_name, *argv[at + 1:]]


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


def train_in_process(args: argparse.Namespace, distributed: DistributedHelper, command: str,
                     components: Sequence[TrainerComponent] = ()) -> int:
    """Lock the run (rank 0), validate everything on every rank, then train (resuming a run with checkpoints)."""
    from mettle.runlock import RunLock

    run_name = distributed.broadcast_from_master(args.run or default_run_name(args.env))
    run_dir = Path(args.run_dir) / run_name
    resume = resume_command(command, run_name)
    with RunLock(run_dir) as lock:
        try:
            lock_run(lock, run_name, distributed)
            cfg = prepare_config(args, run_name, run_dir, distributed)
            return run_training(cfg, run_name, run_dir, distributed, resume, components)
        except KeyboardInterrupt:
            print(f"mettle: stopped at once by a second SIGINT, without a final checkpoint; "
                  f"{resume_hint(resume, run_dir)}", file=sys.stderr, flush=True)
            return EXIT_SIGNAL_BASE + signal.SIGINT
        except Exception as error:
            death = process_death(error)
            if death is not None:
                print(f"mettle: error: {death}; {resume_hint(resume, run_dir)}", file=sys.stderr,
                      flush=True)
                return EXIT_CRASH
            code = lost_peer(error, resume, run_dir)
            if code is not None:
                return code
            failure = environment_failure(error)
            if failure is None:
                raise
            print(f"mettle: error: {failure} (run {run_dir}); free space or fix the file system, then "
                  f"{resume_hint(resume, run_dir)}", file=sys.stderr, flush=True)
            return EXIT_IO


def lock_run(lock: RunLock, run_name: str, distributed: DistributedHelper) -> None:
    """Rank 0 takes the run lock before anything is written; every rank learns the outcome and fails alike."""
    from mettle.runlock import RunLocked

    refusal = None
    if distributed.is_master():
        try:
            lock.acquire(run_name)
        except (ConfigError, OSError) as error:  # RunLocked, a lock that is not a regular file, a read-only dir
            refusal = error
    message = distributed.broadcast_from_master(None if refusal is None else str(refusal))
    if refusal is not None:
        raise refusal
    if message is not None:
        raise RunLocked(message)


RUN_RECORDS = ("config.json", "checkpoints", "metrics.jsonl", "policy.safetensors", "policy.json", "manifest.json")
"""What a run that trained leaves in its directory: their presence means there is something to resume or to lose."""
RUN_OUTPUTS = (*RUN_RECORDS, "tensorboard", "profiles", "wandb", "heartbeat.json")
"""Everything `mettle train` writes in a run directory (the last four from the moment a run is built)."""
RUN_SUBDIRS = ("checkpoints", "tensorboard", "profiles", "wandb")
"""The entries of RUN_OUTPUTS that are directories."""


def prepare_config(args: argparse.Namespace, run_name: str, run_dir: Path, distributed: DistributedHelper) -> RunConfig:
    """The run's config on every rank: saved (when resuming) + command line, scaled to the world size."""
    cfg, start_over = read_run_config(args, run_name, run_dir)
    distributed.synchronize()  # every rank has read the run dir before rank 0 writes to it
    if start_over and distributed.is_master():
        move_aside(run_dir, [name for name in RUN_OUTPUTS if (run_dir / name).exists()])
    distributed.synchronize()
    if cfg.global_batch:
        try:
            cfg = cfg.model_copy(update={"trainer": distributed.scale_batches_by_world_size(cfg.trainer)})
        except ValueError as error:
            raise ConfigError(str(error)) from None
    use_torch_threads(cfg.torch_threads)
    return cfg


def read_run_config(args: argparse.Namespace, run_name: str, run_dir: Path) -> tuple[RunConfig, bool]:
    """Read-only: the saved config (when resuming) + command line, and whether --fresh starts an earlier run over."""
    from mettle.run import load_run_config

    check_run_entries(run_dir)
    start_over = check_earlier_run(args, run_name, run_dir)
    resuming = not start_over and (run_dir / "config.json").exists()
    saved = load_run_config(run_dir, typed_env_names(args)) if resuming else None
    return resolve_train_config(args, saved), start_over


def check_run_entries(run_dir: Path) -> None:
    """Refuse links and misplaced files where training writes, so that no write lands outside the run directory."""
    checkpoints = run_dir / "checkpoints"
    entries = [(run_dir / name, name in RUN_SUBDIRS) for name in RUN_OUTPUTS]
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        entries += [(path, True) for path in checkpoints.iterdir()
                    if path.name.isdigit() or path.name == "damaged" or path.name.startswith(".staging-")]
    for path, directory in entries:
        kind = stat.S_IFMT(path.lstat().st_mode) if path.is_symlink() or path.exists() else None
        if kind is not None and kind != (stat.S_IFDIR if directory else stat.S_IFREG):
            found = {stat.S_IFLNK: "a symbolic link", stat.S_IFDIR: "a directory", stat.S_IFREG: "a file"}.get(
                kind, "a special file (a FIFO or device)")
            raise ConfigError(f"{path} is {found} where training writes {'a directory' if directory else 'a file'}; "
                              "move it out of the run directory (or restore it from a backup), then retry")


def earlier_run_files(run_dir: Path) -> list[str]:
    """The names of `RUN_RECORDS` present in `run_dir` (links included; an empty directory holds nothing to lose)."""
    def holds_something(path: Path) -> bool:
        return path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir()))

    return [name for name in RUN_RECORDS if holds_something(run_dir / name)]


def check_earlier_run(args: argparse.Namespace, run_name: str, run_dir: Path) -> bool:
    """Whether to start over (--fresh on a run with no intact checkpoint); refuse to train over an earlier run."""
    from mettle.rl.policy_files import list_checkpoints
    from mettle.rl.training.checkpointer import newest_intact_checkpoint

    leftovers = earlier_run_files(run_dir)
    if not leftovers:
        return False
    if args.fresh:
        if newest_intact_checkpoint(run_dir / "checkpoints") is not None:
            raise ConfigError(f"run {run_name!r} already exists in {run_dir} with a checkpoint; --fresh refuses to "
                              "resume it (choose another --run name, or delete the directory)")
        return True
    if not list_checkpoints(run_dir / "checkpoints"):
        raise ConfigError(f"run {run_name!r} in {run_dir} holds an earlier run's files ({', '.join(leftovers)}) but "
                          "no checkpoint to resume from, and training would overwrite them; pass --fresh to start "
                          f"over (they are moved aside into {run_dir}/previous-<time>/), or choose another --run name")
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"run {run_name!r} in {run_dir} has no config.json, so it cannot be resumed as it was "
                          "trained; restore config.json from a backup, or choose another --run name")
    return False


def move_aside(run_dir: Path, names: list[str]) -> Path:
    """Move an earlier run's files into `run_dir/previous-<time>/`, so starting over deletes nothing."""
    from mettle.files import fsync_dir

    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, suffix = run_dir / f"previous-{stamp}", 1
    while target.exists() or target.is_symlink():  # a dangling link counts as taken
        suffix += 1
        target = run_dir / f"previous-{stamp}-{suffix}"
    target.mkdir()
    for name in names:
        os.replace(run_dir / name, target / name)
    fsync_dir(run_dir)
    print(f"--fresh: moved the earlier run's {', '.join(names)} to {target}", flush=True)
    return target


def process_death(error: BaseException) -> str | None:
    """A process the run needs died (the overlap actor, an env worker: killed, out of memory): the line that says
    which, for one line instead of a traceback. The actor hands on a worker death it saw as its error's cause."""
    from mettle.envs.vector import EnvironmentWorkerError
    from mettle.rl.training.actor import ActorError

    if isinstance(error, ActorError) and not error.raised:
        return str(error)
    for seen in (error, error.__cause__):
        if isinstance(seen, EnvironmentWorkerError) and seen.died:
            return str(seen)
    return None


PEER_STOP_WAIT_S = 3.0
"""How long a rank whose collective failed waits for torchrun's SIGTERM, the sign that a peer's failure is known."""


def lost_peer(error: Exception, resume: str, run_dir: Path) -> int | None:
    """A collective failed because another rank died: under `--nproc` the launcher names that rank, so this one
    leaves quietly once torchrun tells it to stop; otherwise one line says what this rank saw. Exit 1; None
    when `error` is no failed collective."""
    from mettle.rl.training.components.signals import received_signal
    from mettle.rl.training.distributed import backend_reason, collective_failure

    if not collective_failure(error):
        return None
    deadline = time.monotonic() + PEER_STOP_WAIT_S
    while launched_rank() and received_signal() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not (launched_rank() and received_signal() is not None):
        print(f"mettle: error: {backend_reason(error)}; another rank died or left (its own output or torchrun's "
              f"says why); {resume_hint(resume, run_dir)}", file=sys.stderr, flush=True)
    return EXIT_CRASH


def environment_failure(error: BaseException) -> str | None:
    """`[Errno 28] No space left on device: FILE` and the like, found anywhere in the exception chain."""
    for current in exception_chain(error):
        if isinstance(current, OSError) and current.errno in ENVIRONMENT_ERRNOS:
            return str(current)
        if "No space left on device" in str(current) or "errno 28" in str(current).lower():
            return f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} ({str(current).splitlines()[0][:200]})"
    return None


def resume_hint(resume: str, run_dir: Path) -> str:
    """`resume with: CMD; <which checkpoint>`, or how to start over when no checkpoint was written (resume refuses)."""
    from mettle.rl.policy_files import list_checkpoints

    if list_checkpoints(run_dir / "checkpoints") or not earlier_run_files(run_dir):
        return f"resume with: {resume}; {intact(run_dir)}"
    return f"no checkpoint was written yet, so start over with: {resume} --fresh"


def intact(run_dir: Path) -> str:
    """Which checkpoint a resume will start from: the newest that verifies (read-only), not merely the newest."""
    from mettle.rl.policy_files import list_checkpoints
    from mettle.rl.training.checkpointer import newest_intact_checkpoint

    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        return "no checkpoint was written yet"
    newest = newest_intact_checkpoint(run_dir / "checkpoints")
    if newest is None:
        return f"no checkpoint in {run_dir / 'checkpoints'} is intact"
    if newest == checkpoints[-1]:
        return f"the last checkpoint {newest} is intact"
    return f"the newest intact checkpoint is {newest} (newer ones are damaged)"


def run_training(cfg: RunConfig, run_name: str, run_dir: Path, distributed: DistributedHelper, resume: str,
                 components: Sequence[TrainerComponent] = ()) -> int:
    """Build and restore the run, save its config, train, write the final policy (rank 0) and say what happened.

    Returns 0 when done, 128+N when signal N stopped the run (after its checkpoint).
    """
    from mettle.files import atomic_write
    from mettle.rl.policy_files import save_policy
    from mettle.run import build_run

    master = distributed.is_master()
    with build_run(cfg, run_dir, distributed, run_name, components) as run:
        shutdown, state = run.shutdown, run.trainer.context.state
        assert shutdown is not None  # a run with a directory has its signal handler
        if distributed.any_rank(shutdown.received is not None):
            signum = shutdown.received or signal.SIGTERM
            if master:
                print(f"stopped by {signal.Signals(signum).name} before training started; "
                      f"{resume_hint(resume, run_dir)}",
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
    policy = f"{run.config.policy.kind} policy" + ("" if run.config.policy.share else " per agent type")
    print(f"training {run.config.env.name} with {policy}{ranks}; run dir {run.run_dir}",
          flush=True)


def eval_command(args: argparse.Namespace) -> int:
    """Load a run's policy, run whole episodes and print return statistics and how actions were chosen."""
    from mettle.envs.factory import make_environment
    from mettle.rl.evaluate import actions_line, evaluate_policy, isolated_rng, resolve_actions, summarize_returns

    if args.episodes < 1:
        raise ConfigError(f"--episodes {args.episodes} must be at least 1")
    path = Path(args.run_dir)
    if not path.exists():
        raise ConfigError(f"run directory {path} does not exist")
    from mettle.run import load_newest_policy, load_run_config, missing_device

    cfg = load_run_config(path, typed_env_names(args), env_name=args.env)
    use_torch_threads(cfg.torch_threads)
    problem = missing_device(cfg.device)
    device = "cpu" if problem else cfg.device
    if problem:
        print(f"mettle: the run trained on {cfg.device}, but {problem}: evaluating on cpu", file=sys.stderr)
    suite = read_suite(args.suite) if args.suite is not None else None  # bad input fails before any loading
    policy, trained_on, _ = load_newest_policy(path, device)
    if suite is not None:
        return eval_suite(args, suite, policy, trained_on, device)
    env = make_environment(cfg.env, seed=args.seed, num_envs=min(args.episodes, cfg.env.num_envs))
    try:
        check_same_spaces(env.policy_env_info, trained_on, f"--env {cfg.env.name}")
        mode = resolve_actions(args.actions, cfg.env.name)
        print(actions_line(args.actions, cfg.env.name), file=sys.stderr if args.json else sys.stdout, flush=True)
        with isolated_rng(args.seed, torch.device(device)):  # sampled episodes repeat for a --seed
            infos = evaluate_policy(policy, env, args.episodes, device, mode == "greedy", args.seed)
    finally:
        env.close()
    summary: dict[str, Any] = {**summarize_returns(infos), "actions": mode}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['episodes']} episodes: mean return {summary['mean_return']:.2f} "
              f"± {summary['std_return']:.2f} (min {summary['min_return']:.2f}, max {summary['max_return']:.2f}), "
              f"mean length {summary['mean_length']:.1f}")
    return 0


def check_same_spaces(given: PolicyEnvInfo, trained_on: PolicyEnvInfo, what: str) -> None:
    """Refuse, in one line, to evaluate a policy on spaces other than those it was trained on."""
    if (given.observation_space, given.action_layout) != (trained_on.observation_space, trained_on.action_layout):
        from mettle.rl.loss.kickstarter import describe

        raise ConfigError(f"{what} gives observations {describe(given.observation_space)} and "
                          f"actions {describe(given.action_space)}, but the policy was trained on "
                          f"{describe(trained_on.observation_space)} and {describe(trained_on.action_space)}; "
                          "evaluate it on an environment with the same spaces")


def read_suite(name_or_path: str) -> Suite:
    """The suite `--suite` names; an unknown name or a bad file is one ConfigError line."""
    from mettle.envs.mettagrid_families import load_suite

    try:
        return load_suite(name_or_path)
    except ValueError as error:
        raise ConfigError(f"--suite {name_or_path}: {one_line(error)}") from None


def eval_suite(args: argparse.Namespace, suite: Suite, policy: Policy, trained_on: PolicyEnvInfo, device: str) -> int:
    """`mettle eval RUN --suite NAME|FILE`: each held-out variant's return statistics, and their mean."""
    from mettle.envs.mettagrid import MettaGridEnvironment
    from mettle.rl.evaluate import actions_line, evaluate_suite, isolated_rng, resolve_actions

    label = f"mettagrid:{suite.name}"
    mode = resolve_actions(args.actions, label)
    print(actions_line(args.actions, label), file=sys.stderr if args.json else sys.stdout, flush=True)

    def factory(name: str, config: MettaGridConfig) -> Callable[[], TrainingEnvironment]:
        games = max(1, -(-args.episodes // config.game.num_agents))  # enough games for the episodes at once
        return lambda: MettaGridEnvironment(config, num_envs=games, seed=args.seed, name=f"{suite.name}/{name}")

    variants = {name: factory(name, config) for name, config in suite.variants}
    with next(iter(variants.values()))() as first:
        check_same_spaces(first.policy_env_info, trained_on, f"--suite {suite.name}")
    with isolated_rng(args.seed, torch.device(device)):
        result = evaluate_suite(policy, variants, args.episodes, device, mode == "greedy", args.seed)
    summary = {"suite": suite.name, "actions": mode, **result}
    if args.json:
        print(json.dumps(summary))
        return 0
    for name, score in result["variants"].items():
        print(f"{name}: mean return {score['mean_return']:.2f} ± {score['std_return']:.2f} "
              f"over {score['episodes']} episodes")
    print(f"suite {suite.name}: mean of the {len(variants)} variants' mean returns {result['mean_return']:.2f}")
    return 0


def play_command(args: argparse.Namespace) -> int:
    """`mettle play RUN_DIR [--save [DIR]]` or `mettle play --replay FILE`."""
    from mettle.play import default_replay_dir, play_run, replay_file

    if args.replay is not None:
        if args.run_dir is not None:
            raise ConfigError("give either RUN_DIR or --replay FILE, not both")
        return replay_file(args.replay, args.fps, sys.stdout)
    if args.run_dir is None:
        raise ConfigError("mettle play needs a RUN_DIR (or --replay FILE)")
    save = None if args.save is None else Path(args.save) if args.save else default_replay_dir(Path(args.run_dir))
    return play_run(Path(args.run_dir), args.steps, args.fps, save, sys.stdout, args.seed, args.actions)


if __name__ == "__main__":
    sys.exit(main())
