"""The shipped testing environments keep the next-step contract and are exactly predictable."""

from __future__ import annotations

from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest

from mettle.envs.testing import (
    BanditEnvironment,
    Rollout,
    ScriptedEnvironment,
    check_environment_contract,
    check_rollout,
    collect_rollout,
)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_envs": 3, "agents_per_env": 2, "episode_length": 3},
        {"action_heads": 3, "terminate_on_wrong": True},
        {"num_envs": 2, "agents_per_env": 3, "num_actions": 2, "terminate_on_wrong": True},
    ],
)
def test_bandit_keeps_the_contract(kwargs: dict) -> None:
    env = BanditEnvironment(**kwargs)
    rollout = check_environment_contract(env, steps=120, seed=1)
    rows = env.batch_info.num_rows
    heads = kwargs.get("action_heads", 1)
    assert rollout.observations.shape == (120, rows, heads * kwargs.get("num_actions", 4))
    assert rollout.actions.shape == (120, rows, heads)
    assert env.policy_env_info.num_agents == kwargs.get("agents_per_env", 1)
    ends = rollout.terminals if kwargs.get("terminate_on_wrong") else rollout.truncations
    assert ends.any()


def test_bandit_pays_one_exactly_when_the_action_matches() -> None:
    env = BanditEnvironment(num_envs=6, num_actions=3, episode_length=50)
    batch = env.get_observations()
    targets = batch.observations.argmax(axis=1)
    np.testing.assert_array_equal(targets, env.targets[:, 0])
    actions = np.where(np.arange(6) % 2 == 0, targets, (targets + 1) % 3)[:, None].astype(np.int64)
    env.send_actions(actions)
    np.testing.assert_array_equal(env.get_observations().rewards, [1, 0, 1, 0, 1, 0])


def test_bandit_heads_pay_the_fraction_matched() -> None:
    env = BanditEnvironment(num_envs=1, num_actions=4, action_heads=2)
    env.get_observations()
    actions = env.targets.copy()
    actions[0, 1] = (actions[0, 1] + 1) % 4
    env.send_actions(actions)
    assert env.get_observations().rewards[0] == pytest.approx(0.5)


def test_bandit_optimal_policy_earns_the_episode_length() -> None:
    env = BanditEnvironment(num_envs=4, episode_length=5, terminate_on_wrong=True)
    rollout = collect_rollout(env, 30, actions=lambda _t, _batch: env.targets.copy())
    check_rollout(rollout)
    finished = [info for infos in rollout.infos for info in infos]
    assert len(finished) == 4 * 5 and all(info["episode_return"] == 5.0 for info in finished)
    assert not rollout.terminals.any()


def test_bandit_wrong_answer_terminates_then_restarts() -> None:
    env = BanditEnvironment(num_envs=2, terminate_on_wrong=True)
    env.get_observations()
    env.send_actions(np.stack([env.targets[0], (env.targets[1] + 1) % 4]))
    batch = env.get_observations()
    assert batch.terminals.tolist() == [False, True] and batch.mask.tolist() == [True, False]
    assert batch.infos == [{"episode_return": 0.0, "episode_length": 1, "env_id": 1, "agent_id": 0}]
    env.send_actions(env.targets.copy())  # row 1's action is ignored
    batch = env.get_observations()
    assert batch.starts.tolist() == [False, True] and batch.rewards[1] == 0.0 and batch.mask.all()


def assert_same(a: Rollout, b: Rollout) -> None:
    for name in ("observations", "rewards", "terminals", "truncations", "mask", "starts", "actions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_bandit_is_a_function_of_the_seed() -> None:
    first = collect_rollout(BanditEnvironment(agents_per_env=2, terminate_on_wrong=True), 60, seed=5)
    again = collect_rollout(BanditEnvironment(agents_per_env=2, terminate_on_wrong=True), 60, seed=5)
    other = collect_rollout(BanditEnvironment(agents_per_env=2, terminate_on_wrong=True), 60, seed=6)
    assert_same(first, again)
    assert not np.array_equal(first.observations, other.observations)


@pytest.mark.parametrize("end", ["terminal", "truncation"])
def test_scripted_episode_is_exact(end: str) -> None:
    env = ScriptedEnvironment(num_envs=1, episode_length=3, end=end)
    rollout = check_environment_contract(env, steps=9)
    assert rollout.observations[:, 0, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert rollout.rewards[:, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    ended = [False, False, False, True] * 2 + [False]
    assert getattr(rollout, f"{end}s")[:, 0].tolist() == ended
    assert not getattr(rollout, "truncations" if end == "terminal" else "terminals").any()
    assert rollout.mask[:, 0].tolist() == [not e for e in ended]
    assert rollout.starts[:, 0].tolist() == [True, False, False, False] * 2 + [True]
    assert rollout.infos[3] == [{"episode_return": 6.0, "episode_length": 3, "env_id": 0, "agent_id": 0}]


def test_scripted_rewards_offsets_and_recorded_actions() -> None:
    env = ScriptedEnvironment(
        num_envs=2, episode_length=4, rewards=[0.5, 0.0, 0.0, 10.0], row_offsets=[0, 2], record_actions=True
    )
    rollout = check_environment_contract(env, steps=8)
    assert rollout.observations[:4, :, 0].tolist() == [[0, 2], [1, 3], [2, 4], [3, 0]]
    assert rollout.rewards[:4].tolist() == [[0, 0], [0.5, 0], [0, 10], [0, 0]]
    assert rollout.infos[2] == [{"episode_return": 10.0, "episode_length": 2, "env_id": 1, "agent_id": 0}]
    assert env.actions is not None and len(env.actions) == 8
    np.testing.assert_array_equal(np.stack(env.actions), rollout.actions)
    callable_env = ScriptedEnvironment(num_envs=1, episode_length=3, rewards=lambda t: -t)
    assert callable_env.reward_table.tolist() == [0, -1, -2]


def test_testing_envs_reject_bad_actions_and_close_twice() -> None:
    env = ScriptedEnvironment(num_envs=2, num_actions=3)
    env.get_observations()
    with pytest.raises(ValueError, match="shaped"):
        env.send_actions(np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        env.send_actions(np.full((2, 1), 3, dtype=np.int64))
    env.close()
    env.close()
    assert env.closed


def test_contract_checker_catches_a_missing_start() -> None:
    rollout = collect_rollout(ScriptedEnvironment(num_envs=1, episode_length=2), steps=6)
    rollout.starts[3, 0] = False
    with pytest.raises(AssertionError, match="starts"):
        check_rollout(rollout)


def test_contract_checker_takes_uint8_observations_and_checks_them_against_the_space() -> None:
    env = ScriptedEnvironment(num_envs=2, episode_length=3)
    rollout = collect_rollout(env, steps=10)
    rollout.observations = rollout.observations.astype(np.uint8)  # tokens, as MettaGrid writes them
    check_rollout(rollout)
    uint8_info = replace(env.policy_env_info, observation_space=gym.spaces.Box(0, 255, (1,), np.uint8))
    check_rollout(rollout, uint8_info)
    with pytest.raises(AssertionError, match="observations are uint8, space says float32"):
        check_rollout(rollout, env.policy_env_info)
    rollout.observations = rollout.observations.astype(np.int64)
    with pytest.raises(AssertionError, match=r"float32 .*or uint8 .*got int64"):
        check_rollout(rollout)
