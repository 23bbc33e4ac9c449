"""PettingZoo adapter: next-step contract, early-exit masking, exact episode infos, spec parsing, learning."""

from __future__ import annotations

import pickle
import warnings
from functools import partial
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pettingzoo")

import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv
from pettingzoo.classic.rps import rps
from pettingzoo.test import parallel_api_test, parallel_seed_test

from mettle.agent.registry import build_policy
from mettle.envs.pettingzoo import PettingZooEnvError, PettingZooEnvironment, parse_pettingzoo_spec
from mettle.envs.pettingzoo_testing import TargetMatchParallelEnv, parallel_env
from mettle.envs.testing import Rollout, check_environment_contract, check_rollout, collect_rollout
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import TrainerComponent

SPEC = "mettle.envs.pettingzoo_testing:parallel_env"
Episode = tuple[int, int, int, float, int]
"""(batch it is reported in, env_id, agent_id, return, length)"""


# ------------------------------------------------------------------------------ the test env
@pytest.mark.parametrize("kwargs", [{}, {"exit_steps": [2, None, 5], "wrong_streak_limit": None}, {"num_agents": 1}])
def test_test_env_passes_pettingzoo_api_and_seed_tests(kwargs: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the API test only warns about wrong dict keys
        parallel_api_test(parallel_env(**kwargs), num_cycles=60)
        parallel_seed_test(partial(parallel_env, **kwargs), num_cycles=60)


def test_test_env_pays_for_the_target_and_drops_agents_after_a_wrong_streak() -> None:
    env = parallel_env(num_agents=2, wrong_streak_limit=2)
    env.reset(seed=0)
    for _ in range(3):
        targets = env.targets
        _, rewards, terms, _, _ = env.step({"agent_0": targets["agent_0"], "agent_1": (targets["agent_1"] + 1) % 4})
        assert rewards == {"agent_0": 1.0, "agent_1": 0.0}
        if terms["agent_1"]:
            break
    assert terms == {"agent_0": False, "agent_1": True} and env.agents == ["agent_0"]


# --------------------------------------------------------------------------- replay checking
def replay(rollout: Rollout, num_envs: int, seed: int, kwargs: dict[str, Any]) -> list[Episode]:
    """Step fresh raw ParallelEnvs with the rollout's actions; check liveness and observations row by row."""
    episodes: list[Episode] = []
    for i in range(num_envs):
        episodes += replay_instance(rollout, i, seed + i, kwargs)
    return sorted(episodes)


def replay_instance(rollout: Rollout, i: int, seed: int, kwargs: dict[str, Any]) -> list[Episode]:
    """One instance's finished episodes, as the adapter must report them."""
    env = TargetMatchParallelEnv(**kwargs)
    env.reset(seed=seed)
    later_seeds = np.random.default_rng(seed)  # the adapter's documented seeds for later episodes
    a = len(env.possible_agents)
    block = slice(i * a, (i + 1) * a)
    steps = len(rollout.rewards)
    returns, lengths, episodes = np.zeros(a), np.zeros(a, dtype=int), []
    for t in range(steps - 1):
        if not env.agents:  # the adapter resets on this send; everyone starts next receive
            assert not rollout.mask[t, block].any()
            env.reset(seed=int(later_seeds.integers(2**31)))
            assert rollout.starts[t + 1, block].all() and not rollout.rewards[t + 1, block].any()
            continue
        live = [agent in env.agents for agent in env.possible_agents]
        assert rollout.mask[t, block].tolist() == live, f"batch {t} instance {i}"
        acting = list(env.agents)
        actions = {
            agent: int(rollout.actions[t, i * a + k, 0])
            for k, agent in enumerate(env.possible_agents)
            if agent in acting
        }
        obs, rewards, terms, truncs, _ = env.step(actions)
        for agent in acting:
            k = env.possible_agents.index(agent)
            returns[k] += rewards[agent]
            lengths[k] += 1
            np.testing.assert_array_equal(rollout.observations[t + 1, i * a + k], obs[agent])
            assert rollout.rewards[t + 1, i * a + k] == rewards[agent]
            if terms[agent] or truncs[agent]:
                episodes.append((t + 1, i, k, float(returns[k]), int(lengths[k])))
                returns[k], lengths[k] = 0.0, 0
    return episodes


def reported(rollout: Rollout) -> list[Episode]:
    """The episodes the adapter reported, in the same form as `replay`."""
    return sorted(
        (t, info["env_id"], info["agent_id"], info["episode_return"], info["episode_length"])
        for t, infos in enumerate(rollout.infos)
        for info in infos
    )


def check_dormant_rows(rollout: Rollout, agents: int) -> None:
    """Multi-agent next-step rules: after an episode end a row stays masked, flagless and unpaid until its
    whole instance restarts, and instances restart all rows together."""
    done = rollout.terminals | rollout.truncations
    assert not (rollout.terminals & rollout.truncations).any()
    assert not (rollout.mask & done).any(), "a final observation must be masked"
    dormant = ~rollout.mask & ~done & ~rollout.starts
    assert not rollout.rewards[dormant].any()
    assert (done[:-1] | dormant[:-1])[dormant[1:]].all(), "a row goes dormant only after its episode ended"
    gone = done | dormant
    assert (gone[:-1] | ~rollout.mask[:-1])[rollout.starts[1:]].all(), "only rows that left may restart"
    starts = rollout.starts.reshape(len(rollout.starts), -1, agents)
    assert (starts.all(axis=2) == starts.any(axis=2)).all(), "an instance restarts all its rows together"
    restarted = rollout.starts[1:]
    assert not rollout.rewards[1:][restarted].any() and not done[1:][restarted].any()


# --------------------------------------------------------------------------------- contract
def make_adapter(num_envs: int, seed: int, **kwargs: Any) -> PettingZooEnvironment:
    return PettingZooEnvironment(parallel_env, num_envs=num_envs, seed=seed, env_kwargs=kwargs)


def test_contract_checker_passes_when_agents_end_together() -> None:
    kwargs: dict[str, Any] = {"num_agents": 3, "episode_length": 7, "wrong_streak_limit": None}
    with make_adapter(3, 5, **kwargs) as env:
        assert env.batch_info.num_rows == 9 and env.batch_info.agents_per_env == 3
        assert env.policy_env_info.num_agents == 3
        rollout = check_environment_contract(env, steps=40, seed=5)
    assert reported(rollout) == replay(rollout, 3, 5, kwargs)
    assert rollout.starts[8].all() and rollout.truncations[7].all()


def test_early_exits_report_exact_per_agent_returns_and_lengths() -> None:
    kwargs: dict[str, Any] = {"num_agents": 3, "episode_length": 12, "exit_steps": [None, 4, None]}
    with make_adapter(4, 11, **kwargs) as env:
        rollout = collect_rollout(env, 150, seed=11)
    episodes = reported(rollout)
    assert episodes == replay(rollout, 4, 11, kwargs)
    assert len(episodes) > 60 and {e[4] for e in episodes} != {12}, "agents must leave early, at various steps"
    check_dormant_rows(rollout, 3)
    infos = [info for infos in rollout.infos for info in infos]
    assert all(0.0 <= info["accuracy"] <= 1.0 for info in infos), "numeric env infos are passed through"


def test_a_row_whose_agent_left_stays_masked_without_flags_until_its_instance_restarts() -> None:
    kwargs: dict[str, Any] = {
        "num_agents": 3,
        "episode_length": 6,
        "exit_steps": [2, None, 4],
        "wrong_streak_limit": None,
    }
    with make_adapter(2, 0, **kwargs) as env:
        rollout = collect_rollout(env, 15, seed=0)
    for row in (0, 3):  # agent_0 of each instance leaves at step 2, agent_2 at 4; agent_1 truncates at 6
        assert rollout.mask[:, row].tolist() == [True, True] + [False] * 5 + [True, True] + [False] * 5 + [True]
        assert np.flatnonzero(rollout.terminals[:, row]).tolist() == [2, 9]
        assert np.flatnonzero(rollout.starts[:, row]).tolist() == [0, 7, 14]
        np.testing.assert_array_equal(rollout.observations[3:7, row], rollout.observations[[2] * 4, row])
    for flags, row in ((rollout.terminals, 2), (rollout.truncations, 1)):
        assert np.flatnonzero(flags[:, row]).tolist() == ([4, 11] if row == 2 else [6, 13])
    dormant = ~rollout.mask & ~rollout.terminals & ~rollout.truncations
    assert not rollout.rewards[dormant].any() and not rollout.truncations[:, [0, 2]].any()
    check_dormant_rows(rollout, 3)


def test_reset_seeds_instance_i_with_seed_plus_i_and_close_is_idempotent() -> None:
    env = make_adapter(3, 0)
    env.reset(seed=40)
    first = env.get_observations().observations.copy()
    for i in range(3):
        obs, _ = parallel_env().reset(seed=40 + i)
        np.testing.assert_array_equal(first[3 * i : 3 * i + 3], np.stack(list(obs.values())))
    again = collect_rollout(env, 30, seed=40)
    np.testing.assert_array_equal(again.observations, collect_rollout(env, 30, seed=40).observations)
    with pytest.raises(ValueError, match="actions shaped"):
        env.send_actions(np.zeros((2, 1), dtype=np.int64))
    env.close()
    env.close()


# ------------------------------------------------------------------------- space conversion
class CountingEnv(ParallelEnv):
    """Agents a, b: Discrete(4, start=1) observations, MultiDiscrete actions; b may join late, a may vanish."""

    metadata: dict[str, Any] = {"name": "counting_v0", "is_parallelizable": True}  # noqa: RUF012

    def __init__(
        self, obs_size: dict[str, int] | None = None, join_at: int = 0, vanish_at: int = 0, length: int = 100
    ) -> None:
        self.possible_agents = ["a", "b"]
        sizes = obs_size or {}
        self.obs_spaces = {agent: spaces.Discrete(sizes.get(agent, 4), start=1) for agent in self.possible_agents}
        self.act_space = spaces.MultiDiscrete([2, 3], start=[10, 20])
        self.join_at, self.vanish_at, self.length = join_at, vanish_at, length
        self.received: list[dict[str, Any]] = []
        self.t = 0

    def observation_space(self, agent: str) -> spaces.Space:
        return self.obs_spaces[agent]

    def action_space(self, agent: str) -> spaces.Space:
        return self.act_space

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        self.agents, self.t = ["a"] if self.join_at else ["a", "b"], 0
        return dict.fromkeys(self.agents, 1), {agent: {} for agent in self.agents}

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        self.received.append(actions)
        self.t += 1
        if self.t == self.join_at:
            self.agents.append("b")
        obs = {agent: 1 + (self.t + k) % 4 for k, agent in enumerate(self.agents)}
        truncs = dict.fromkeys(self.agents, self.t >= self.length)
        infos = {agent: {"nested": {"x": 2}, "text": "skipped"} for agent in self.agents}
        out = obs, dict.fromkeys(self.agents, 1.0), dict.fromkeys(self.agents, False), truncs, infos
        if self.t == self.vanish_at:
            self.agents.remove("a")  # without a flag: the adapter counts it as terminated
        if self.t >= self.length:
            self.agents = []
        return out


def test_discrete_observations_become_one_hot_and_multidiscrete_actions_get_their_start() -> None:
    env = PettingZooEnvironment(CountingEnv, num_envs=1)
    assert env.policy_env_info.observation_space.shape == (4,)
    batch = env.get_observations()
    np.testing.assert_array_equal(batch.observations, [[1, 0, 0, 0], [1, 0, 0, 0]])
    env.send_actions(np.array([[1, 2], [0, 1]]))
    sent = env.envs[0].received[-1]
    assert sent["a"].tolist() == [11, 22] and sent["b"].tolist() == [10, 21]
    np.testing.assert_array_equal(env.get_observations().observations, [[0, 1, 0, 0], [0, 0, 1, 0]])


def test_late_joiners_start_mid_episode_and_unflagged_departures_count_as_terminated() -> None:
    with PettingZooEnvironment(partial(CountingEnv, join_at=2, vanish_at=3, length=5), num_envs=1) as env:
        rollout = collect_rollout(env, 8)
    assert rollout.mask.tolist() == [[1, 0], [1, 0], [1, 1], [0, 1], [0, 1], [0, 0], [1, 0], [1, 0]]
    assert rollout.starts.tolist() == [[1, 1], [0, 0], [0, 1], [0, 0], [0, 0], [0, 0], [1, 1], [0, 0]]
    assert rollout.rewards.tolist() == [[0, 0], [1, 0], [1, 0], [1, 1], [0, 1], [0, 1], [0, 0], [1, 0]]
    assert np.argwhere(rollout.terminals).tolist() == [[3, 0]] and np.argwhere(rollout.truncations).tolist() == [[5, 1]]
    assert not rollout.observations[0, 1].any(), "an absent agent's row shows zeros"
    assert [len(sent) for sent in env.envs[0].received[:3]] == [1, 1, 2]
    assert rollout.infos[3] == [
        {"nested/x": 2.0, "episode_return": 3.0, "episode_length": 3, "env_id": 0, "agent_id": 0}
    ]
    assert rollout.infos[5] == [
        {"nested/x": 2.0, "episode_return": 3.0, "episode_length": 3, "env_id": 0, "agent_id": 1}
    ]


def test_rock_paper_scissors_shows_each_player_the_others_last_move_one_hot() -> None:
    with PettingZooEnvironment(rps.parallel_env, num_envs=2) as env:
        assert env.policy_env_info.observation_space == spaces.Box(0.0, 1.0, (4,), dtype=np.float32)
        assert env.policy_env_info.extras["observation_source"] == spaces.Discrete(4)
        rollout = collect_rollout(env, 40, seed=1)
    check_rollout(rollout)  # both players always end together here
    np.testing.assert_array_equal(rollout.observations.sum(axis=-1), 1.0)
    assert (rollout.observations[rollout.starts][:, 3] == 1.0).all(), "3: no move seen yet"
    moved = ~rollout.starts[1:]
    partner_moves = rollout.actions[:-1, [1, 0, 3, 2], 0]  # rows are (instance, player): the other player's row
    np.testing.assert_array_equal(rollout.observations[1:][moved], np.eye(4)[partner_moves][moved])


class DictObservationEnv(ParallelEnv):
    """Agents a, b see a Dict of a Box and a Discrete drawn from the reset seed; `shown` keeps what they saw."""

    metadata: dict[str, Any] = {"name": "dict_obs_v0", "is_parallelizable": True}  # noqa: RUF012

    def __init__(self, text: bool = False, length: int = 4) -> None:
        self.possible_agents = ["a", "b"]
        parts: dict[str, spaces.Space] = {"cell": spaces.Discrete(3, start=1), "pos": spaces.Box(-1.0, 1.0, (2,))}
        if text:
            parts["name"] = spaces.Text(4)
        self.space = spaces.Dict(parts)
        self.length, self.t = length, 0
        self.shown: dict[str, Any] = {}
        self.rng = np.random.default_rng()

    def observation_space(self, agent: str) -> spaces.Space:
        return self.space

    def action_space(self, agent: str) -> spaces.Space:
        return spaces.Discrete(2)

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        self.rng, self.t, self.agents = np.random.default_rng(seed), 0, list(self.possible_agents)
        return self.observe(), {agent: {} for agent in self.agents}

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        self.t += 1
        obs, flags = self.observe(), dict.fromkeys(self.agents, self.t >= self.length)
        out = obs, dict.fromkeys(self.agents, 0.0), dict.fromkeys(self.agents, False), flags, {}
        if self.t >= self.length:
            self.agents = []
        return out

    def observe(self) -> dict[str, Any]:
        draw = self.rng
        self.shown = {agent: {"cell": int(draw.integers(1, 4)), "pos": draw.uniform(-1, 1, 2).astype(np.float32)}
                      for agent in self.agents}
        return self.shown


def test_dict_observations_land_where_gymnasium_flattens_them() -> None:
    with PettingZooEnvironment(DictObservationEnv, num_envs=2) as env:
        assert env.policy_env_info.observation_space.shape == (3 + 2,)
        env.reset(seed=5)
        for _ in range(10):  # through episode ends (length 4) and restarts
            observations = env.get_observations().observations
            expected = [spaces.flatten(instance.space, instance.shown[agent])
                        for instance in env.envs for agent in instance.possible_agents]
            np.testing.assert_array_equal(observations, np.stack(expected).astype(np.float32))
            env.send_actions(np.zeros((4, 1), dtype=np.int64))


def test_observation_parts_without_a_feature_form_are_refused_naming_the_env_and_part() -> None:
    with pytest.raises(PettingZooEnvError) as error:
        PettingZooEnvironment(partial(DictObservationEnv, text=True), num_envs=1)
    message = str(error.value)
    assert message.startswith("dict_obs_v0: observation space Dict(") and "its part ['name'] is Text(1, 4," in message
    assert message.endswith("wrap the env so that each agent observes one of them") and "\n" not in message


@pytest.mark.parametrize(
    "factory,problem",
    [
        (lambda: _with_box_actions(CountingEnv({"b": 5})), r"counting_v0: agents differ in spaces and 'a' acts in Box"),
        (lambda: _with_multibinary_actions(parallel_env()), r"action space MultiBinary\(2\) is not supported"),
    ],
)
def test_unsupported_spaces_fail_naming_agents_and_spaces(factory: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        PettingZooEnvironment(factory, num_envs=2)


def _with_box_actions(env: CountingEnv) -> CountingEnv:
    env.act_space = spaces.Box(-1.0, 1.0, (2,))
    return env


def _with_multibinary_actions(env: TargetMatchParallelEnv) -> TargetMatchParallelEnv:
    env.action_spaces = dict.fromkeys(env.possible_agents, spaces.MultiBinary(2))
    return env


# ------------------------------------------------------------------------------- spec parsing
@pytest.mark.parametrize(
    "spec,message",
    [
        ("parallel_env", "must look like '<module>:<callable>'"),
        ("mettle.envs.no_such_module:parallel_env", "cannot import module 'mettle.envs.no_such_module'"),
        ("mettle.envs.pettingzoo_testing:paralel_env", "has no attribute 'paralel_env'; did you mean 'parallel_env'"),
        ("mettle.envs.pettingzoo_testing:__doc__", "is a str, not a callable"),
    ],
)
def test_bad_specs_fail_in_one_line_naming_the_problem(spec: str, message: str) -> None:
    with pytest.raises(PettingZooEnvError) as error:
        parse_pettingzoo_spec(spec)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("mettle.envs.pettingzoo_testing:raw_env", "returned an AEC environment"),
        ("collections:OrderedDict", "returned OrderedDict, not a pettingzoo ParallelEnv"),
    ],
)
def test_factories_that_do_not_build_a_parallel_env_are_rejected(spec: str, message: str) -> None:
    factory = parse_pettingzoo_spec(spec)
    with pytest.raises(PettingZooEnvError, match=message) as error:
        PettingZooEnvironment(factory, num_envs=1)
    assert "\n" not in str(error.value)


def test_a_parsed_spec_builds_the_env_and_pickles() -> None:
    factory = pickle.loads(pickle.dumps(parse_pettingzoo_spec(SPEC)))
    with PettingZooEnvironment(factory, num_envs=2, env_kwargs={"num_agents": 2}) as env:
        assert env.batch_info.num_rows == 4 and env.possible_agents == ["agent_0", "agent_1"]
    with pytest.raises(
        PettingZooEnvError, match=r"cannot create '\S+:parallel_env' with \{'num_agent': 2\}: .*num_agent"
    ):
        PettingZooEnvironment(factory, env_kwargs={"num_agent": 2})


# ---------------------------------------------------------------------------------- learning
def test_ppo_beats_a_random_policy_on_the_test_env() -> None:
    """Fast (~2 s): PPO through the adapter, with early exits and masked rows, learns to copy targets."""
    torch.set_num_threads(1)
    kwargs: dict[str, Any] = {"episode_length": 20, "exit_steps": [None, None, 10]}
    with make_adapter(8, 1, **kwargs) as env:
        random_returns = [i["episode_return"] for infos in collect_rollout(env, 600, seed=1).infos for i in infos]
    env = make_adapter(8, 1, **kwargs)
    cfg = TrainerConfig(
        total_timesteps=12_288,
        batch_size=768,
        minibatch_size=192,
        bptt_horizon=8,
        update_epochs=4,
        optimizer={"learning_rate": 3e-3},
        seed=1,
    )
    trainer = Trainer(cfg, env, build_policy("mlp"), "cpu")
    returns: list[float] = []

    class Returns(TrainerComponent):
        def on_step(self, infos: list[dict[str, Any]]) -> None:
            returns.extend(float(i["episode_return"]) for i in infos)

    trainer.register(Returns())
    trainer.train()
    env.close()
    random_mean, trained_mean = float(np.mean(random_returns)), float(np.mean(returns[-64:]))
    assert random_mean < 3.0, random_mean  # the optimum is (20 + 20 + 10) / 3 ~ 16.7
    assert trained_mean >= max(1.5 * random_mean, 0.6 * 50 / 3), (random_mean, trained_mean)


def test_agents_that_differ_in_observations_get_padded_typed_rows_and_late_joiners_stay_masked() -> None:
    with PettingZooEnvironment(partial(CountingEnv, {"b": 6}, join_at=2, length=5), num_envs=1) as env:
        info = env.policy_env_info
        assert info.observation_space.shape == (6 + 2,) and info.extras["agent_types"] == ("a", "b")
        assert not info.extras["invalid_actions"].any(), "both share one action space"
        rollout = collect_rollout(env, 4)
    assert rollout.mask.tolist() == [[1, 0], [1, 0], [1, 1], [1, 1]]
    assert not rollout.observations[:2, 1].any(), "an absent agent's row shows zeros, type included"
    np.testing.assert_array_equal(rollout.observations[0, 0], [1, 0, 0, 0, 0, 0, 1, 0])  # a sees 1 of 4, padded
    np.testing.assert_array_equal(rollout.observations[2, 1], [0, 0, 0, 1, 0, 0, 0, 1])  # b joins seeing 4 of 6


class MixedActionsEnv(CountingEnv):
    """CountingEnv where a acts in Discrete(4, start=1) and b in MultiDiscrete([2, 3], start=[10, 20])."""

    def action_space(self, agent: str) -> spaces.Space:
        return spaces.Discrete(4, start=1) if agent == "a" else self.act_space


def test_a_discrete_and_a_multidiscrete_agent_train_together_each_getting_only_its_own_choices() -> None:
    env = PettingZooEnvironment(partial(MixedActionsEnv, {"b": 6}, length=20), num_envs=4)
    assert env.policy_env_info.action_space == spaces.MultiDiscrete([4, 3])
    cfg = TrainerConfig(total_timesteps=1024, batch_size=256, minibatch_size=128, bptt_horizon=8, seed=1)
    Trainer(cfg, env, build_policy("mlp"), "cpu").train()
    sent = [step for instance in env.envs for step in instance.received]
    env.close()
    assert {step["a"] for step in sent} == {1, 2, 3, 4}
    assert {tuple(step["b"].tolist()) for step in sent} == {(x, y) for x in (10, 11) for y in (20, 21, 22)}
