"""`mettle sweep`: an Optuna study whose trials are ordinary `mettle train` runs under the sweep directory.

The study lives in an RDB storage (sqlite in the sweep directory by default; PostgreSQL or MySQL so that
machines running the same command join one study) and is maximised: the Evaluator's score (its suite's mean
where it has one) when the evaluator is on, else the mean return of the last 20 episodes of training. A median
pruner reads each evaluation (or each epoch's mean return) and stops a poor trial cleanly. Each trial is trained
by `mettle train`'s own code path into `<sweep dir>/trial-NNNN/`, so it is resumable like any run. A trial left
RUNNING by a process that is gone (kill -9, a crash) is marked FAIL when the command starts again; on other
machines Optuna's heartbeats find them. `--jobs J` runs J worker processes, each training its trials itself.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from mettle.errors import ConfigError, one_line
from mettle.rl.training.component import TrainerComponent
from mettle.rl.training.components.evaluator import Evaluator

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage

    from mettle.sweep_space import Distribution

HEARTBEAT_S = 20
"""Seconds between a running trial's heartbeats in the storage."""
GRACE_S = 120
"""A trial whose last heartbeat is older than this is taken for dead (by a process on another machine)."""
CONNECT_TIMEOUT_S = 10
"""How long opening a PostgreSQL or MySQL storage may wait for the server."""
FAILURES_IN_A_ROW = 3
"""Trials failing one after another in one process stop it: the next would most likely fail alike."""
RETURN_WINDOW = 20
"""Episodes whose mean return is a trial's score when the evaluator is off: the last ones of training (few, so that
they are recent: 20 CartPole episodes of 500 steps are the last 10k steps; bench/kickstart.py's window too)."""
PRUNE_AFTER = 0.5
"""The share of a trial's agent steps before the median pruner may stop it. Early returns are mostly chance: in a
6-trial CartPole sweep, pruning from epoch 5 (of 98) stopped a trial at 24 against a median of 28, with settings
next to the best trial's (500)."""
WORKER_OPTION = "--worker"


def add_sweep_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`mettle sweep`'s options."""
    sweep = sub.add_parser("sweep", help="search hyperparameters with Optuna; each trial is a run")
    sweep.add_argument("--sweep", required=True, metavar="NAME", help="the sweep's (and the study's) name")
    sweep.add_argument("--sweep-dir", default="sweeps", metavar="DIR",
                       help="directory that holds sweeps (default ./sweeps): trials go to DIR/NAME/trial-NNNN/")
    sweep.add_argument("--env", default=None, help="environment, family:name (default: train's)")
    sweep.add_argument("--policy", choices=["mlp", "lstm", "token"], default=None, help="policy architecture")
    sweep.add_argument("--space", type=Path, default=None, metavar="FILE",
                       help="search space file (YAML/JSON: key: 'log(1e-4,3e-3)', key: [a, b])")
    sweep.add_argument("--storage", default=None, metavar="URL", help="Optuna RDB storage shared by every machine "
                       "running this sweep, e.g. postgresql://user:pass@host/db (default sqlite:///DIR/NAME/study.db)")
    sweep.add_argument("--trials", type=int, default=10, help="trials the study should finish, counted over every "
                       "process and machine; a rerun adds only the missing ones (default 10)")
    sweep.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="start no trial after this many seconds (a running one finishes)")
    sweep.add_argument("--jobs", type=int, default=1, help="trials at once on this machine, one process each")
    sweep.add_argument("--prune-after", type=float, default=PRUNE_AFTER, metavar="FRACTION",
                       help="the median pruner may stop a trial once it has trained this fraction of its "
                            f"total_timesteps (default {PRUNE_AFTER}; 1: never); it waits for 5 trials")
    sweep.add_argument(WORKER_OPTION, action="store_true", help=argparse.SUPPRESS)
    sweep.add_argument("overrides", nargs="*", metavar="key=value|key=dist(...)",
                       help="every trial's overrides, and the space: log(lo,hi), float(lo,hi), int(lo,hi), "
                            "choice(a,b,...)")


@dataclass
class Sweep:
    """What one `mettle sweep` command resolved: where, what every trial gets, and what is searched."""

    name: str
    directory: Path
    train_options: list[str]
    """--env/--policy as typed, for every trial's `mettle train` command."""
    fixed: list[str]
    space: dict[str, Distribution]
    storage_url: str
    trials: int
    deadline: float | None
    prune_after: float


def sweep_command(args: argparse.Namespace, argv: list[str]) -> int:
    """Check everything, open the study, mark dead trials failed, run the trials (here or in --jobs workers), then
    print and write the trial table, the plots and the best trial's `mettle train` command."""
    try:
        import optuna  # noqa: F401  (an optional extra)
        import sqlalchemy  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"mettle sweep needs Optuna and SQLAlchemy ({one_line(error)}); install them with "
                          "pip install 'mettle[sweep]'") from None
    sweep = resolve_sweep(args)
    storage = open_storage(sweep)
    study = open_study(sweep, storage)
    if args.worker:
        return run_trials(sweep, study)
    note = same_definition(sweep, study)
    if note is not None:
        print(note, flush=True)
    for line in fail_dead_trials(study, storage):
        print(line, flush=True)
    print(f"sweep {sweep.name}: study in {shown_url(sweep.storage_url)}; {counted(study)} of {sweep.trials} trials "
          f"finished or running", flush=True)
    code = run_trials(sweep, study) if args.jobs == 1 else run_workers(argv, args.jobs)
    summarize(sweep, study)
    return code


def resolve_sweep(args: argparse.Namespace) -> Sweep:
    """The sweep from the command line, every key checked against the config; bad input is one ConfigError."""
    from mettle.files import is_plain_name
    from mettle.sweep_space import space_from_file, split_overrides

    if not is_plain_name(args.sweep):
        raise ConfigError(f"--sweep {args.sweep!r} must be a name, not a path; choose where with --sweep-dir")
    for option, value, least in (("--trials", args.trials, 1), ("--jobs", args.jobs, 1)):
        if value < least:
            raise ConfigError(f"{option} {value} must be at least {least}")
    if not 0 <= args.prune_after <= 1:
        raise ConfigError(f"--prune-after {args.prune_after} must be a fraction of each trial's steps, 0 to 1")
    if args.timeout is not None and not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise ConfigError(f"--timeout {args.timeout} must be a positive number of seconds")
    check_sweep_location(Path(args.sweep_dir) / args.sweep)
    fixed, space = split_overrides(args.overrides)
    if args.space is not None:
        for key, distribution in space_from_file(args.space).items():
            if key in space:
                raise ConfigError(f"search space: {key} is in --space {args.space} and on the command line")
            space[key] = distribution
    if not space:
        raise ConfigError("nothing to search: give key=dist(...) overrides (e.g. optimizer.learning_rate="
                          "'log(1e-4,3e-3)') or --space FILE")
    check_space(args, fixed, space)
    directory = Path(args.sweep_dir) / args.sweep
    options = [*(["--env", args.env] if args.env else []), *(["--policy", args.policy] if args.policy else [])]
    url = args.storage or f"sqlite:///{(directory / 'study.db').resolve()}"
    deadline = time.monotonic() + args.timeout if args.timeout is not None else None
    return Sweep(args.sweep, directory, options, fixed, space, url, args.trials, deadline, args.prune_after)


def check_sweep_location(directory: Path) -> None:
    """Where the sweep is written is a directory, or does not exist yet."""
    for path in (directory, *directory.parents):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is a file, not a directory; choose another --sweep-dir or --sweep")
        if path.exists():
            return


def check_space(args: argparse.Namespace, fixed: list[str], space: dict[str, Distribution]) -> None:
    """Every key, with each end of its range (every choice), validated as `mettle train` validates overrides."""
    from mettle.cli import resolve_train_config
    from mettle.sweep_space import override_text

    base = argparse.Namespace(env=args.env, policy=args.policy, overrides=fixed)
    resolve_train_config(base)
    for key, distribution in space.items():
        if any(item.partition("=")[0].strip() == key for item in fixed):
            raise ConfigError(f"search space: {key} is also given a fixed value ({key}=...); drop one")
        for value in distribution.extremes():
            try:
                resolve_train_config(argparse.Namespace(**{**vars(base), "overrides": [
                    *fixed, override_text(key, value)]}))
            except ConfigError as error:
                raise ConfigError(f"search space {key}={distribution.text}: {error}") from None


def shown_url(url: str) -> str:
    """The storage URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown as typed; opening it says what is wrong
        return url


def open_storage(sweep: Sweep) -> RDBStorage:
    """The study's RDB storage with heartbeats on; unreachable, unparsable or missing its driver: one line."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = sweep.storage_url
    connect: dict[str, Any] = {}
    if url.startswith("sqlite"):
        connect = {"timeout": 60}  # --jobs workers write to one file
        if url == f"sqlite:///{(sweep.directory / 'study.db').resolve()}":
            sweep.directory.mkdir(parents=True, exist_ok=True)
    elif url.startswith(("postgresql", "mysql")):
        connect = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: years old
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect},
                                              heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except (ImportError, ModuleNotFoundError) as error:
        raise ConfigError(f"--storage {shown_url(url)}: its database driver is not installed ({one_line(error)}); "
                          f"install it ({driver_hint(url)})") from None
    except Exception as error:  # sqlalchemy's and the drivers' errors differ by database
        raise ConfigError(f"--storage {shown_url(url)}: cannot open the study storage: "
                          f"{one_line(error, first_line=True)}") from None


def driver_hint(url: str) -> str:
    """Which package gives the driver a storage URL needs."""
    if url.startswith("postgres"):
        return "pip install psycopg2-binary"
    return "pip install pymysql" if url.startswith("mysql") else "the driver the URL names"


def open_study(sweep: Sweep, storage: RDBStorage) -> optuna.Study:
    """The named study, created (maximised, median pruner) or loaded: a rerun or another machine continues it."""
    import optuna

    study = optuna.create_study(study_name=sweep.name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner())
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"study {sweep.name!r} in {shown_url(sweep.storage_url)} minimises; mettle sweep "
                          "maximises the score: choose another --sweep name")
    return study


def same_definition(sweep: Sweep, study: optuna.Study) -> str | None:
    """Record what the study searches on its first run; on a rerun that differs, a note saying how (it goes on: a
    study may change its space, and Optuna samples each trial from what it is given)."""
    definition = {"options": sweep.train_options, "fixed": sweep.fixed,
                  "space": {key: distribution.text for key, distribution in sweep.space.items()}}
    first = study.user_attrs.get("definition")
    if first is None:
        study.set_user_attr("definition", definition)
        return None
    changed = [name for name in definition if definition[name] != first.get(name)]
    if not changed:
        return None
    verb = "differs" if len(changed) == 1 else "differ"
    return (f"note: this command's {' and '.join(changed)} {verb} from the study's first run "
            f"({json.dumps({name: first.get(name) for name in changed})}); the study goes on with them")


def process_alive(pid: Any) -> bool:
    """Whether process `pid` (a trial's, on this host) still runs; this process runs no trial yet."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study: optuna.Study, storage: RDBStorage) -> list[str]:
    """Mark FAIL the RUNNING trials whose process on this host is gone (other hosts': stale heartbeats); one line
    each. Their run directories are kept."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host, lines = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != host or process_alive(attrs.get("pid")):
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", f"its process {attrs.get('pid')} died")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:  # another worker marked it first
            continue
        lines.append(f"trial {trial.number} was left running by process {attrs.get('pid')}, which is gone: "
                     f"marked FAIL; its run dir {attrs.get('run_dir', '?')} is kept")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return lines


def counted(study: optuna.Study) -> int:
    """Trials that count toward --trials: finished (complete or pruned) or under way."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                        TrialState.WAITING)))


class TrialFailedError(Exception):
    """A trial's run failed (a bad sampled combination, a crash): the trial is FAIL, the sweep goes on."""


class SweepStoppedError(Exception):
    """A signal stopped the trial's run (after its checkpoint): the sweep stops too, with the run's exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"stopped by signal {code - 128}")
        self.code = code


def run_trials(sweep: Sweep, study: optuna.Study) -> int:
    """Trials in this process until the study has --trials, time is up, a signal stops one or too many fail."""
    from optuna.trial import TrialState

    failures: list[str] = []
    while counted(study) < sweep.trials and (sweep.deadline is None or time.monotonic() < sweep.deadline):
        outcome: dict[str, Any] = {}
        try:
            study.optimize(functools.partial(objective, sweep, outcome=outcome), n_trials=1, catch=(TrialFailedError,))
        except SweepStoppedError as stop:
            return stop.code
        trial = study.get_trials(deepcopy=False)[outcome["number"]] if "number" in outcome else None
        if trial is None or trial.state != TrialState.FAIL:
            failures = []
            continue
        failures.append(f"trial {trial.number}: {outcome.get('error', 'failed')}")
        print(f"mettle: trial {trial.number} failed: {outcome.get('error')}", file=sys.stderr, flush=True)
        if len(failures) >= FAILURES_IN_A_ROW:
            print(f"mettle: error: {len(failures)} trials in a row failed, stopping (the last: {failures[-1]})",
                  file=sys.stderr, flush=True)
            return 1
    return 0


def objective(sweep: Sweep, trial: optuna.Trial, outcome: dict[str, Any]) -> float:
    """Train one trial with `mettle train`'s code path into `trial-NNNN/`; its score, or TrialPruned."""
    import optuna

    from mettle.cli import check_run_location, parse_args, train_command, user_command
    from mettle.launch import EXIT_SIGNAL_BASE
    from mettle.sweep_space import override_text

    outcome["number"] = trial.number
    params = {key: distribution.suggest(trial, key) for key, distribution in sweep.space.items()}
    run_name = f"trial-{trial.number:04d}"
    argv = ["train", *sweep.train_options, "--run-dir", str(sweep.directory), "--run", run_name, *sweep.fixed,
            *(override_text(key, value) for key, value in params.items())]
    for key, value in {"host": socket.gethostname(), "pid": os.getpid(), "run_dir": str(sweep.directory / run_name),
                       "command": user_command(argv)}.items():
        trial.set_user_attr(key, value)
    if (sweep.directory / run_name).exists():
        return failed(outcome, f"{sweep.directory / run_name} already exists (from a study deleted since?); "
                               "move it away")
    print(f"trial {trial.number}: {' '.join(override_text(k, v) for k, v in params.items())}", flush=True)
    reporter = TrialReporter(trial, sweep.prune_after)
    try:
        args = parse_args(argv)
        check_run_location(args.run, args.run_dir)
        code = train_command(args, argv, [reporter])
    except Exception as error:  # the trial fails, the sweep goes on; a bug still shows its traceback
        if not isinstance(error, ConfigError):
            traceback.print_exc()
        return failed(outcome, one_line(error, with_type=not isinstance(error, ConfigError), first_line=True))
    if code > EXIT_SIGNAL_BASE:
        raise SweepStoppedError(code)
    if code != 0:
        return failed(outcome, f"its run exited with {code}")
    if reporter.pruned:
        print(f"trial {trial.number}: pruned at epoch {reporter.last_step}", flush=True)
        raise optuna.TrialPruned()
    if reporter.value is None or not math.isfinite(reporter.value):
        return failed(outcome, "no score: no episode ended (raise total_timesteps)")
    print(f"trial {trial.number}: score {reporter.value:.2f}", flush=True)
    return reporter.value


def failed(outcome: dict[str, Any], error: str) -> float:
    """Record why the trial failed and fail it (run_trials prints the line)."""
    outcome["error"] = error
    raise TrialFailedError(error)


class TrialReporter(TrainerComponent):
    """Feeds the pruner each evaluation (or each epoch's mean return) and keeps the trial's final score."""

    master_only = True

    def __init__(self, trial: optuna.Trial, prune_after: float = PRUNE_AFTER) -> None:
        super().__init__()
        self.trial = trial
        self.prune_after = prune_after
        self.window: deque[float] = deque(maxlen=RETURN_WINDOW)
        self.epoch_returns: list[float] = []
        self.pruned = False
        self.value: float | None = None
        self.last_step = 0

    def evaluator(self) -> tuple[Evaluator, str] | None:
        """The run's Evaluator and the key of its score: the suite's mean where it has one, else the training
        env's mean return."""
        for component in self.context.components:
            if isinstance(component, Evaluator):
                where = next(iter(component.suites), next(iter(component.factories)))
                return component, f"eval/{where}/mean_return"
        return None

    def on_step(self, infos: list[dict[str, Any]]) -> None:
        """Remember the returns of the episodes that ended."""
        returns = [float(info["episode_return"]) for info in infos if "episode_return" in info]
        self.epoch_returns += returns
        self.window.extend(returns)

    def on_epoch_end(self, epoch: int) -> None:
        """Report this epoch's evaluation (evaluator on) or mean return; a pruned trial stops after this epoch."""
        step, found = self.context.state.epoch, self.evaluator()
        returns, self.epoch_returns = self.epoch_returns, []
        if found is not None:
            evaluator, key = found
            newest = evaluator.history[-1] if evaluator.history else {}
            if int(newest.get("epoch", -1)) == step and key in newest:
                self.report(newest[key], step)
        elif returns:
            self.report(sum(returns) / len(returns), step)

    def report(self, value: float, step: int) -> None:
        """Hand one intermediate value to Optuna and stop the run cleanly when the pruner says so."""
        if not math.isfinite(value) or self.pruned:
            return
        self.trial.report(value, step)
        self.last_step = step
        state, total = self.context.state, self.context.config.total_timesteps
        if state.agent_step >= self.prune_after * total and self.prune_after < 1 and self.trial.should_prune():
            self.pruned = True
            self.context.stop_requested = True

    def on_training_complete(self) -> None:
        """The score: the evaluator's final result (it evaluates once more at the end), else the recent mean return."""
        found = self.evaluator()
        if found is not None:
            self.value = found[0].latest.get(found[1])
        elif self.window:
            self.value = sum(self.window) / len(self.window)


def run_workers(argv: list[str], jobs: int) -> int:
    """`jobs` worker processes running this sweep (each trains its own trials). They run in a session of their own,
    so a Ctrl-C reaches each once, forwarded by this process, as SIGTERM does."""
    from mettle.launch import strip_option

    at = argv.index("sweep")
    command = [sys.executable, "-m", "mettle", *argv[: at + 1], *strip_option(argv[at + 1:], "--jobs"), WORKER_OPTION]
    workers = [subprocess.Popen(command, preexec_fn=die_with_parent, start_new_session=True) for _ in range(jobs)]

    def forward(signum: int, frame: FrameType | None) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [worker.wait() for worker in workers]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return next((code for code in codes if code != 0), 0)


def die_with_parent() -> None:
    """In a worker, before it runs: the kernel kills it when the sweep process dies (kill -9 included), so that no
    worker goes on training alone. Linux only; elsewhere a no-op."""
    import ctypes

    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def trial_rows(study: optuna.Study) -> list[dict[str, str]]:
    """Every trial as text: number, state, value, params, run dir."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        value = "" if trial.value is None else f"{trial.value:.4g}"
        params = " ".join(f"{key}={format_param(value)}" for key, value in trial.params.items())
        rows.append({"number": str(trial.number), "state": trial.state.name, "value": value, "params": params,
                     "run_dir": str(trial.user_attrs.get("run_dir", ""))})
    return rows


def format_param(value: Any) -> str:
    """A parameter for the table: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table_text(rows: list[dict[str, str]]) -> str:
    """The rows as an aligned text table."""
    columns = ["number", "state", "value", "params", "run_dir"]
    widths = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def summarize(sweep: Sweep, study: optuna.Study) -> None:
    """Print and write trials.txt / trials.csv, the plots and best.json with the best trial's train command."""
    from mettle.files import atomic_write

    sweep.directory.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    text = table_text(rows)
    print(text, end="", flush=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["number"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(sweep.directory / "trials.txt", lambda f: f.write(text.encode()))
    atomic_write(sweep.directory / "trials.csv", lambda f: f.write(buffer.getvalue().encode()))
    for line in write_plots(study, sweep.directory):
        print(line, flush=True)
    best = best_command(sweep, study)
    if best is None:
        print("no trial completed yet: no best trial", flush=True)
        return
    atomic_write(sweep.directory / "best.json", lambda f: f.write(json.dumps(best, indent=2).encode()))
    print(f"best trial {best['number']} (score {best['value']:.2f}); train it with:\n  {best['command']}", flush=True)


def best_command(sweep: Sweep, study: optuna.Study) -> dict[str, Any] | None:
    """The best complete trial: number, score, params and a `mettle train` command line with its overrides."""
    from optuna.trial import TrialState

    from mettle.cli import user_command
    from mettle.sweep_space import override_text

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    argv = ["train", *sweep.train_options, *sweep.fixed, *(override_text(k, v) for k, v in best.params.items())]
    return {"number": best.number, "value": best.value, "params": best.params, "command": user_command(argv)}


def write_plots(study: optuna.Study, directory: Path) -> list[str]:
    """history.png and importances.png (importances need 2 complete trials); what was written or skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots: dict[str, Callable[[optuna.Study], Any]] = {"history.png": plot_optimization_history,
                                                        "importances.png": plot_param_importances}
    lines = []
    for name, plot in plots.items():
        needed = 2 if name == "importances.png" else 1
        if complete < needed:
            lines.append(f"{name} skipped: it needs {needed} complete trial{'s' * (needed > 1)}, the study has "
                         f"{complete}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-feature and "importances are equal" notes
                axes = plot(study)
            axes.figure.savefig(directory / name, dpi=100, bbox_inches="tight")
            plt.close(axes.figure)
        except Exception as error:  # a plot is a summary: its failure must not hide the trials
            lines.append(f"{name} skipped: {one_line(error, first_line=True)}")
            continue
        lines.append(f"plot written to {directory / name}")
    return lines


__all__ = ["Sweep", "TrialReporter", "add_sweep_parser", "sweep_command"]
