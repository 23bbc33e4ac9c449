"""Box actions through the env adapters: sent unclipped as float32, clipped only for the simulator, replayed exactly."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pytest

from mettle.config import EnvConfig
from mettle.contracts import TrainingEnvironment
from mettle.envs.factory import make_environment
from mettle.envs.gymnasium import GymnasiumEnvError, GymnasiumEnvironment, has_box_actions
from mettle.envs.pettingzoo import PettingZooEnvironment, parse_pettingzoo_spec
from mettle.envs.rows import EnvStateError, EpisodeLog
from mettle.envs.spaces import BoxActionConverter, action_converter
from mettle.envs.testing import check_environment_contract

SEED = 3
BOUNDS = gym.spaces.Box(np.array([-2.0, 0.0], dtype=np.float32), np.array([2.0, 1.0], dtype=np.float32))


class SpaceError(ValueError):
    """Stands in for an adapter's own error class."""


# ------------------------------------------------------------------------------ the converter
def test_the_converter_clips_a_copy_and_leaves_the_sent_actions_as_they_were() -> None:
    converter = action_converter(BOUNDS, rows=3, error=SpaceError)
    assert isinstance(converter, BoxActionConverter) and converter.action_dtype == np.float32
    sent = np.array([[-3.5, 0.5], [1.0, 7.0], [0.25, -0.125]], dtype=np.float32)
    kept = sent.copy()
    batch = converter.batched(sent)
    np.testing.assert_array_equal(batch, [[-2.0, 0.5], [1.0, 1.0], [0.25, 0.0]])
    np.testing.assert_array_equal(sent, kept)
    assert not np.shares_memory(batch, sent) and batch.dtype == np.float32
    np.testing.assert_array_equal(converter.single(np.array([5.0, -1.0], dtype=np.float32)), [2.0, 0.0])


def test_values_are_rounded_to_float32_first_so_a_replay_of_the_log_sends_the_same() -> None:
    space = gym.spaces.Box(-10.0, 10.0, (1,), dtype=np.float64)
    converter = BoxActionConverter(space, rows=1, error=SpaceError)
    sent = np.array([[0.1]], dtype=np.float64)
    assert converter.batched(sent).dtype == np.float64
    assert converter.batched(sent)[0, 0] == float(np.float32(0.1)) != 0.1


def test_an_integer_box_and_wrong_shapes_are_one_line() -> None:
    with pytest.raises(SpaceError, match=r"action space Box\(0, 3, \(2,\), int64\) holds integers"):
        action_converter(gym.spaces.Box(0, 3, (2,), dtype=np.int64), rows=1, error=SpaceError)
    converter = action_converter(BOUNDS, rows=2, error=SpaceError)
    with pytest.raises(ValueError, match=r"expected actions shaped \(2, 2\), got \(2, 1\)"):
        converter.batched(np.zeros((2, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="must be float32 values, got bool"):
        converter.check(np.zeros((2, 2), dtype=bool))


def test_the_episode_log_keeps_float32_actions_bit_for_bit() -> None:
    log = EpisodeLog(2, 1, np.float32)
    log.begin(0, {"seed": 0})
    log.begin(1, {"seed": 1})
    sends = np.random.default_rng(0).normal(size=(5, 2, 3)).astype(np.float32) * 7
    for send in sends:
        log.record(send)
    restored = EpisodeLog(2, 1, np.float32)
    restored.load_state_dict(log.state_dict())
    for (_, actions), instance in zip(restored.episodes(), range(2), strict=True):
        assert actions.dtype == np.float32
        np.testing.assert_array_equal(actions[:, 0], sends[:, instance])
    with pytest.raises(EnvStateError, match="saved episodes hold float32 actions, this environment sends int64"):
        EpisodeLog(2, 1).load_state_dict(log.state_dict())


# ------------------------------------------------------------------------------ Gymnasium
class RecordedActions(gym.ActionWrapper):
    """Keeps every action the simulator was given (after the adapter's clip)."""

    seen: ClassVar[list[np.ndarray]] = []

    def action(self, action: np.ndarray) -> np.ndarray:
        """Record and pass on."""
        RecordedActions.seen.append(np.array(action, copy=True))
        return action


def wide_actions(env: TrainingEnvironment, steps: int) -> np.ndarray:
    """Actions of std 3 around 0: many outside Pendulum's [-2, 2]."""
    rows, width = env.batch_info.num_rows, env.policy_env_info.action_width
    return (np.random.default_rng(SEED).normal(size=(steps, rows, width)) * 3).astype(np.float32)


def drive(env: TrainingEnvironment, actions: np.ndarray) -> np.ndarray:
    """Every observation batch seen while sending `actions`, one send per batch."""
    seen = []
    for sent in actions:
        seen.append(env.get_observations().observations.copy())
        env.send_actions(sent)
    return np.stack(seen)


def test_pendulum_takes_float_actions_and_its_simulator_sees_them_clipped() -> None:
    RecordedActions.seen = []
    with GymnasiumEnvironment("Pendulum-v1", 3, seed=SEED, wrappers=(RecordedActions,)) as env:
        info = env.policy_env_info
        assert info.continuous_actions and info.action_width == 1 and info.action_dtype == np.float32
        actions = wide_actions(env, 50)
        drive(env, actions)
        check_environment_contract(env, steps=50, seed=SEED)
    given = np.stack(RecordedActions.seen[:150]).reshape(50, 3, 1)
    np.testing.assert_array_equal(given, np.clip(actions, -2.0, 2.0))
    assert np.abs(actions).max() > 2.0


def test_pendulum_resumes_exactly_by_replaying_its_float_actions(caplog: pytest.LogCaptureFixture) -> None:
    actions = wide_actions(GymnasiumEnvironment("Pendulum-v1", 3, seed=SEED), 330)
    with GymnasiumEnvironment("Pendulum-v1", 3, seed=SEED) as env:  # episodes of 200 steps: one is mid-way at 260
        drive(env, actions[:260])
        state = env.state_dict()
        assert state is not None and state["log"]["actions"][0].dtype.is_floating_point
        expected = drive(env, actions[260:])
    with caplog.at_level(logging.WARNING), GymnasiumEnvironment("Pendulum-v1", 3, seed=SEED) as resumed:
        resumed.load_state_dict(state)
        np.testing.assert_array_equal(drive(resumed, actions[260:]), expected)
    assert not caplog.records, "the replay rebuilt the saved observations"


def test_env_workers_share_float_actions_and_match_the_serial_env() -> None:
    serial_cfg = EnvConfig(name="gym:Pendulum-v1", num_envs=4)
    workers_cfg = serial_cfg.model_copy(update={"vectorization": "multiprocess", "num_workers": 2})
    runs = []
    for cfg in (serial_cfg, workers_cfg):
        env = make_environment(cfg, seed=SEED)
        try:
            env.reset(seed=SEED)
            runs.append(drive(env, wide_actions(env, 40)))
        finally:
            env.close()
    np.testing.assert_array_equal(runs[0], runs[1])


def test_box_action_ids_are_told_from_discrete_ones_and_unbuildable_ones() -> None:
    assert has_box_actions("Pendulum-v1") and has_box_actions("MountainCarContinuous-v0")
    assert not has_box_actions("CartPole-v1") and not has_box_actions("NoSuchEnv-v0")


def test_integer_box_actions_are_refused_naming_the_env() -> None:
    class IntegerBox(gym.ActionWrapper):
        def __init__(self, env: gym.Env) -> None:
            super().__init__(env)
            self.action_space = gym.spaces.Box(-2, 2, (1,), dtype=np.int64)

        def action(self, action: Any) -> Any:
            return action

    with pytest.raises(GymnasiumEnvError, match=r"^Pendulum-v1: action space Box\(-2, 2, \(1,\), int64\) holds"):
        GymnasiumEnvironment("Pendulum-v1", 1, wrappers=(IntegerBox,))


# ------------------------------------------------------------------------------ PettingZoo
CONTINUOUS_SPREAD = {"continuous_actions": True, "max_cycles": 30}


def spread(num_envs: int = 2) -> PettingZooEnvironment:
    """MPE simple spread with Box(0, 1, (5,)) actions per agent."""
    return PettingZooEnvironment(parse_pettingzoo_spec("mpe2.simple_spread_v3:parallel_env"), num_envs, SEED,
                                 CONTINUOUS_SPREAD)


def test_pettingzoo_box_actions_keep_the_contract_and_resume_exactly(caplog: pytest.LogCaptureFixture) -> None:
    with spread() as env:
        assert env.policy_env_info.action_layout == ("box", (5,))
        check_environment_contract(env, steps=70, seed=SEED)
    with spread() as env:
        actions = wide_actions(env, 80)
        drive(env, actions[:45])
        state = env.state_dict()
        assert state is not None
        expected = drive(env, actions[45:])
    with caplog.at_level(logging.WARNING), spread() as resumed:
        resumed.load_state_dict(state)
        np.testing.assert_array_equal(drive(resumed, actions[45:]), expected)
    assert not caplog.records
