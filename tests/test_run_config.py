"""RunConfig settings reach the parts they configure: worker timeout, vectorisation, evaluation envs, stop epoch,
batch sizes fitted to the env's agent rows (through `mettle train`: tests/cli/test_cli_errors.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mettle.config import ConfigError, build_run_config, fit_run_config
from mettle.envs.factory import make_environment
from mettle.rl.training.components.signals import StopAtEpoch
from mettle.run import evaluation_envs


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


def test_only_the_users_own_trainer_keys_count_as_set() -> None:
    """Recipe defaults may be fitted to the env's rows; what the user typed (or a saved run holds) may not."""
    cfg = build_run_config(["batch_size=4096", "env.num_envs=4"], defaults=["minibatch_size=512", "update_epochs=2"])
    assert (cfg.trainer.batch_size, cfg.trainer.minibatch_size, cfg.trainer.update_epochs) == (4096, 512, 2)
    assert cfg.trainer.model_fields_set == {"batch_size"}
    resumed = build_run_config(["total_timesteps=10"], base=cfg.model_dump(mode="json"))
    assert {"batch_size", "minibatch_size", "total_timesteps"} <= resumed.trainer.model_fields_set


def test_size_rules_wait_for_the_rows() -> None:
    """batch_size=8064 alone (default minibatch 2048) builds; on 24 rows the unset minibatch_size is fitted."""
    cfg = build_run_config(["batch_size=8064"])
    fitted = fit_run_config(cfg, 24)
    assert (fitted.trainer.batch_size, fitted.trainer.minibatch_size) == (8064, 2016)
    assert fit_run_config(build_run_config([]), 8).trainer.batch_size == 8192, "sizes that fit stay"
    assert fit_run_config(build_run_config([]), 24).trainer.batch_size == 8064


def test_explicit_sizes_that_cannot_fit_fail_with_a_fix_that_works() -> None:
    cfg = build_run_config(["batch_size=4000"])
    with pytest.raises(ConfigError) as info:
        fit_run_config(cfg, 24)
    message = str(info.value)
    assert message.startswith("batch_size 4000 must be a multiple of agent rows x bptt_horizon (24 x 16 = 384)")
    fix = message.split("; try ")[1].split()
    fixed = fit_run_config(build_run_config(fix), 24)
    fixed.trainer.check_rows(24)
