"""VectorEnvironment: same batches as serial stepping, async groups in order, and clean failure/cleanup."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import pytest

from mettle.envs.gymnasium import GymnasiumEnvironment
from mettle.envs.testing import (
    BanditEnvironment,
    Rollout,
    ScriptedEnvironment,
    check_environment_contract,
    check_rollout,
)
from mettle.envs.vector import EnvironmentWorkerError, VectorEnvironment
from mettle.rl.training.environment import TrainingEnvironment

FIELDS = ("observations", "rewards", "terminals", "truncations", "mask", "starts")


# ------------------------------------------------------------------ factories (top level: picklable)
def make_bandit(num_envs: int, worker: int) -> TrainingEnvironment:
    return BanditEnvironment(num_envs=num_envs, agents_per_env=2, num_actions=3, episode_length=3,
                             terminate_on_wrong=True)


def make_scripted(num_envs: int, worker: int) -> TrainingEnvironment:
    """Offsets follow the global instance index, so the rollout does not depend on the worker split."""
    offsets = [(worker * num_envs + i) % 4 for i in range(num_envs)]
    return ScriptedEnvironment(num_envs=num_envs, episode_length=4, row_offsets=offsets)


def make_cartpole(num_envs: int, worker: int) -> TrainingEnvironment:
    """Seeds instance i with seed + i, so worker w's block continues worker w-1's seeds."""
    return GymnasiumEnvironment("CartPole-v1", num_envs=num_envs, vectorization="sync")


class FailingBandit(BanditEnvironment):
    """Raises on its third step, to check that a worker's error reaches the parent."""

    def __init__(self, num_envs: int) -> None:
        super().__init__(num_envs=num_envs)
        self.steps = 0

    def send_actions(self, actions: np.ndarray) -> None:
        self.steps += 1
        if self.steps == 3:
            raise ValueError("boom: sub-env step 3 failed")
        super().send_actions(actions)


class HangingBandit(BanditEnvironment):
    """Never returns from its second step."""

    def send_actions(self, actions: np.ndarray) -> None:
        if getattr(self, "stepped", False):
            time.sleep(3600)
        self.stepped = True
        super().send_actions(actions)


def make_failing(num_envs: int, worker: int) -> TrainingEnvironment:
    return FailingBandit(num_envs) if worker == 1 else BanditEnvironment(num_envs=num_envs)


def make_hanging(num_envs: int, worker: int) -> TrainingEnvironment:
    return HangingBandit(num_envs=num_envs) if worker == 1 else BanditEnvironment(num_envs=num_envs)


# ------------------------------------------------------------------ driving helpers
@dataclass
class Receive:
    """A copy of one batch."""

    rows: slice
    arrays: dict[str, np.ndarray]
    infos: list[dict[str, Any]]
    actions: np.ndarray


def record(env: VectorEnvironment, steps: int, seed: int = 3) -> list[Receive]:
    """Reset and drive `env`; each group's actions come from its own generator, so any order gives the same."""
    env.reset(seed=seed)
    nvec = np.asarray(env.policy_env_info.action_nvec)
    rngs: dict[int, np.random.Generator] = {}
    out = []
    for _ in range(steps):
        batch = env.get_observations()
        rng = rngs.setdefault(batch.rows.start, np.random.default_rng([seed, batch.rows.start]))
        rows = batch.rows.stop - batch.rows.start
        actions = (rng.random((rows, len(nvec))) * nvec).astype(np.int64)
        arrays = {name: np.array(getattr(batch, name), copy=True) for name in FIELDS}
        out.append(Receive(batch.rows, arrays, list(batch.infos), actions))
        env.send_actions(actions)
    return out


def assert_same(a: list[Receive], b: list[Receive]) -> None:
    assert len(a) == len(b)
    for t, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.rows == y.rows, t
        for name in FIELDS:
            np.testing.assert_array_equal(x.arrays[name], y.arrays[name], err_msg=f"receive {t} {name}")
        assert x.infos == y.infos, t


def group_rollout(receives: list[Receive], rows: slice, agents: int) -> Rollout:
    """One group's receives as a Rollout in its own row numbering, for the contract checker."""
    mine = [r for r in receives if r.rows == rows]
    first_env = rows.start // agents
    infos = [[{**i, "env_id": i["env_id"] - first_env} for i in r.infos] for r in mine]
    stacked = {name: np.stack([r.arrays[name] for r in mine]) for name in FIELDS}
    return Rollout(**stacked, actions=np.stack([r.actions for r in mine]), infos=infos, agents_per_env=agents)


def is_gone(pid: int) -> bool:
    """No such process, or only an unreaped zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def assert_cleaned_up(pids: list[int], shm_name: str | None) -> None:
    assert not [p for p in mp.active_children() if p.pid in pids]
    assert all(is_gone(pid) for pid in pids)
    if shm_name is not None:
        with pytest.raises(FileNotFoundError):
            SharedMemory(name=shm_name)


# ------------------------------------------------------------------ contract and equivalence
@pytest.mark.parametrize("mode", ["serial", "multiprocess"])
@pytest.mark.parametrize("make_env", [make_bandit, make_scripted])
def test_full_batches_keep_the_contract(mode: str, make_env: Any) -> None:
    with VectorEnvironment(make_env, num_envs=4, num_workers=2, mode=mode) as env:  # type: ignore[arg-type]
        rollout = check_environment_contract(env, steps=40, seed=1)
        assert env.batch_info.num_rows == rollout.rewards.shape[1] == 4 * env.batch_info.agents_per_env
        assert (rollout.terminals | rollout.truncations).any()
        assert {info["env_id"] for infos in rollout.infos for info in infos} == {0, 1, 2, 3}


@pytest.mark.parametrize("async_factor", [1, 2])
def test_multiprocess_equals_serial_exactly(async_factor: int) -> None:
    runs = []
    for mode in ("serial", "multiprocess"):
        with VectorEnvironment(make_bandit, 4, 2, async_factor=async_factor, mode=mode) as env:  # type: ignore[arg-type]
            runs.append(record(env, 30))
            groups = env.group_rows
    assert_same(*runs)
    assert [r.rows for r in runs[1]] == [groups[t % async_factor] for t in range(30)]  # round-robin
    for rows in groups:
        check_rollout(group_rollout(runs[1], rows, agents=2))
    assert any(r.infos for r in runs[1])


def test_async_groups_alternate_and_cover_their_rows() -> None:
    with VectorEnvironment(make_scripted, 4, 2, async_factor=2) as env:
        env.reset()
        first, second = env.get_observations(), env.get_observations()
        assert (first.rows, second.rows) == (slice(0, 2), slice(2, 4))
        np.testing.assert_array_equal(first.observations[:, 0], [0, 1])  # the global offsets
        np.testing.assert_array_equal(second.observations[:, 0], [2, 3])
        with pytest.raises(RuntimeError, match="waiting for actions"):
            env.get_observations()  # both groups hold; nothing to wait for
        env.send_actions(np.zeros((2, 1), np.int64), rows=slice(2, 4))
        assert env.get_observations().rows == slice(2, 4)
        with pytest.raises(ValueError, match="shaped"):
            env.send_actions(np.zeros((4, 1), np.int64))


def test_results_do_not_depend_on_num_workers() -> None:
    runs = []
    for make_env in (make_cartpole, make_scripted):
        single = VectorEnvironment(make_env, 4, num_workers=1, mode="serial")  # type: ignore[arg-type]
        split = VectorEnvironment(make_env, 4, num_workers=2)  # type: ignore[arg-type]
        with single, split:
            runs.append((record(single, 25), record(split, 25)))
    for one, two in runs:
        assert_same(one, two)


def test_spawned_workers_build_the_env() -> None:
    with VectorEnvironment(make_bandit, 2, 1, start_method="spawn") as env:
        assert env.start_method == "spawn"
        check_environment_contract(env, steps=10)


# ------------------------------------------------------------------ failures and cleanup
def test_killed_worker_is_reported_and_cleaned_up() -> None:
    env = VectorEnvironment(make_bandit, 4, 2, timeout_s=20)
    pids, name = env.worker_pids, env.shared_memory_name
    env.reset()
    env.get_observations()
    with open(f"/proc/{pids[1]}/comm") as comm:  # ps and pgrep show which worker is which
        assert comm.read().strip() == "mettle-env-1"
    os.kill(pids[1], signal.SIGKILL)
    env.send_actions(np.zeros((8, 1), np.int64))
    start = time.monotonic()
    with pytest.raises(EnvironmentWorkerError, match=rf"worker 1 \(pid {pids[1]}\).*SIGKILL") as error:
        env.get_observations()
    assert time.monotonic() - start < 3
    assert error.value.worker_index == 1 and error.value.exitcode == -signal.SIGKILL
    env.close()
    env.close()
    assert_cleaned_up(pids, name)


@pytest.mark.parametrize("mode", ["serial", "multiprocess"])
def test_worker_exception_surfaces_with_the_original_message(mode: str) -> None:
    with VectorEnvironment(make_failing, 4, 2, mode=mode) as env:
        env.reset()
        with pytest.raises(EnvironmentWorkerError, match=r"worker 1 .*raised ValueError: boom: sub-env step 3 failed"):
            for _ in range(5):
                env.get_observations()
                env.send_actions(np.zeros((4, 1), np.int64))
        pids = env.worker_pids
    assert_cleaned_up(pids, env.shared_memory_name)


def test_hanging_worker_times_out() -> None:
    env = VectorEnvironment(make_hanging, 4, 2, timeout_s=1.0)
    pids = env.worker_pids
    env.reset()
    for _ in range(2):
        env.get_observations()
        env.send_actions(np.zeros((4, 1), np.int64))
    start = time.monotonic()
    with pytest.raises(EnvironmentWorkerError, match=r"worker 1 \(pid \d+\) did not answer within timeout_s=1"):
        env.get_observations()
    assert 0.9 < time.monotonic() - start < 3
    env.close()
    assert_cleaned_up(pids, env.shared_memory_name)


def test_stopped_worker_is_named_within_the_timeout_and_killed_on_close() -> None:
    env = VectorEnvironment(make_bandit, 4, 2, timeout_s=1.0)
    pids, name = env.worker_pids, env.shared_memory_name
    try:
        env.reset()
        env.get_observations()
        os.kill(pids[1], signal.SIGSTOP)  # alive but silent: only the timeout can tell
        env.send_actions(np.zeros((8, 1), np.int64))
        start = time.monotonic()
        pattern = rf"worker 1 \(pid {pids[1]}\) did not answer within timeout_s=1 s \(process state: stopped"
        with pytest.raises(EnvironmentWorkerError, match=pattern) as error:
            env.get_observations()
        assert 0.9 < time.monotonic() - start < 3
        assert (error.value.worker_index, error.value.pid) == (1, pids[1])
        start = time.monotonic()
    finally:
        env.close()
    assert time.monotonic() - start < 1.5, "a stopped worker must not need the SIGKILL grace period"
    assert_cleaned_up(pids, name)


def _fail_in_worker_1(num_envs: int, worker: int) -> TrainingEnvironment:
    """Worker 1 cannot build its sub-env, so start-up must fail naming it."""
    if worker == 1:
        raise RuntimeError("cannot build sub-env 1")
    return BanditEnvironment(num_envs=num_envs)


def test_a_worker_failing_at_startup_is_named_and_no_worker_is_left() -> None:
    pattern = r"worker 1 \(pid \d+\) raised RuntimeError: cannot build sub-env 1"
    with pytest.raises(EnvironmentWorkerError, match=pattern):
        VectorEnvironment(_fail_in_worker_1, 4, 2)
    assert not [p for p in mp.active_children() if p.name.startswith("mettle-env-worker")]


def test_close_is_idempotent_and_garbage_collection_cleans_up() -> None:
    env = VectorEnvironment(make_scripted, 4, 2)
    pids, name = env.worker_pids, env.shared_memory_name
    assert name is not None and len(pids) == 2
    env.get_observations()  # a batch still referencing shared memory must not block close
    env.close()
    env.close()
    assert_cleaned_up(pids, name)
    with pytest.raises(RuntimeError, match="closed"):
        env.get_observations()
    env = VectorEnvironment(make_scripted, 4, 2)
    pids, name = env.worker_pids, env.shared_memory_name
    del env
    gc.collect()
    assert_cleaned_up(pids, name)


def _own_env_then_wait(queue: Any) -> None:
    env = VectorEnvironment(make_scripted, 2, 2)
    queue.put((env.worker_pids, env.shared_memory_name))
    time.sleep(60)


def test_workers_exit_when_their_parent_dies() -> None:
    context = mp.get_context("fork")
    queue = context.Queue()
    parent = context.Process(target=_own_env_then_wait, args=(queue,))
    parent.start()
    pids, name = queue.get(timeout=20)
    os.kill(parent.pid, signal.SIGKILL)  # type: ignore[arg-type]
    parent.join()
    deadline = time.monotonic() + 5
    while not all(is_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(is_gone(pid) for pid in pids)
    with contextlib.suppress(FileNotFoundError):  # a killed owner leaves its segment to the resource tracker
        SharedMemory(name=name).unlink()


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_envs": 10, "num_workers": 4}, "num_envs=10 is not divisible by num_workers=4.*use num_envs=12"),
        ({"num_envs": 6, "num_workers": 3, "async_factor": 2},
         "num_workers=3 is not divisible by async_factor=2.*use num_workers=4 or async_factor=1"),
        ({"num_envs": 4, "num_workers": 0}, "num_workers must be >= 1"),
        ({"num_envs": 4, "num_workers": 2, "mode": "threads"}, "mode must be"),
    ],
)
def test_bad_layouts_are_rejected_with_a_fix(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VectorEnvironment(make_bandit, **kwargs)


def test_make_env_must_be_picklable() -> None:
    with pytest.raises(TypeError, match="picklable"):
        VectorEnvironment(lambda n, w: BanditEnvironment(num_envs=n), 2, 1)


def test_sub_envs_must_build_the_requested_instances() -> None:
    with pytest.raises(ValueError, match="built 3 instances"):
        VectorEnvironment(lambda n, w: BanditEnvironment(num_envs=3), 4, 2, mode="serial")
