"""Run any TrainingEnvironment in worker processes, with every batch in shared memory.

`VectorEnvironment(make_env, num_envs, num_workers)` starts `num_workers` processes; worker `w` calls
`make_env(num_envs // num_workers, w)` once and owns the contiguous agent rows of its instances.

Data path. The parent allocates one shared-memory segment holding observations, rewards, terminals,
truncations, mask and starts for all rows, plus an int64 `[rows, heads]` action array. A step is:
the parent copies the actions into the segment and sends each worker of the group a one-byte
message; the worker calls `send_actions` on its sub-env with a view of its action rows, copies the
sub-env's next batch into its block (one memcpy per field) and answers one byte, or the pickled
infos when episodes ended (infos carry global `env_id`s). Observations are never pickled.

Signalling. One duplex `Pipe` per worker with tiny byte messages: a pipe gives low latency
(a write and a poll per worker per step), ordering, and end-of-file when a worker dies. The parent
first polls the group's pipes without blocking and only then blocks in `connection.wait` on the
pipes and the process sentinels, so a dead worker is noticed at once and a hung one after
`timeout_s`; either raises `EnvironmentWorkerError` naming the worker, its pid and exit status.

Double buffering. With `async_factor = k` the workers form k groups, each a contiguous slice of
rows. `get_observations` returns the group whose actions were sent longest ago (waiting for it if
needed); a group that was received but not yet sent actions is never waited on. Groups therefore
come back in a fixed round-robin order, the same in every mode and run, so multiprocess results
equal serial results exactly. `send_actions` applies to the oldest received group still waiting
for actions (normally the only one: the last batch received); pass `rows=` to name it explicitly.

Start method. "fork" on Linux when the parent runs a single Python thread (fast: nothing is
imported or pickled again); otherwise "forkserver" where available, else "spawn". Pass
`start_method=` to force one. `make_env` must be picklable (a top-level function or a
functools.partial of one) so every start method works; this is checked up front. On Linux a worker
names itself `mettle-env-<index>` (its comm, as ps, top and pgrep show it), matching the errors.

Cleanup. Workers are ended on `close()`, context exit, garbage collection and interpreter exit
(a `multiprocessing.util.Finalize` with an exit priority, which runs before multiprocessing joins
its children). Workers ignore SIGINT (the parent decides) and exit by themselves when the parent
dies: while idle they poll their pipe every 0.5 s and leave when their parent pid changes. That is
portable and, unlike prctl(PR_SET_PDEATHSIG), does not fire when merely the thread that started
them exits. After a failure close() does not wait for answers: it sends SIGTERM (with SIGCONT, so a
stopped worker acts on it) and SIGKILL to whoever is left after a grace period. The shared-memory
segment is unlinked on close (and by multiprocessing's resource tracker if the parent is killed).

Seeding. `reset(seed)` resets worker w's sub-env with `seed + w * (num_envs // num_workers)`, the
global index of its first instance. A sub-env that seeds its instance i with `seed + i` (like
`GymnasiumEnvironment`) therefore gives the same rollouts for any `num_workers`. The first reset
without a seed uses the constructor's `seed`; later resets without one pass None through.

`mode="serial"` runs the same sub-envs in-process (for debugging) with the same rows, groups, order
and copies; a group is stepped when its actions are sent, and a sub-env error is raised as
`EnvironmentWorkerError` (chained to the original) from the next `get_observations`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import connection, resource_tracker
from multiprocessing.shared_memory import SharedMemory
from multiprocessing.util import Finalize
from typing import Any, Literal, Protocol

import numpy as np

from mettle.contracts import BatchInfo, EnvBatch, EnvStateError, PolicyEnvInfo, TrainingEnvironment
from mettle.envs.rows import RowLayoutEnvironment

__all__ = ["EnvFactory", "EnvironmentWorkerError", "VectorEnvironment", "VectorizedTrainingEnvironment"]

EnvFactory = Callable[[int, int], TrainingEnvironment]
"""`make_env(num_envs_for_worker, worker_index)` -> the worker's sub-environment."""

Mode = Literal["multiprocess", "serial"]
SubEnvInfo = tuple[PolicyEnvInfo, BatchInfo]

# one-byte message tags (parent -> worker, then worker -> parent)
_STEP, _RESET, _ATTACH, _CLOSE, _SAVE, _LOAD = b"s", b"r", b"a", b"c", b"g", b"l"
_OK, _INFOS, _READY, _ERROR, _STATE = b"k", b"i", b"y", b"e", b"d"

_PARENT_CHECK_S = 0.5
"""How often an idle worker checks that its parent is still alive."""
_GRACE_S = 2.0
"""How long close() lets workers exit politely, then after SIGTERM, before SIGKILL."""
_MIN_STARTUP_S = 60.0
"""Building sub-envs (imports, spawn) may take longer than one step's timeout."""
_ALIGN = 64
_BATCH_FIELDS = ("observations", "rewards", "terminals", "truncations", "mask", "starts")


class EnvironmentWorkerError(RuntimeError):
    """A worker raised, died or stopped answering; names the worker so the failure can be traced."""

    def __init__(self, worker_index: int, pid: int | None, detail: str, exitcode: int | None = None) -> None:
        super().__init__(f"environment worker {worker_index} (pid {pid}) {detail}")
        self.worker_index = worker_index
        self.pid = pid
        self.exitcode = exitcode


# ---------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Layout:
    """Shapes of the shared arrays; picklable so workers can map the same segment."""

    rows: int
    obs_shape: tuple[int, ...]
    obs_dtype: str
    heads: int

    def fields(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """Name, shape and dtype of every array, in segment order."""
        flag = np.dtype(np.bool_)
        return [
            ("observations", (self.rows, *self.obs_shape), np.dtype(self.obs_dtype)),
            ("rewards", (self.rows,), np.dtype(np.float32)),
            ("terminals", (self.rows,), flag),
            ("truncations", (self.rows,), flag),
            ("mask", (self.rows,), flag),
            ("starts", (self.rows,), flag),
            ("actions", (self.rows, self.heads), np.dtype(np.int64)),
        ]

    def offsets(self) -> tuple[list[int], int]:
        """Cache-line aligned byte offsets of the fields and the total size."""
        offsets, end = [], 0
        for _name, shape, dtype in self.fields():
            start = -(-end // _ALIGN) * _ALIGN
            offsets.append(start)
            end = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return offsets, max(end, 1)

    def arrays(self, buffer: Any) -> dict[str, np.ndarray]:
        """Numpy views of every field over `buffer` (shared memory or a bytearray)."""
        offsets, _ = self.offsets()
        return {
            name: np.ndarray(shape, dtype=dtype, buffer=buffer, offset=offset)
            for (name, shape, dtype), offset in zip(self.fields(), offsets, strict=True)
        }


def _layout_for(info: PolicyEnvInfo, rows: int) -> _Layout:
    """Shared arrays sized from the observation space (its dtype is the batch's dtype)."""
    space = info.observation_space
    if space.shape is None:
        raise ValueError(f"VectorEnvironment needs an observation space with a fixed shape, got {space}")
    dtype = np.dtype(space.dtype) if space.dtype is not None else np.dtype(np.float32)
    return _Layout(rows, tuple(int(n) for n in space.shape), dtype.str, len(info.action_nvec))


def _row_views(arrays: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    """Every field restricted to `rows`."""
    return {name: array[rows] for name, array in arrays.items()}


# ---------------------------------------------------------------------------- sub-env side
class _SubEnvRunner:
    """Steps one sub-env and copies its batch into its block of rows (used by workers and serial mode)."""

    def __init__(self, env: TrainingEnvironment, views: dict[str, np.ndarray], first_env: int) -> None:
        self.env = env
        self.views = views
        self.first_env = first_env
        self.rows = len(views["rewards"])

    def reset(self, seed: int | None) -> list[dict[str, Any]]:
        """Reset the sub-env and publish its first batch."""
        self.env.reset(seed=seed)
        return self._publish()

    def step(self) -> list[dict[str, Any]]:
        """Apply the actions the parent wrote into this block and publish the next batch."""
        self.env.send_actions(self.views["actions"])
        return self._publish()

    def load(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Restore the sub-env from a checkpoint and publish the batch it was showing."""
        self.env.load_state_dict(state)
        return self._publish()

    def _publish(self) -> list[dict[str, Any]]:
        """Copy every field of the sub-env's batch; return its infos with global env ids."""
        batch = self.env.get_observations()
        if batch.rows.start not in (0, None) or batch.rows.stop != self.rows:
            raise ValueError(
                f"sub-environment returned rows {batch.rows} but owns {self.rows}; VectorEnvironment needs "
                "sub-envs that return all their rows in every batch (no async groups inside)"
            )
        for name in _BATCH_FIELDS:
            source, target = getattr(batch, name), self.views[name]
            if np.shape(source) != target.shape:
                raise ValueError(f"sub-environment {name} shaped {np.shape(source)}, expected {target.shape}")
            np.copyto(target, source, casting="unsafe")
        return [self._globalise(info) for info in batch.infos]

    def _globalise(self, info: dict[str, Any]) -> dict[str, Any]:
        """Sub-envs number their instances from 0; the vector env's rows count from the worker's first."""
        if "env_id" in info and self.first_env:
            info = {**info, "env_id": int(info["env_id"]) + self.first_env}
        return info


def _limit_threads() -> None:
    """One thread per worker: many workers each running a torch/BLAS thread pool oversubscribe the CPU."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _name_process(name: str) -> None:
    """Show workers as `mettle-env-<index>` in ps and top (Linux; the kernel keeps 15 characters)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])


def _receive(conn: connection.Connection, poller: select.poll, parent_pid: int) -> bytes | None:
    """The next message, or None once the parent is gone (pipe closed or reparented)."""
    while not poller.poll(_PARENT_CHECK_S * 1000):  # a kept poll object: cheaper than conn.poll per step
        if os.getppid() != parent_pid:
            return None
    try:
        return conn.recv_bytes()
    except (EOFError, OSError):
        return None


def _worker_main(conn: connection.Connection, make_env: EnvFactory, num_envs: int, index: int) -> None:
    """Worker process entry: build the sub-env, report its spaces, then serve step/reset requests."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _name_process(f"mettle-env-{index}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parent_pid = os.getppid()
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    _limit_threads()
    env: TrainingEnvironment | None = None
    shm: SharedMemory | None = None
    runner: _SubEnvRunner | None = None
    try:
        env = make_env(num_envs, index)
        _limit_threads()
        conn.send_bytes(_READY + pickle.dumps((env.policy_env_info, env.batch_info)))
        message = _receive(conn, poller, parent_pid)
        if message is None or message[:1] != _ATTACH:
            return
        name, layout, rows = pickle.loads(message[1:])
        shm = SharedMemory(name=name)
        runner = _SubEnvRunner(env, _row_views(layout.arrays(shm.buf), rows), num_envs * index)
        _serve(conn, poller, runner, parent_pid)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send_bytes(_ERROR + traceback.format_exc().encode())
    finally:
        runner = None  # drop the views first, or unmapping the segment fails
        _close_quietly(env, shm)


def _close_quietly(env: TrainingEnvironment | None, shm: SharedMemory | None) -> None:
    """A worker's last act: close its sub-env and unmap (never unlink: the parent owns the segment)."""
    if env is not None:
        with contextlib.suppress(Exception):
            env.close()
    if shm is not None:
        with contextlib.suppress(BufferError):
            shm.close()


def _serve(conn: connection.Connection, poller: select.poll, runner: _SubEnvRunner, parent_pid: int) -> None:
    """Answer each request with one byte, or the pickled infos when episodes ended."""
    while True:
        message = _receive(conn, poller, parent_pid)
        if message is None or message[:1] == _CLOSE:
            return
        if message[:1] == _STEP:
            infos = runner.step()
        elif message[:1] == _RESET:
            infos = runner.reset(pickle.loads(message[1:]))
        elif message[:1] == _SAVE:
            conn.send_bytes(_STATE + pickle.dumps(runner.env.state_dict(), pickle.HIGHEST_PROTOCOL))
            continue
        elif message[:1] == _LOAD:
            infos = runner.load(pickle.loads(message[1:]))
        else:
            raise ValueError(f"unknown request {message[:1]!r}")
        conn.send_bytes(_INFOS + pickle.dumps(infos, pickle.HIGHEST_PROTOCOL) if infos else _OK)


# ------------------------------------------------------------------------------- backends
class _Backend(Protocol):
    """Where sub-envs run: worker processes or this process."""

    pids: list[int]
    shm_name: str | None

    def start(self) -> list[SubEnvInfo]: ...
    def attach(self, layout: _Layout, worker_rows: Sequence[slice]) -> dict[str, np.ndarray]: ...
    def reset(self, worker: int, seed: int | None) -> None: ...
    def step(self, worker: int) -> None: ...
    def collect(self, workers: Sequence[int]) -> list[dict[str, Any]]: ...
    def save(self, workers: Sequence[int]) -> list[dict[str, Any] | None]: ...
    def load(self, worker: int, state: dict[str, Any]) -> None: ...
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
            process = self.context.Process(
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
        """Describe how a worker ended (reaping it to learn its exit code)."""
        process = self.processes[worker]
        process.join(timeout=1.0)
        code = process.exitcode
        if code is None:
            detail = "closed its pipe but is still running"
        elif code < 0:
            detail = f"was killed by signal {signal.Signals(-code).name} (exit code {code})"
        else:
            detail = f"exited unexpectedly with exit code {code}"
        return EnvironmentWorkerError(worker, process.pid, detail, exitcode=code)

    def _fail(self, error: EnvironmentWorkerError) -> EnvironmentWorkerError:
        """Remember that workers can no longer be trusted, so close() ends them without waiting."""
        self.failed = True
        return error

    def close(self) -> None:
        """Ask workers to exit, then SIGTERM and SIGKILL stragglers; unlink the segment. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if not self.failed:
            for worker in range(len(self.conns)):
                self._send(worker, _CLOSE)
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


def _join_all(processes: Sequence[Any], timeout_s: float) -> None:
    """Join every started process within one shared deadline."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        if process.pid is not None:
            process.join(max(0.0, deadline - time.monotonic()))


def _stop_all(processes: Sequence[Any]) -> None:
    """SIGTERM the live ones, then SIGKILL whoever survives the grace period; reap all."""
    started = [p for p in processes if p.pid is not None]
    for process in started:
        if process.is_alive():
            process.terminate()
            with contextlib.suppress(OSError):  # a stopped (SIGSTOP) worker acts on SIGTERM only once continued
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


# ------------------------------------------------------------------------------- front end
class VectorEnvironment(RowLayoutEnvironment):
    """Runs `num_workers` sub-environments (in processes or serially) as one batch of agent rows.

    `policy_env_info` is the sub-envs' (identical) spaces; `batch_info` lays out all workers' instances,
    worker w's rows after worker w-1's.
    """

    def __init__(
        self,
        make_env: EnvFactory,
        num_envs: int,
        num_workers: int,
        async_factor: int = 1,
        mode: Mode = "multiprocess",
        timeout_s: float = 30.0,
        seed: int = 0,
        *,
        start_method: str | None = None,
    ) -> None:
        _check_config(make_env, num_envs, num_workers, async_factor, mode, timeout_s)
        self.num_workers, self.async_factor, self.mode = num_workers, async_factor, mode
        self.start_method = None if mode == "serial" else start_method or _default_start_method()
        self._envs_per_worker = num_envs // num_workers
        self._seed = seed
        self._backend: _Backend = (
            _SerialBackend(make_env, self._envs_per_worker, num_workers)
            if mode == "serial"
            else _ProcessBackend(make_env, self._envs_per_worker, num_workers, timeout_s, str(self.start_method))
        )
        self._finalizer = Finalize(self, self._backend.close, exitpriority=10)
        try:
            self._setup(num_envs)
        except BaseException:
            self.close()
            raise

    def _setup(self, num_envs: int) -> None:
        """Start sub-envs, check they agree, map the arrays and lay out the groups."""
        self._info, agents = _check_sub_envs(self._backend.start(), self._envs_per_worker)
        self._batch_info = BatchInfo(num_envs=num_envs, agents_per_env=agents)
        rows_per_worker = self._envs_per_worker * agents
        worker_rows = [slice(w * rows_per_worker, (w + 1) * rows_per_worker) for w in range(self.num_workers)]
        arrays = self._backend.attach(_layout_for(self._info, self._batch_info.num_rows), worker_rows)
        per_group = self.num_workers // self.async_factor
        self._group_workers = [range(g * per_group, (g + 1) * per_group) for g in range(self.async_factor)]
        self._group_rows = [slice(w[0] * rows_per_worker, (w[-1] + 1) * rows_per_worker) for w in self._group_workers]
        self._group_views = [_row_views(arrays, rows) for rows in self._group_rows]
        self._outstanding: deque[int] = deque()  # groups stepping, in the order their actions were sent
        self._held: list[int] = []  # groups received and waiting for actions, in the order received
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ contract
    @property
    def worker_pids(self) -> list[int]:
        """Worker process ids in worker order (empty in serial mode)."""
        return list(self._backend.pids)

    @property
    def shared_memory_name(self) -> str | None:
        """Name of the shared-memory segment (None in serial mode), for inspection and leak tests."""
        return self._backend.shm_name

    @property
    def group_rows(self) -> list[slice]:
        """The rows each `async_factor` group covers; batches come back in this order, round-robin."""
        return list(self._group_rows)

    def reset(self, seed: int | None = None) -> None:
        """Finish steps in flight, then reset sub-env w with seed + its first instance's global index."""
        self._check_open()
        seed = self._reset_seed(seed)
        while self._outstanding:
            self._backend.collect(self._group_workers[self._outstanding.popleft()])
        self._held.clear()
        for worker in range(self.num_workers):
            self._backend.reset(worker, None if seed is None else seed + worker * self._envs_per_worker)
        self._outstanding.extend(range(self.async_factor))
        self._started = True

    def get_observations(self) -> EnvBatch:
        """The batch of the group whose actions were sent longest ago (views into the shared arrays)."""
        self._check_open()
        if not self._started:
            self.reset()
        if not self._outstanding:
            raise RuntimeError(
                f"every group (rows {[self._group_rows[g] for g in self._held]}) is waiting for actions; "
                "call send_actions for a batch received before asking for another"
            )
        group = self._outstanding[0]
        infos = self._backend.collect(self._group_workers[group])
        self._outstanding.popleft()
        self._held.append(group)
        views = self._group_views[group]
        return EnvBatch(rows=self._group_rows[group], infos=infos, **{k: views[k] for k in _BATCH_FIELDS})

    def send_actions(self, actions: np.ndarray, rows: slice | None = None) -> None:
        """Write actions for a received group into shared memory and start its workers stepping.

        Without `rows` the actions go to the oldest received group still waiting for actions, which
        is the last batch received whenever only one is waiting.
        """
        self._check_open()
        group = self._held_group(rows)
        target = self._group_views[group]["actions"]
        actions = np.asarray(actions)
        if actions.shape != target.shape:
            raise ValueError(f"expected actions shaped {target.shape} for rows {self._group_rows[group]}, "
                             f"got {actions.shape}")
        np.copyto(target, actions, casting="same_kind")
        self._held.remove(group)
        for worker in self._group_workers[group]:
            self._backend.step(worker)
        self._outstanding.append(group)

    def close(self) -> None:
        """End workers (politely, then by signal), close sub-envs and unlink shared memory; idempotent."""
        self._closed = True
        self._finalizer()

    def state_dict(self) -> dict[str, Any] | None:
        """Every sub-env's state and which groups wait for actions; None if any sub-env cannot save its state.

        Taken between steps, when every group has been received (as at the end of a rollout).
        """
        self._check_open()
        if not self._started:
            return None
        if self._outstanding:
            raise RuntimeError("VectorEnvironment.state_dict needs every group received (none stepping); "
                               f"groups {list(self._outstanding)} are still stepping")
        states = self._backend.save(range(self.num_workers))
        if any(state is None for state in states):
            return None
        return {"kind": type(self).__name__, "layout": self._layout_key(), "held": list(self._held), "workers": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every sub-env (each republishes the batch it showed) and the groups waiting for actions."""
        self._check_open()
        if not isinstance(state, dict) or state.get("kind") != type(self).__name__:
            raise EnvStateError(f"saved environment state is not a {type(self).__name__}'s")
        if state["layout"] != self._layout_key():
            raise EnvStateError(f"saved with (envs, workers, async_factor) = {tuple(state['layout'])}, "
                                f"now {self._layout_key()}")
        while self._outstanding:
            self._backend.collect(self._group_workers[self._outstanding.popleft()])
        for worker, worker_state in enumerate(state["workers"]):
            self._backend.load(worker, worker_state)
        self._backend.collect(range(self.num_workers))
        self._held, self._started = list(state["held"]), True

    def _layout_key(self) -> list[int]:
        """What must match for saved per-worker state to fit: instances, workers and groups."""
        return [self._batch_info.num_envs, self.num_workers, self.async_factor]

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        """Fail clearly rather than talk to workers that are gone."""
        if self._closed:
            raise RuntimeError("VectorEnvironment is closed")

    def _held_group(self, rows: slice | None) -> int:
        """The group the actions are for."""
        if not self._held:
            raise RuntimeError("send_actions needs a batch from get_observations that has not been sent actions")
        if rows is None:
            return self._held[0]
        for group in self._held:
            if self._group_rows[group] == rows:
                return group
        raise ValueError(f"rows {rows} are not a received batch waiting for actions; "
                         f"waiting: {[self._group_rows[g] for g in self._held]}")


def _check_config(
    make_env: EnvFactory, num_envs: int, num_workers: int, async_factor: int, mode: str, timeout_s: float
) -> None:
    """Reject layouts that cannot be split evenly, with the nearest ones that can."""
    if mode not in ("multiprocess", "serial"):
        raise ValueError(f"mode must be 'multiprocess' or 'serial', got {mode!r}")
    for name, value in (("num_envs", num_envs), ("num_workers", num_workers), ("async_factor", async_factor)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if num_envs % num_workers:
        raise ValueError(
            f"num_envs={num_envs} is not divisible by num_workers={num_workers} (each worker runs the same "
            f"number of instances); use num_envs={-(-num_envs // num_workers) * num_workers} or "
            f"num_workers={_largest_divisor(num_envs, num_workers)}"
        )
    if num_workers % async_factor:
        raise ValueError(
            f"num_workers={num_workers} is not divisible by async_factor={async_factor} (each group needs the "
            f"same number of workers); use num_workers={-(-num_workers // async_factor) * async_factor} or "
            f"async_factor={_largest_divisor(num_workers, async_factor)}"
        )
    if mode == "multiprocess":
        _check_picklable(make_env)


def _largest_divisor(total: int, at_most: int) -> int:
    """The largest divisor of `total` not above `at_most`, for error messages."""
    return max(d for d in range(1, min(total, at_most) + 1) if total % d == 0)


def _check_picklable(make_env: EnvFactory) -> None:
    """spawn and forkserver pickle make_env; fail here rather than in a worker."""
    try:
        pickle.dumps(make_env)
    except Exception as error:
        raise TypeError(
            f"make_env must be picklable for worker processes ({error}); use a top-level function or "
            "functools.partial(top_level_function, ...) instead of a lambda or closure"
        ) from error


def _check_sub_envs(infos: list[SubEnvInfo], envs_per_worker: int) -> tuple[PolicyEnvInfo, int]:
    """Every sub-env must have the requested size and the same spaces; return them."""
    first, _ = infos[0]
    agents = infos[0][1].agents_per_env
    for worker, (info, batch) in enumerate(infos):
        if batch.num_envs != envs_per_worker:
            raise ValueError(
                f"make_env(num_envs={envs_per_worker}, worker_index={worker}) built {batch.num_envs} instances; "
                "it must build exactly the number it is given"
            )
        same = (info.observation_space, info.action_space, info.num_agents) == (
            first.observation_space, first.action_space, first.num_agents
        )
        if not same or batch.agents_per_env != agents:
            raise ValueError(
                f"worker {worker}'s sub-env differs from worker 0's: {info} with {batch.agents_per_env} agents "
                f"per env vs {first} with {agents}; every sub-env must share spaces and agents_per_env"
            )
    return first, agents


VectorizedTrainingEnvironment = VectorEnvironment
"""Metta's name for the shared-memory multi-process environment, for readers who know it by that name."""
