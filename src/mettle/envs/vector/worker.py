"""The sub-env side: a worker process's main loop, and the runner that copies a sub-env's batch into its rows."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import signal
import sys
import traceback
from multiprocessing import connection
from multiprocessing.shared_memory import SharedMemory
from types import FrameType
from typing import Any

import numpy as np

from mettle.contracts import TrainingEnvironment
from mettle.envs.vector.layout import (
    _ATTACH,
    _BATCH_FIELDS,
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
    _row_views,
)

_PARENT_CHECK_S = 0.5
"""How often an idle worker checks that its parent is still alive."""


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

    def assign(self, tasks: dict[int, int]) -> list[dict[str, Any]]:
        """Pass the sub-env its instances' next tasks (local instance -> task id); nothing to publish."""
        self.env.assign_tasks(tasks)
        return []

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


def _ignore_group_stop(signum: int, frame: FrameType | None) -> None:
    """SIGTERM to the trainer's whole process group (torchrun, a scheduler) is the parent's to act on: its
    checkpoint still needs this worker. The parent ends workers with a close message (SIGKILL if that fails).

    A handler rather than SIG_IGN, so processes a sub-env starts do not inherit an ignored SIGTERM.
    """


def _worker_main(conn: connection.Connection, make_env: EnvFactory, num_envs: int, index: int) -> None:
    """Worker process entry: build the sub-env, report its spaces, then serve step/reset requests."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _ignore_group_stop)
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
        elif message[:1] == _TASKS:  # no answer: the step that follows answers for both
            runner.assign({int(env): int(task) for env, task in json.loads(message[1:])})
            continue
        else:
            raise ValueError(f"unknown request {message[:1]!r}")
        conn.send_bytes(_INFOS + pickle.dumps(infos, pickle.HIGHEST_PROTOCOL) if infos else _OK)
