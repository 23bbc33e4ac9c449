"""Where sub-envs run: worker processes over shared memory and pipes, or serially in this process."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import pickle
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import connection, resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Protocol

import numpy as np

from mettle.contracts import TrainingEnvironment
from mettle.envs.vector.layout import (
    _ATTACH,
    _CLOSE,
    _ERROR,
    _INFOS,
    _LOAD,
    _OK,
    _READY,
    _RESET,
    _SAVE,
    _STATE,
    _STEP,
    _TASKS,
    EnvFactory,
    SubEnvInfo,
    _Layout,
    _row_views,
)
from mettle.envs.vector.worker import _SubEnvRunner, _worker_main

_GRACE_S = 2.0
"""How long close() lets workers exit politely, then after SIGTERM, before SIGKILL."""
_MIN_STARTUP_S = 60.0
"""Building sub-envs (imports, spawn) may take longer than one step's timeout."""


class EnvironmentWorkerError(RuntimeError):
    """A worker raised, died or stopped answering; names the worker so the failure can be traced.

    `died` is True when the worker process ended without being asked (killed, out of memory, exited): not a
    bug to show a traceback for, but a process to name in one line. It pickles, so a forked user of the env
    (the actor of overlapped training) can hand it on.
    """

    def __init__(self, worker_index: int, pid: int | None, detail: str, exitcode: int | None = None,
                 died: bool = False) -> None:
        super().__init__(f"environment worker {worker_index} (pid {pid}) {detail}")
        self.worker_index = worker_index
        self.pid = pid
        self.detail = detail
        self.exitcode = exitcode
        self.died = died

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuild from the constructor's arguments (the default would pass only the message)."""
        return type(self), (self.worker_index, self.pid, self.detail, self.exitcode, self.died), self.__dict__


class _Backend(Protocol):
    """Where sub-envs run: worker processes or this process."""

    shm_name: str | None

    @property
    def pids(self) -> list[int]: ...
    def start(self) -> list[SubEnvInfo]: ...
    def attach(self, layout: _Layout, worker_rows: Sequence[slice]) -> dict[str, np.ndarray]: ...
    def reset(self, worker: int, seed: int | None) -> None: ...
    def step(self, worker: int) -> None: ...
    def collect(self, workers: Sequence[int]) -> list[dict[str, Any]]: ...
    def save(self, workers: Sequence[int]) -> list[dict[str, Any] | None]: ...
    def load(self, worker: int, state: dict[str, Any]) -> None: ...
    def assign(self, worker: int, tasks: dict[int, int]) -> None: ...
    def close(self) -> None: ...


class _SerialBackend:
    """Sub-envs stepped in-process on request; errors are held until collected, as a worker's would be."""

    shm_name: str | None = None

    def __init__(self, make_env: EnvFactory, envs_per_worker: int, num_workers: int) -> None:
        self.make_env, self.envs_per_worker, self.num_workers = make_env, envs_per_worker, num_workers
        self.pids: list[int] = []
        self.envs: list[TrainingEnvironment] = []
        self.runners: list[_SubEnvRunner] = []
        self.infos: list[list[dict[str, Any]]] = [[] for _ in range(num_workers)]
        self.errors: dict[int, BaseException] = {}

    def start(self) -> list[SubEnvInfo]:
        """Build every sub-env in turn."""
        for worker in range(self.num_workers):
            self.envs.append(self.make_env(self.envs_per_worker, worker))
        return [(env.policy_env_info, env.batch_info) for env in self.envs]

    def attach(self, layout: _Layout, worker_rows: Sequence[slice]) -> dict[str, np.ndarray]:
        """Plain (unshared) arrays with the same layout as the shared segment."""
        arrays = layout.arrays(bytearray(layout.offsets()[1]))
        self.runners = [
            _SubEnvRunner(env, _row_views(arrays, rows), self.envs_per_worker * worker)
            for worker, (env, rows) in enumerate(zip(self.envs, worker_rows, strict=True))
        ]
        return arrays

    def reset(self, worker: int, seed: int | None) -> None:
        """Reset now."""
        self._run(worker, lambda runner: runner.reset(seed))

    def step(self, worker: int) -> None:
        """Step now."""
        self._run(worker, _SubEnvRunner.step)

    def save(self, workers: Sequence[int]) -> list[dict[str, Any] | None]:
        """Each sub-env's state_dict."""
        return [self.runners[worker].env.state_dict() for worker in workers]

    def load(self, worker: int, state: dict[str, Any]) -> None:
        """Restore now; its answer is collected like a step's."""
        self._run(worker, lambda runner: runner.load(state))

    def assign(self, worker: int, tasks: dict[int, int]) -> None:
        """Hand the sub-env its instances' next tasks now; an error waits for `collect`."""
        self._run(worker, lambda runner: runner.assign(tasks))

    def _run(self, worker: int, request: Callable[[_SubEnvRunner], list[dict[str, Any]]]) -> None:
        """Run a request, keeping its infos or its error for `collect`."""
        if worker in self.errors:
            return
        try:
            self.infos[worker].extend(request(self.runners[worker]))
        except Exception as error:
            self.errors[worker] = error

    def collect(self, workers: Sequence[int]) -> list[dict[str, Any]]:
        """The infos of the requests already run, or the first error."""
        infos: list[dict[str, Any]] = []
        for worker in workers:
            if worker in self.errors:
                error = self.errors[worker]
                detail = f"raised {type(error).__name__}: {error} (serial mode; see the chained cause)"
                raise EnvironmentWorkerError(worker, os.getpid(), detail) from error
            infos.extend(self.infos[worker])
            self.infos[worker] = []
        return infos

    def close(self) -> None:
        """Close every sub-env; safe to call twice."""
        envs, self.envs = self.envs, []
        for env in envs:
            with contextlib.suppress(Exception):
                env.close()


class _ProcessBackend:
    """Sub-envs in worker processes, batches in one shared-memory segment, one pipe per worker."""

    def __init__(
        self, make_env: EnvFactory, envs_per_worker: int, num_workers: int, timeout_s: float, start_method: str
    ) -> None:
        self.make_env, self.envs_per_worker, self.num_workers = make_env, envs_per_worker, num_workers
        self.timeout_s = timeout_s
        self.context = mp.get_context(start_method)
        self.processes: list[Any] = []
        self.conns: list[connection.Connection] = []
        self.shm: SharedMemory | None = None
        self.shm_name: str | None = None
        self.arrays: dict[str, np.ndarray] = {}
        self._fds: dict[int, tuple[int, bool]] = {}  # fd -> (worker, is its pipe rather than its sentinel)
        self._pollers: dict[tuple[int, ...], select.poll] = {}
        self.failed = False
        self.closed = False
        self.owner = os.getpid()
        """The process that started the workers: only it can reap them, end them or unlink the segment."""

    @property
    def pids(self) -> list[int]:
        """Worker process ids, in worker order."""
        return [int(process.pid) for process in self.processes]

    def start(self) -> list[SubEnvInfo]:
        """Start every worker, then wait for each to report its sub-env's spaces."""
        if os.name == "posix":  # workers must share this tracker, not each start one that unlinks our segment
            resource_tracker.ensure_running()
        for worker in range(self.num_workers):
            ours, theirs = self.context.Pipe(duplex=True)
            process = self.context.Process(  # type: ignore[attr-defined]  # typeshed: only concrete contexts have it
                target=_worker_main,
                args=(theirs, self.make_env, self.envs_per_worker, worker),
                name=f"mettle-env-worker-{worker}",
                daemon=False,  # sub-envs may start processes of their own
            )
            self.conns.append(ours)
            self.processes.append(process)
            process.start()
            theirs.close()  # only the worker holds its end, so the parent sees EOF when it dies
            self._fds[ours.fileno()] = (worker, True)
            self._fds[process.sentinel] = (worker, False)
        messages = self._gather(range(self.num_workers), max(self.timeout_s, _MIN_STARTUP_S), _READY)
        return [pickle.loads(messages[worker]) for worker in range(self.num_workers)]

    def attach(self, layout: _Layout, worker_rows: Sequence[slice]) -> dict[str, np.ndarray]:
        """Create the segment and tell each worker its name and rows."""
        self.shm = SharedMemory(create=True, size=layout.offsets()[1])
        self.shm_name = self.shm.name
        self.arrays = layout.arrays(self.shm.buf)
        for worker, rows in enumerate(worker_rows):
            self._send(worker, _ATTACH + pickle.dumps((self.shm.name, layout, rows)))
        return self.arrays

    def reset(self, worker: int, seed: int | None) -> None:
        """Ask for a reset; the answer is collected later."""
        self._send(worker, _RESET + pickle.dumps(seed))

    def step(self, worker: int) -> None:
        """Ask for a step with the actions already in shared memory."""
        self._send(worker, _STEP)

    def save(self, workers: Sequence[int]) -> list[dict[str, Any] | None]:
        """Ask every worker for its sub-env's state_dict and wait for them."""
        for worker in workers:
            self._send(worker, _SAVE)
        messages = self._gather(workers, self.timeout_s, _STATE)
        return [pickle.loads(messages[worker]) for worker in workers]

    def load(self, worker: int, state: dict[str, Any]) -> None:
        """Ask for a restore; the answer is collected like a step's."""
        self._send(worker, _LOAD + pickle.dumps(state, pickle.HIGHEST_PROTOCOL))

    def assign(self, worker: int, tasks: dict[int, int]) -> None:
        """Send the worker its instances' next tasks (ids as JSON, no answer); it applies them before its next step."""
        self._send(worker, _TASKS + json.dumps(sorted(tasks.items())).encode())

    def collect(self, workers: Sequence[int]) -> list[dict[str, Any]]:
        """Wait for every worker's answer; their infos in worker order."""
        messages = self._gather(workers, self.timeout_s, _OK, _INFOS)
        infos: list[dict[str, Any]] = []
        for worker in workers:
            if messages[worker]:
                infos.extend(pickle.loads(messages[worker]))
        return infos

    def _send(self, worker: int, message: bytes) -> None:
        """Send, leaving a broken pipe to be reported (with the exit status) by the next collect."""
        with contextlib.suppress(OSError):
            self.conns[worker].send_bytes(message)

    def _gather(self, workers: Sequence[int], timeout_s: float, *tags: bytes) -> dict[int, bytes]:
        """One answer per worker (payload after the tag); raise on errors, deaths and timeouts."""
        messages: dict[int, bytes] = {}
        pending = set(workers)
        poller = self._poller(workers)
        deadline = time.monotonic() + timeout_s
        while pending:
            ready = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            if not ready and time.monotonic() >= deadline:
                worker = min(pending)
                pid = self.processes[worker].pid
                detail = (f"did not answer within timeout_s={timeout_s:g} s (process state: {_process_state(pid)}; "
                          "hung or too slow; raise env.worker_timeout_s)")
                raise self._fail(EnvironmentWorkerError(worker, pid, detail))
            readable = {fd for fd, _event in ready}
            for fd in sorted(readable):
                worker, is_pipe = self._fds[fd]
                if is_pipe:  # an answered worker has nothing more to say: _read then raises
                    messages[worker] = self._read(worker, tags if worker in pending else ())
                    pending.discard(worker)
                elif self.conns[worker].fileno() not in readable:
                    raise self._fail(self._death(worker))
        return messages

    def _poller(self, workers: Sequence[int]) -> select.poll:
        """A kept poll object over these workers' pipes and process sentinels (one per group)."""
        key = tuple(workers)
        if key not in self._pollers:
            poller = select.poll()
            for worker in workers:
                poller.register(self.conns[worker].fileno(), select.POLLIN)
                poller.register(self.processes[worker].sentinel, select.POLLIN)
            self._pollers[key] = poller
        return self._pollers[key]

    def _read(self, worker: int, tags: Sequence[bytes]) -> bytes:
        """The payload of one answer; a worker error or a closed pipe becomes EnvironmentWorkerError."""
        try:
            message = self.conns[worker].recv_bytes()
        except (EOFError, OSError):
            raise self._fail(self._death(worker)) from None
        tag, payload = message[:1], message[1:]
        if tag == _ERROR:
            text = payload.decode(errors="replace").rstrip()
            detail = f"raised {text.splitlines()[-1]}\nworker traceback:\n{text}"
            raise self._fail(EnvironmentWorkerError(worker, self.processes[worker].pid, detail))
        if tag not in tags:
            raise self._fail(EnvironmentWorkerError(worker, self.processes[worker].pid, f"sent {tag!r} unasked"))
        return payload

    def _death(self, worker: int) -> EnvironmentWorkerError:
        """Describe how a worker ended (reaping it to learn its exit code; a forked user of the env cannot)."""
        process = self.processes[worker]
        if os.getpid() != self.owner:  # e.g. the actor process of overlapped training: not the worker's parent
            code = _zombie_exit_code(process.pid)
        else:
            process.join(timeout=1.0)
            code = process.exitcode
        still_running = code is None and os.getpid() == self.owner
        if still_running:
            detail = "closed its pipe but is still running"
        elif code is None:
            detail = "exited (its exit code is known to its parent only)"
        elif code < 0:
            detail = f"was killed by signal {signal.Signals(-code).name} (exit code {code})"
        else:
            detail = f"exited unexpectedly with exit code {code}"
        return EnvironmentWorkerError(worker, process.pid, detail, exitcode=code, died=not still_running)

    def _fail(self, error: EnvironmentWorkerError) -> EnvironmentWorkerError:
        """Remember that workers can no longer be trusted, so close() ends them without waiting."""
        self.failed = True
        return error

    def close(self) -> None:
        """Ask workers to exit, then SIGTERM and SIGKILL stragglers; unlink the segment. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if os.getpid() != self.owner:  # a forked user of the env: drop its copies, leave the workers to their parent
            for conn in self.conns:
                conn.close()
            self.arrays = {}
            if self.shm is not None:
                with contextlib.suppress(BufferError):
                    self.shm.close()
            return
        for worker in range(len(self.conns)):  # also after a failure: workers leave on this, not on SIGTERM
            self._send(worker, _CLOSE)
        if not self.failed:
            _join_all(self.processes, _GRACE_S)
        _stop_all(self.processes)
        for conn in self.conns:
            conn.close()
        self._release_memory()

    def _release_memory(self) -> None:
        """Unmap (unless batches still reference it) and unlink the shared segment."""
        if self.shm is None:
            return
        self.arrays = {}
        with contextlib.suppress(BufferError):
            self.shm.close()
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()
        self.shm = None


def _zombie_exit_code(pid: int | None) -> int | None:
    """A dead child's exit code as multiprocessing reports it (-N: signal N), read by a process that is not its
    parent from the zombie's /proc stat (Linux keeps the wait status there until the parent reaps it)."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None  # already reaped, or not Linux
        if fields[0] == "Z" and len(fields) >= 50:
            status = int(fields[-1])
            return -(status & 0x7F) if status & 0x7F else status >> 8
        time.sleep(0.01)
    return None


def _join_all(processes: Sequence[Any], timeout_s: float) -> None:
    """Join every started process within one shared deadline."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        if process.pid is not None:
            process.join(max(0.0, deadline - time.monotonic()))


def _stop_all(processes: Sequence[Any]) -> None:
    """After the close message: SIGCONT the live ones (a stopped worker then reads it), SIGKILL whoever has not
    left within the grace period (workers ignore SIGTERM, which is the trainer's to act on); reap all."""
    started = [p for p in processes if p.pid is not None]
    for process in started:
        if process.is_alive():
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGCONT)
    _join_all(started, _GRACE_S)
    for process in started:
        if process.is_alive():
            process.kill()
            process.join()


def _process_state(pid: int | None) -> str:
    """The kernel's view of a silent worker (running, sleeping, stopped...), so a hang report says which."""
    names = {"R": "running", "S": "sleeping", "D": "waiting on I/O", "T": "stopped", "t": "stopped by a tracer",
             "Z": "exited (zombie)"}
    try:
        with open(f"/proc/{pid}/stat") as stat:
            code = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "unknown"
    return names.get(code, code)


def _default_start_method() -> str:
    """fork when it is safe and available (fastest), else forkserver, else spawn."""
    methods = mp.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"
