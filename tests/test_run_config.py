"""RunConfig settings reach the parts they configure: worker timeout, vectorisation, evaluation envs, stop epoch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mettle.cli import evaluation_envs
from mettle.config import build_run_config
from mettle.envs.factory import make_environment
from mettle.rl.training.components.signals import StopAtEpoch


def test_worker_timeout_reaches_the_env_workers() -> None:
    cfg = build_run_config(["env.name=gym:CartPole-v1", "env.num_envs=2", "env.vectorization=multiprocess",
                            "env.num_workers=2", "env.worker_timeout_s=7.5"])
    env = make_environment(cfg.env, seed=0)
    try:
        assert env._backend.timeout_s == 7.5
    finally:
        env.close()


@pytest.mark.parametrize(
    "overrides,expected",
    [(["env.name=gym:CartPole-v1"], "CartPoleVectorEnv"),
     (["env.name=gym:CartPole-v1", "env.vectorization=gymnasium_sync"], "SyncVectorEnv"),
     (["env.name=gym:mettle/CartPoleNoVel-v1"], "SyncVectorEnv")],
)
def test_serial_gymnasium_uses_the_native_vector_env_where_there_is_one(overrides: list[str], expected: str) -> None:
    env = make_environment(build_run_config([*overrides, "env.num_envs=2"]).env, seed=0)
    try:
        assert type(env.vector_env).__name__ == expected
    finally:
        env.close()


def test_multiprocess_gymnasium_starts_like_the_serial_sync_env_whatever_the_worker_count() -> None:
    firsts = []
    for layout in (["env.vectorization=gymnasium_sync"], ["env.vectorization=multiprocess", "env.num_workers=2"],
                   ["env.vectorization=multiprocess", "env.num_workers=4"]):
        env = make_environment(build_run_config(["env.name=gym:CartPole-v1", "env.num_envs=4", *layout]).env, seed=5)
        try:
            env.reset(seed=5)
            firsts.append(np.concatenate([batch.observations for batch in receive_all(env)]))
        finally:
            env.close()
    for other in firsts[1:]:
        np.testing.assert_array_equal(other, firsts[0])


def receive_all(env: Any) -> list[Any]:
    """One batch per row group, until every row has been delivered once."""
    batches, rows = [], 0
    while rows < env.batch_info.num_rows:
        batch = env.get_observations()
        batches.append(batch)
        rows += batch.observations.shape[0]
    return batches


def test_evaluator_envs_are_the_training_env_plus_the_extra_ones() -> None:
    cfg = build_run_config(["env.name=mettagrid:arena", "env.kwargs.num_agents=4", "env.vectorization=multiprocess",
                            "env.num_workers=2", "evaluator.num_envs=2",
                            'evaluator.envs=["mettagrid:navigation", "mettagrid:arena"]'])
    factories = evaluation_envs(cfg)
    assert list(factories) == ["mettagrid:arena", "mettagrid:navigation"]
    arena, navigation = (factories[name]() for name in factories)
    try:
        assert arena.batch_info.num_rows == 2 * 4, "training kwargs apply to the training env, in-process"
        assert type(arena).__name__ == "MettaGridEnvironment"
        assert navigation.batch_info.num_rows == 2 * 4, "the extra task keeps its own defaults (4 agents)"
    finally:
        arena.close()
        navigation.close()


def test_stop_at_epoch_rejects_a_non_positive_epoch() -> None:
    with pytest.raises(ValueError, match="epoch 0 must be >= 1"):
        StopAtEpoch(0)
