"""GymnasiumEnvironment delivers exact next-step batches whatever the vector env's autoreset mode."""

from __future__ import annotations

import functools
import logging
import multiprocessing
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from mettle.envs.gymnasium import GymnasiumEnvError, GymnasiumEnvironment
from mettle.envs.testing import DICT_TARGET_ID, Rollout, check_rollout, collect_rollout

MODES = ("next_step", "same_step", "disabled")
SHORT = {"max_episode_steps": 20}  # random CartPole play both falls over and hits this limit
SEED = 3


def cartpole_rollout(
    mode: str, vectorization: str = "sync", num_envs: int = 4, steps: int = 300, env_id: str = "CartPole-v1"
) -> Rollout:
    """A checked random-action rollout of a short CartPole."""
    with GymnasiumEnvironment(env_id, num_envs, vectorization, mode, seed=SEED, env_kwargs=SHORT) as env:
        rollout = collect_rollout(env, steps, seed=SEED)
        check_rollout(rollout, env.policy_env_info)
    return rollout


@functools.cache
def sync_rollout(mode: str, num_envs: int = 4, steps: int = 300) -> Rollout:
    """Cached: several tests look at the same sync rollouts."""
    return cartpole_rollout(mode, "sync", num_envs, steps)


def assert_same_rollout(a: Rollout, b: Rollout) -> None:
    """Every delivered array and every info identical."""
    for name in ("observations", "rewards", "terminals", "truncations", "mask", "starts", "actions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.infos == b.infos


def replay_row(rollout: Rollout, row: int, mode: str) -> None:
    """Re-run one row in a single gym env, applying the adapter's documented reset behaviour."""
    env = gym.make("CartPole-v1", **SHORT)
    obs, _ = env.reset(seed=SEED + row)
    np.testing.assert_array_equal(rollout.observations[0, row], obs)
    for t in range(1, len(rollout.rewards)):
        action = int(rollout.actions[t - 1, row, 0])
        if rollout.mask[t - 1, row]:
            obs, reward, terminal, truncation, _ = env.step(action)
            expected = (reward, terminal, truncation and not terminal)
        else:
            obs = restart(env, action, mode)
            expected = (0.0, False, False)
        np.testing.assert_array_equal(rollout.observations[t, row], obs, err_msg=f"{mode} t={t} row={row}")
        got = (rollout.rewards[t, row], rollout.terminals[t, row], rollout.truncations[t, row])
        assert got == expected, f"{mode} t={t} row={row}"
    env.close()


def restart(env: gym.Env, ignored_action: int, mode: str) -> np.ndarray:
    """NEXT_STEP resets once; SAME_STEP/DISABLED reset, take the discarded step, and reset again."""
    obs, _ = env.reset()
    if mode == "next_step":
        return obs
    _, _, terminal, truncation, _ = env.step(ignored_action)
    if mode == "same_step" and (terminal or truncation):
        env.reset()
    obs, _ = env.reset()
    return obs


@pytest.mark.parametrize("mode", MODES)
def test_contract_with_both_episode_ends(mode: str) -> None:
    rollout = sync_rollout(mode)
    assert rollout.observations.shape == (300, 4, 4) and rollout.observations.dtype == np.float32
    assert rollout.terminals.any() and rollout.truncations.any()
    assert not (rollout.terminals & rollout.truncations).any()
    for t, infos in enumerate(rollout.infos):
        for info in infos:
            row = rollout.info_row(info)
            assert (
                info["episode_length"] == 20 if rollout.truncations[t, row] else info["episode_length"] <= 20
            )
            assert info["episode_return"] == info["episode_length"]  # CartPole pays 1 per step


@pytest.mark.parametrize("mode", MODES)
def test_every_delivered_step_matches_a_single_env(mode: str) -> None:
    rollout = sync_rollout(mode)
    for row in range(4):
        replay_row(rollout, row, mode)


def test_modes_agree_until_each_rows_first_episode_ends() -> None:
    rollouts = [sync_rollout(mode) for mode in MODES]
    done = rollouts[0].terminals | rollouts[0].truncations
    for row in range(4):
        end = int(np.argmax(done[:, row])) + 1
        for other in rollouts[1:]:
            np.testing.assert_array_equal(other.observations[:end, row], rollouts[0].observations[:end, row])
            np.testing.assert_array_equal(other.rewards[:end, row], rollouts[0].rewards[:end, row])
            np.testing.assert_array_equal(other.truncations[:end, row], rollouts[0].truncations[:end, row])


@pytest.mark.parametrize("mode", MODES)
def test_async_matches_sync(mode: str) -> None:
    assert_same_rollout(cartpole_rollout(mode, "async", num_envs=2, steps=80), sync_rollout(mode, 2, 80))


def test_async_close_leaves_no_processes_and_workers_know_mettle_ids() -> None:
    before = set(multiprocessing.active_children())
    env = GymnasiumEnvironment("mettle/CartPoleNoVel-v1", num_envs=2, vectorization="async")
    assert len(set(multiprocessing.active_children()) - before) == 2
    batch = env.get_observations()
    assert batch.observations.shape == (2, 2)
    env.send_actions(np.zeros((2, 1), dtype=np.int64))
    env.close()
    env.close()
    assert set(multiprocessing.active_children()) - before == set()


def test_cartpole_without_velocities_keeps_position_and_angle() -> None:
    full = sync_rollout("next_step", 2, 80)
    hidden = cartpole_rollout("next_step", num_envs=2, steps=80, env_id="mettle/CartPoleNoVel-v1")
    np.testing.assert_array_equal(hidden.observations, full.observations[..., [0, 2]])
    np.testing.assert_array_equal(hidden.rewards, full.rewards)


@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.DISABLED])
def test_from_vector_env_honours_its_autoreset_mode(mode: AutoresetMode) -> None:
    thunk = functools.partial(gym.make, "CartPole-v1", **SHORT)
    vec_env = gym.vector.SyncVectorEnv([thunk] * 4, autoreset_mode=mode)
    with GymnasiumEnvironment.from_vector_env(vec_env, seed=SEED) as env:
        assert env.autoreset_mode == mode
        rollout = collect_rollout(env, 300, seed=SEED)
    check_rollout(rollout)
    assert_same_rollout(rollout, sync_rollout(mode.name.lower()))


def test_reset_seeds_each_sub_env_with_seed_plus_index() -> None:
    with GymnasiumEnvironment("CartPole-v1", num_envs=3) as env:
        env.reset(seed=11)
        first = env.get_observations().observations.copy()
        env.send_actions(np.ones((3, 1), dtype=np.int64))
        env.reset(seed=11)
        np.testing.assert_array_equal(env.get_observations().observations, first)
    for i in range(3):
        np.testing.assert_array_equal(first[i], gym.make("CartPole-v1").reset(seed=11 + i)[0])


class TwoHeadEnv(gym.Env):
    """Pays 10 * head0 + head1, truncates after 4 steps, and reports a numeric info."""

    observation_space = gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 2])

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(3, dtype=np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        obs = np.full(3, self.t / 10, dtype=np.float32)
        return obs, float(10 * action[0] + action[1]), False, self.t >= 4, {"heads_sum": int(action.sum())}


@pytest.mark.parametrize("mode", MODES)
def test_multidiscrete_actions_and_final_infos(mode: str) -> None:
    vec_env = gym.vector.SyncVectorEnv([TwoHeadEnv] * 3, autoreset_mode=AutoresetMode[mode.upper()])
    with GymnasiumEnvironment.from_vector_env(vec_env) as env:
        assert env.policy_env_info.action_nvec == (3, 2)
        rollout = collect_rollout(env, 30)
    check_rollout(rollout)
    live = rollout.mask[:-1]
    paid = 10 * rollout.actions[:-1, :, 0] + rollout.actions[:-1, :, 1]
    np.testing.assert_array_equal(rollout.rewards[1:][live], paid[live])
    finished = [info for infos in rollout.infos for info in infos]
    assert finished and all(info["episode_length"] == 4 and "heads_sum" in info for info in finished)


def test_discrete_observations_are_one_hot() -> None:
    with GymnasiumEnvironment("FrozenLake-v1", num_envs=2) as env:
        assert env.policy_env_info.observation_space.shape == (16,)
        rollout = collect_rollout(env, 50)
    check_rollout(rollout)
    np.testing.assert_array_equal(rollout.observations.sum(axis=-1), 1.0)
    assert (rollout.observations[0, :, 0] == 1.0).all()  # every lake starts in cell 0


@pytest.mark.parametrize("env_id,features", [("Blackjack-v1", 32 + 11 + 2), (DICT_TARGET_ID, 1 + 2 + 3)])
@pytest.mark.parametrize("mode", ["next_step", "same_step"])
def test_tuple_and_dict_observations_match_gymnasiums_flatten_wrapper(env_id: str, features: int, mode: str) -> None:
    with GymnasiumEnvironment(env_id, 3, "sync", mode, seed=SEED) as env:
        info = env.policy_env_info
        assert info.observation_space == gym.spaces.Box(0.0, 1.0, (features,), dtype=np.float32)
        assert info.extras["observation_source"] == env.vector_env.single_observation_space
        ours = collect_rollout(env, 150, seed=SEED)
        check_rollout(ours, info)
    flatten = (gym.wrappers.FlattenObservation,)
    with GymnasiumEnvironment(env_id, 3, "sync", mode, seed=SEED, wrappers=flatten) as env:
        flat = env.vector_env.single_observation_space  # gymnasium flattens Blackjack's one-hot parts into int64
        named = {} if np.issubdtype(flat.dtype, np.floating) else {"observation_source": flat}
        assert env.policy_env_info.extras == named, "a Box of integers names its source"
        theirs = collect_rollout(env, 150, seed=SEED)
    assert (ours.starts[1:] & ~ours.mask[1:]).sum() == 0 and ours.starts[1:].any(), "episodes ended and restarted"
    assert_same_rollout(ours, theirs)


def test_blackjacks_tuple_is_three_one_hot_blocks() -> None:
    with GymnasiumEnvironment("Blackjack-v1", 4, seed=SEED) as env:
        observations = collect_rollout(env, 60, seed=SEED).observations
    for block in (slice(0, 32), slice(32, 43), slice(43, 45)):
        np.testing.assert_array_equal(observations[..., block].sum(axis=-1), 1.0)


def drive(env: GymnasiumEnvironment, actions: np.ndarray) -> np.ndarray:
    """Every observation batch seen while sending `actions`, one send per batch."""
    seen = []
    for sent in actions:
        seen.append(env.get_observations().observations.copy())
        env.send_actions(sent)
    return np.stack(seen)


@pytest.mark.parametrize("env_id", ["Blackjack-v1", DICT_TARGET_ID])
def test_flattened_observations_resume_exactly(env_id: str, caplog: pytest.LogCaptureFixture) -> None:
    actions = np.random.default_rng(SEED).integers(2, size=(70, 3, 1))
    with GymnasiumEnvironment(env_id, 3, seed=SEED) as env:
        env.reset()
        drive(env, actions[:30])
        state = env.state_dict()
        assert state is not None
        expected = drive(env, actions[30:])
    with caplog.at_level(logging.WARNING), GymnasiumEnvironment(env_id, 3, seed=SEED) as resumed:
        resumed.load_state_dict(state)
        np.testing.assert_array_equal(drive(resumed, actions[30:]), expected)
    assert not caplog.records, "the replay rebuilt the saved observations"


def test_unsupported_observations_name_the_part_and_the_fix() -> None:
    with pytest.raises(GymnasiumEnvError) as error:
        GymnasiumEnvironment(DICT_TARGET_ID, num_envs=1, env_kwargs={"note": True})
    message = str(error.value)
    assert message.startswith(f"{DICT_TARGET_ID}: observation space Dict(") and "\n" not in message
    assert "its part ['note'] is Text(1, 8," in message
    assert message.endswith("wrap the env in a gymnasium.ObservationWrapper that returns one of them")


def test_unknown_id_names_it_and_suggests_a_match() -> None:
    with pytest.raises(ValueError, match=r"CartPol-v1.*'CartPole-v1'"):
        GymnasiumEnvironment("CartPol-v1")


def test_bad_constructor_arguments_become_one_line_errors() -> None:
    with pytest.raises(GymnasiumEnvError, match="no_such_arg"):
        GymnasiumEnvironment("CartPole-v1", num_envs=1, env_kwargs={"no_such_arg": 1})
    with pytest.raises(GymnasiumEnvError, match="autoreset_mode"):
        GymnasiumEnvironment("CartPole-v1", num_envs=1, autoreset_mode="sometimes")


def test_wrong_action_shape_is_rejected() -> None:
    with GymnasiumEnvironment("CartPole-v1", num_envs=2) as env:
        env.get_observations()
        with pytest.raises(ValueError, match="actions shaped"):
            env.send_actions(np.zeros(2, dtype=np.int64))


def cartpole_step_from(obs: np.ndarray, action: int) -> tuple[np.ndarray, bool]:
    """One step of a single CartPole started from `obs`: the reference for the native vector env's dynamics."""
    env = gym.make("CartPole-v1").unwrapped
    env.reset(seed=0)
    env.state = obs.astype(np.float64)
    next_obs, _, terminal, _, _ = env.step(action)
    return next_obs, terminal


def test_native_vector_env_keeps_the_contract_and_cartpoles_dynamics() -> None:
    rollout = cartpole_rollout("next_step", "native", num_envs=4, steps=300)
    assert rollout.terminals.any() and rollout.truncations.any()
    for t in range(1, len(rollout.rewards)):
        for row in range(4):
            if not rollout.mask[t - 1, row]:
                assert rollout.starts[t, row] and rollout.rewards[t, row] == 0.0  # a fresh episode
                continue
            action = int(rollout.actions[t - 1, row, 0])
            expected, terminal = cartpole_step_from(rollout.observations[t - 1, row], action)
            np.testing.assert_allclose(rollout.observations[t, row], expected, rtol=1e-5, atol=1e-6)
            assert rollout.terminals[t, row] == terminal and rollout.rewards[t, row] == 1.0
    lengths = [info["episode_length"] for infos in rollout.infos for info in infos]
    assert max(lengths) == 20 and all(0 < n <= 20 for n in lengths)


@pytest.mark.parametrize(
    "env_id,vectorization,wrappers,kwargs,expected",
    [("CartPole-v1", "auto", (), {}, "CartPoleVectorEnv"),
     ("CartPole-v1", "auto", (), SHORT, "CartPoleVectorEnv"),
     ("CartPole-v1", "sync", (), {}, "SyncVectorEnv"),
     ("CartPole-v1", "auto", (gym.wrappers.RecordEpisodeStatistics,), {}, "SyncVectorEnv"),
     ("CartPole-v1", "auto", (), {"disable_env_checker": True}, "SyncVectorEnv"),  # gym.make's, not the class's
     ("mettle/CartPoleNoVel-v1", "auto", (), {}, "SyncVectorEnv")],
)
def test_auto_uses_the_native_vector_env_only_where_it_stands_in_exactly(
    env_id: str, vectorization: str, wrappers: tuple, kwargs: dict[str, Any], expected: str
) -> None:
    with GymnasiumEnvironment(env_id, 2, vectorization, wrappers=wrappers, env_kwargs=kwargs) as env:
        assert type(env.vector_env).__name__ == expected


def test_native_without_a_vector_entry_point_names_the_fix() -> None:
    with pytest.raises(GymnasiumEnvError, match=r"no native vector env.*vectorization='sync'"):
        GymnasiumEnvironment("mettle/CartPoleNoVel-v1", 2, "native")
