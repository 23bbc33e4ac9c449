"""MettaGridEnvironment: token rows, the next-step contract, episode rewards against the simulator, tasks, loading."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml

from mettle.envs.mettagrid import MettaGridEnvError, MettaGridEnvironment, make_mettagrid_environment
from mettle.envs.mettagrid_tasks import TASKS, arena
from mettle.envs.testing import check_rollout, collect_rollout
from mettle.rl.training.environment import EnvBatch, random_actions


def _copy(batch: EnvBatch) -> dict[str, np.ndarray]:
    """Batches reuse their arrays, so keep copies of what a check compares across steps."""
    names = ("rewards", "terminals", "truncations", "mask", "starts")
    return {name: np.array(getattr(batch, name), copy=True) for name in names}


def _episode_stat(infos: list[dict], key: str) -> float:
    """Mean of a per-agent episode stat (0 where an agent never logged it)."""
    return float(np.mean([info.get(key, 0.0) for info in infos]))


def test_arena_rows_and_episode_boundaries_match_the_simulator() -> None:
    env = make_mettagrid_environment("arena", num_envs=2, seed=0, max_steps=50)
    info, rows, agents = env.policy_env_info, env.batch_info.num_rows, env.batch_info.agents_per_env
    tokens = info.extras["num_tokens"]
    assert (rows, agents, info.num_agents) == (24, 12, 12)
    assert info.observation_space == gym.spaces.Box(0, 255, (tokens, 3), np.uint8)
    rng = np.random.default_rng(0)
    returns = np.zeros(rows)
    previous: dict[str, np.ndarray] | None = None
    first_obs = None
    episodes = 0
    for _ in range(1000):
        batch = env.get_observations()
        first_obs = batch.observations if first_obs is None else first_obs
        assert batch.observations is first_obs  # one buffer the simulators write into: no copies
        assert batch.observations.shape == (rows, tokens, 3) and batch.observations.dtype == np.uint8
        assert batch.rewards.dtype == np.float32
        assert all(getattr(batch, f).dtype == np.bool_ for f in ("terminals", "truncations", "mask", "starts"))
        now = _copy(batch)
        done = now["terminals"] | now["truncations"]
        np.testing.assert_array_equal(now["mask"], ~done)
        if previous is None:
            assert now["starts"].all() and not now["rewards"].any() and not done.any()
        else:
            ended_before = previous["terminals"] | previous["truncations"]
            np.testing.assert_array_equal(now["starts"], ended_before)
            assert not now["rewards"][now["starts"]].any() and not done[now["starts"]].any()
            returns[now["starts"]] = 0.0
        returns += now["rewards"]
        if done.any():
            episodes += _check_finished_games(env, batch, done, returns)
        previous = now
        env.send_actions(random_actions(info, rows, rng))
    assert episodes >= 30  # 19 episodes of 51 receives per game
    env.close()


def _check_finished_games(env: MettaGridEnvironment, batch: EnvBatch, done: np.ndarray, returns: np.ndarray) -> int:
    """Whole games end together; their returns equal the simulator's own episode rewards and the infos."""
    agents = env.batch_info.agents_per_env
    by_env = done.reshape(-1, agents)
    assert (by_env.all(axis=1) == by_env.any(axis=1)).all()
    reported = {(i["env_id"], i["agent_id"]): i for i in batch.infos}
    finished = np.flatnonzero(by_env.all(axis=1))
    assert len(reported) == len(batch.infos) == len(finished) * agents
    for env_id in finished:
        simulation = env.simulations[env_id]
        assert simulation is not None and simulation.current_step == 50
        rows = slice(env_id * agents, (env_id + 1) * agents)
        np.testing.assert_allclose(returns[rows], simulation.episode_rewards, atol=1e-5)
        infos = [reported[(env_id, agent)] for agent in range(agents)]
        np.testing.assert_allclose([i["episode_return"] for i in infos], returns[rows], atol=1e-5)
        assert {i["episode_length"] for i in infos} == {50}
        assert all(i["game/objects.mine"] == 6 and "agent/action.move.success" in i for i in infos)
        assert all(isinstance(v, float) for i in infos for k, v in i.items() if "/" in k)
    return len(finished)


def test_a_game_whose_agents_end_apart_ends_whole() -> None:
    env = make_mettagrid_environment("arena", num_envs=2, seed=0, num_agents=3, width=8, height=8, mines=2, altars=1)
    noop = np.zeros((6, 1), dtype=np.int64)
    env.send_actions(noop)
    game = env.simulations[1]
    assert game is not None
    game._c_sim.terminals()[1] = True  # mettagrid never does this itself; a custom game might
    env.send_actions(noop)
    batch = env.get_observations()
    assert batch.terminals.tolist() == [False] * 4 + [True, False]
    assert batch.truncations.tolist() == [False] * 3 + [True, False, True]
    assert batch.mask.tolist() == [True] * 3 + [False] * 3
    assert sorted((i["env_id"], i["agent_id"], i["episode_length"]) for i in batch.infos) == [
        (1, a, 2) for a in range(3)
    ]
    env.send_actions(noop)
    assert env.get_observations().starts.tolist() == [False] * 3 + [True] * 3
    env.close()


def test_contract_checker_passes_with_and_without_desync() -> None:
    for desync in (False, True):
        env = make_mettagrid_environment("arena", num_envs=3, seed=4, desync_episodes=desync, max_steps=30)
        rollout = collect_rollout(env, 200, seed=1)
        assert rollout.observations.dtype == np.uint8  # the tokens as the simulator writes them
        check_rollout(rollout, env.policy_env_info)
        lengths = [i["episode_length"] for infos in rollout.infos for i in infos]
        assert (min(lengths) < 30) == desync and max(lengths) == 30
        env.close()


def test_tokens_are_padded_with_0xff_and_index_known_features() -> None:
    env = make_mettagrid_environment("navigation", num_envs=2, seed=1)
    extras = env.policy_env_info.extras
    assert extras["padding_value"] == 255 and extras["global_location"] == 254
    assert len(extras["feature_names"]) == len(extras["feature_normalizations"]) == extras["num_features"]
    assert (extras["obs_height"], extras["obs_width"]) == (11, 11)
    assert extras["action_names"] == ["noop", "move_north", "move_south", "move_west", "move_east"]
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs = env.get_observations().observations
        padding = obs[..., 1] == 255
        assert (obs[padding] == 255).all() and padding[:, -1].all()
        assert (obs[~padding][:, 1] < extras["num_features"]).all()
        location = obs[~padding][:, 0]
        spatial = location[location != 254]
        assert ((spatial >> 4) < 11).all() and ((spatial & 15) < 11).all()
        env.send_actions(random_actions(env.policy_env_info, env.batch_info.num_rows, rng))
    env.close()


def test_reset_seed_reproduces_episodes() -> None:
    def run(env: MettaGridEnvironment, seed: int) -> np.ndarray:
        env.reset(seed)
        rng = np.random.default_rng(7)
        seen = []
        for _ in range(40):  # crosses an episode end (max_steps=15)
            seen.append(env.get_observations().observations.copy())
            env.send_actions(random_actions(env.policy_env_info, env.batch_info.num_rows, rng))
        return np.stack(seen)

    env = make_mettagrid_environment("arena", num_envs=2, seed=0, max_steps=15)
    other = make_mettagrid_environment("arena", num_envs=2, seed=99, max_steps=15)
    first = run(env, 3)
    np.testing.assert_array_equal(first, run(other, 3))
    np.testing.assert_array_equal(first, run(env, 3))
    assert not np.array_equal(first, run(env, 4))
    env.close()
    other.close()


def test_arena_random_policy_makes_hearts() -> None:
    env = make_mettagrid_environment("arena", num_envs=1, seed=0)
    infos = collect_rollout(env, env.config.game.max_steps + 1, seed=0).infos[-1]
    assert len(infos) == 12
    hearts = _episode_stat(infos, "agent/heart.gained")
    assert hearts > 0.5  # about 2 per agent in a 256-step episode with uniform random moves
    assert _episode_stat(infos, "episode_return") == pytest.approx(hearts)
    env.close()


def test_navigation_random_policy_finds_goals() -> None:
    env = make_mettagrid_environment("navigation", num_envs=2, seed=0)
    assert env.batch_info.num_rows == 8 and env.policy_env_info.action_space == gym.spaces.Discrete(5)
    rollout = collect_rollout(env, 2 * (env.config.game.max_steps + 1), seed=0)
    infos = [info for batch in rollout.infos for info in batch]
    assert len(infos) == 16  # two episodes of 2 games x 4 agents
    assert _episode_stat(infos, "episode_return") > 0.2  # a random walk earns about 2 hearts per agent
    assert max(info["game/objects.goal"] for info in infos) == 4
    env.close()


def test_vibe_actions_become_a_second_head() -> None:
    config = arena(num_agents=2, width=8, height=8, mines=2, altars=1, max_steps=10)
    config.game.actions.change_vibe.enabled = True
    env = MettaGridEnvironment(config, num_envs=2)
    space = env.policy_env_info.action_space
    vibes = len(env.policy_env_info.extras["vibe_action_names"])
    assert isinstance(space, gym.spaces.MultiDiscrete) and vibes > 0
    assert space.nvec.tolist() == [5, vibes + 1]
    rollout = collect_rollout(env, 30, seed=0)
    check_rollout(rollout, env.policy_env_info)
    env.close()


def test_bad_actions_and_use_after_close_fail() -> None:
    env = make_mettagrid_environment("arena", num_envs=1, seed=0, num_agents=2, width=8, height=8, mines=2, altars=1)
    with pytest.raises(ValueError, match="shaped"):
        env.send_actions(np.zeros((3, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="lie in"):
        env.send_actions(np.full((2, 1), 5, dtype=np.int64))
    with pytest.raises(ValueError, match="all 2 rows"):
        env.send_actions(np.zeros((1, 1), dtype=np.int64), rows=slice(0, 1))
    env.close()
    env.close()
    assert env.simulations == (None,)
    with pytest.raises(RuntimeError, match="closed"):
        env.send_actions(np.zeros((2, 1), dtype=np.int64))


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_files_load(tmp_path: Path, suffix: str) -> None:
    config = arena(num_agents=3, width=9, height=9, mines=2, altars=2, max_steps=12)
    data = config.model_dump(mode="json")
    path = tmp_path / f"game{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    env = make_mettagrid_environment(str(path), num_envs=2, seed=0)
    assert env.config.model_dump(mode="json") == data
    assert env.batch_info.num_rows == 6
    rollout = collect_rollout(env, 30, seed=0)
    assert sum(len(infos) for infos in rollout.infos) == 12  # two episodes of 2 games x 3 agents
    env.close()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        ("game: [unclosed", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("game:\n  num_agents: -3\n", "game.num_agents"),
        ("game:\n  no_such_field: 1\n", "no_such_field"),
    ],
)
def test_bad_config_files_fail_in_one_line(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=problem) as caught:
        make_mettagrid_environment(str(path), num_envs=1, seed=0)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message


def test_a_config_the_game_rejects_names_the_file(tmp_path: Path) -> None:
    config = arena(num_agents=2, width=8, height=8, mines=2, altars=1)
    config.game.map_builder.objects["volcano"] = 1  # no such object type
    path = tmp_path / "volcano.json"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    with pytest.raises(ValueError, match="cannot build the game") as caught:
        make_mettagrid_environment(str(path), num_envs=1, seed=0)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_unknown_task_and_bad_task_arguments_are_explained() -> None:
    with pytest.raises(MettaGridEnvError, match="known tasks: arena, navigation"):
        make_mettagrid_environment("arenaa", num_envs=1, seed=0)
    with pytest.raises(ValueError, match=r"'arena'.*unexpected keyword"):
        make_mettagrid_environment("arena", num_envs=1, seed=0, mienz=3)
    with pytest.raises(ValueError, match="do not fit"):
        make_mettagrid_environment("arena", num_envs=1, seed=0, width=5, height=5)
    assert {"arena", "navigation"} <= set(TASKS)
