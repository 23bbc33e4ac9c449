"""`mettle train --nproc N`: torchrun in its own session, the user's signals relayed, a dead rank named once.

The launcher runs torchrun in a child process (quiet: no banner, no log lines, no tracebacks) that tells it,
through a pipe, which rank failed first and how; ranks that only saw a peer vanish stay quiet. Kept light: the
torchrun child imports this module, not the CLI.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

COMMAND_ENV = "METTLE_COMMAND"
"""The command as the user ran it, set by the launcher for its ranks (their resume hints repeat it)."""
EXIT_SIGNAL_BASE = 128
"""Stopped by signal N (after writing a checkpoint): 128 + N, as shells report it."""

QUIET_TORCHRUN = ("import sys; from mettle.launch import run_torchrun; "
                  "sys.exit(run_torchrun(sys.argv[2:], int(sys.argv[1])))")
"""The torchrun child: `python -c QUIET_TORCHRUN REPORT_FD TORCHRUN_ARGS...`."""


class ProcessDied(RuntimeError):
    """A rank (or torchrun itself) was killed by a signal: the CLI names it in one line with the resume command."""


@dataclass(frozen=True)
class RankFailure:
    """The rank whose failure ended a torchrun job: its global rank, pid and exit code (-N: killed by signal N)."""

    rank: int
    pid: int
    exitcode: int


def launched_rank() -> bool:
    """Whether this process is a rank that `mettle train --nproc` started (its launcher reports deaths and signals)."""
    return COMMAND_ENV in os.environ and "LOCAL_RANK" in os.environ


def launch_torchrun(nproc: int, argv: list[str], command: str, hint: Callable[[], str]) -> int:
    """Run torchrun (quietly, in its own session) with `nproc` ranks; relay SIGINT/SIGTERM as a graceful stop.

    Terminal Ctrl-C reaches only this process, which asks the ranks (through torchrun) to finish their
    epoch and checkpoint; a second SIGINT kills them at once. Exit: the first failed rank's code, or 128+N;
    raises ProcessDied when a rank (or torchrun) was killed by a signal this process did not relay.
    """
    rest = strip_option(argv, "--nproc")
    torchrun_args = ["--standalone", f"--nproc-per-node={nproc}", "-m", "mettle", "--", *rest]
    print("launching: torchrun " + shlex.join(torchrun_args), flush=True)
    report, report_end = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-c", QUIET_TORCHRUN, str(report_end), *torchrun_args],
                                 start_new_session=True, pass_fds=(report_end,),
                                 env={**os.environ, COMMAND_ENV: command}, preexec_fn=die_with_parent)
    except BaseException:
        os.close(report)
        raise
    finally:
        os.close(report_end)
    received = relay_signals(child)
    code = child.wait()
    failure = read_failure(report)
    if received:
        how = "at once, without a final checkpoint" if len(received) > 1 and received[-1] == signal.SIGINT \
            else "after the ranks' checkpoint"
        print(f"mettle: stopped by {signal.Signals(received[0]).name} {how}; {hint()}",
              file=sys.stderr, flush=True)
        return EXIT_SIGNAL_BASE + received[0]
    if failure is not None and failure.exitcode < 0:
        raise ProcessDied(f"rank {failure.rank} (pid {failure.pid}) was killed by {signal_name(-failure.exitcode)}")
    if code < 0:
        raise ProcessDied(f"torchrun (pid {child.pid}) was killed by {signal_name(-code)}")
    return code


def relay_signals(child: subprocess.Popen[bytes]) -> list[int]:
    """Install the relay: the first SIGINT/SIGTERM asks torchrun to stop gracefully, a second SIGINT kills its
    session. Returns the list the signals received are appended to."""
    received: list[int] = []

    def relay(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if received and signum == signal.SIGINT:
            os.killpg(child.pid, signal.SIGKILL)
        elif not received:
            os.kill(child.pid, signal.SIGTERM)
            print(f"{name} received: the ranks finish this epoch and write a checkpoint (SIGINT again to stop now)",
                  file=sys.stderr, flush=True)
        received.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, relay)
    return received


def signal_name(signum: int) -> str:
    """SIGKILL for 9, and a plain `signal N` for a number Python does not name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def read_failure(report: int) -> RankFailure | None:
    """What the torchrun child wrote to the report pipe before it exited (nothing when no rank failed)."""
    os.set_blocking(report, False)
    try:
        data = os.read(report, 1 << 16)
    except BlockingIOError:
        data = b""
    finally:
        os.close(report)
    try:
        return RankFailure(**json.loads(data)) if data else None
    except (ValueError, TypeError):
        return None


def run_torchrun(torchrun_args: list[str], report: int | None = None) -> int:
    """torchrun without its banner, logs and tracebacks: a stop by signal exits 128+N, a failed rank with that
    rank's code; which rank failed (and how) goes to the `report` pipe for the launcher to name."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if report is not None:
        os.set_inheritable(report, False)  # the ranks must not hold it open
    for name in ("torch.distributed.run", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(torchrun_args))  # type: ignore[no-untyped-call]
    except SignalException as stop:
        return EXIT_SIGNAL_BASE + int(stop.sigval)
    except ChildFailedError as error:
        failure = first_failure(error)
        if report is not None:
            with contextlib.suppress(OSError):
                os.write(report, json.dumps(asdict(failure)).encode())
        return failure.exitcode if failure.exitcode > 0 else EXIT_SIGNAL_BASE - failure.exitcode
    return 0


def first_failure(error: ChildFailedError) -> RankFailure:
    """The rank whose failure ended the job: one killed by a signal (SIGKILL, SIGSEGV) before one that exited with
    an error (the others only saw it go), and that before one SIGTERM ended (torchrun's own stop, e.g. mid start-up);
    the earliest within each."""
    failures = error.failures

    def cause_first(rank: int) -> tuple[int, int, int]:
        code = failures[rank].exitcode
        kind = 0 if code < 0 and code != -signal.SIGTERM else 1 if code > 0 else 2
        return kind, failures[rank].timestamp, rank

    rank = min(failures, key=cause_first)
    return RankFailure(rank, failures[rank].pid, failures[rank].exitcode)


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
