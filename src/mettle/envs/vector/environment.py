"""The front end: VectorEnvironment, its groups and round-robin order, and the checks on its layout."""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Mapping
from multiprocessing.util import Finalize
from typing import Any, Literal

import numpy as np

from mettle.contracts import BatchInfo, EnvBatch, EnvStateError, PolicyEnvInfo
from mettle.envs.rows import RowLayoutEnvironment
from mettle.envs.vector.backends import _Backend, _default_start_method, _ProcessBackend, _SerialBackend
from mettle.envs.vector.layout import _BATCH_FIELDS, EnvFactory, SubEnvInfo, _layout_for, _row_views

Mode = Literal["multiprocess", "serial"]


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

    def assign_tasks(self, tasks: Mapping[int, int]) -> None:
        """Route each instance's next task to the worker that runs it (instance ids count across all workers)."""
        self._check_open()
        per_worker: dict[int, dict[int, int]] = {}
        for instance, task in tasks.items():
            if not 0 <= instance < self._batch_info.num_envs:
                raise ValueError(f"instance {instance} is not one of this env's {self._batch_info.num_envs}")
            worker, local = divmod(int(instance), self._envs_per_worker)
            per_worker.setdefault(worker, {})[local] = int(task)
        for worker, local_tasks in sorted(per_worker.items()):
            self._backend.assign(worker, local_tasks)

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
