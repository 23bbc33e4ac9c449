"""Agents that differ in spaces: one padded, typed observation row and one masked union of actions."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.spaces import Box, Discrete, MultiDiscrete

from mettle.contracts import INVALID_ACTIONS_KEY
from mettle.envs.agent_types import AgentLayout, agent_role


def layout(spaces: dict) -> AgentLayout:
    return AgentLayout(spaces, ValueError, "test_v0: ", "fix it")


def test_roles_are_names_before_the_last_underscore() -> None:
    assert [agent_role(n) for n in ("adversary_2", "leadadversary_0", "eve", "red_team_1")] == [
        "adversary", "leadadversary", "eve", "red_team"]


def test_agents_sharing_both_spaces_keep_todays_layout() -> None:
    shared = layout({"alice_0": (Box(0, 1, (2,)), Discrete(3)), "bob_0": (Box(0, 1, (2,)), Discrete(3))})
    assert shared.shared and shared.extras() == {}


def test_union_of_discrete_and_multidiscrete_masks_missing_choices_and_heads() -> None:
    mixed = layout({"x_0": (Box(0, 1, (2,)), Discrete(4)), "y_0": (Box(-2, 1, (3,)), MultiDiscrete([2, 3]))})
    assert mixed.action_space == MultiDiscrete([4, 3])
    f, t = False, True
    np.testing.assert_array_equal(mixed.extras()[INVALID_ACTIONS_KEY], [[f, f, f, f, f, t, t], [f, f, t, t, f, f, f]])
    assert mixed.observation_space == Box(np.array([-2, -2, -2, 0, 0]), np.array([1, 1, 1, 1, 1]), dtype=np.float32)
    out = np.full(5, 9.0, dtype=np.float32)
    mixed.write_row(out, "x_0", np.array([0.5, 0.25]))
    np.testing.assert_array_equal(out, [0.5, 0.25, 0.0, 1.0, 0.0])
    assert mixed.single("x_0", np.array([3, 0]), ValueError) == 3
    assert mixed.single("y_0", np.array([1, 2]), ValueError).tolist() == [1, 2]
    for agent, row in (("y_0", [2, 0]), ("x_0", [0, 1])):
        with pytest.raises(ValueError, match=rf"action \[.*\] for '{agent}' is outside its space"):
            mixed.single(agent, np.array(row), ValueError)


def test_a_role_whose_agents_differ_in_spaces_is_split() -> None:
    split = layout({"a_0": (Box(0, 1, (2,)), Discrete(4)), "a_1": (Box(0, 1, (3,)), Discrete(4)),
                    "a_2": (Box(0, 1, (2,)), Discrete(4))})
    assert split.extras()["agent_types"] == ("a", "a#1")
    assert split.extras()["agent_type_of"] == {"a_0": 0, "a_1": 1, "a_2": 0}


def test_differing_box_actions_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"^test_v0: agents differ in spaces and 'b_0' acts in Box") as error:
        layout({"a_0": (Box(0, 1, (2,)), Discrete(4)), "b_0": (Box(0, 1, (3,)), Box(-1, 1, (2,)))})
    assert "\n" not in str(error.value) and str(error.value).endswith("(e.g. continuous_actions=False)")


def test_speaker_listener_gets_two_types_and_the_speaker_loses_two_choices() -> None:
    pytest.importorskip("mpe2")
    from mpe2 import simple_speaker_listener_v4

    env = simple_speaker_listener_v4.parallel_env()
    spaces = {agent: (env.observation_space(agent), env.action_space(agent)) for agent in env.possible_agents}
    speaker_listener = layout(spaces)
    assert speaker_listener.observation_space.shape == (11 + 2,) and speaker_listener.action_space == Discrete(5)
    assert speaker_listener.extras()[INVALID_ACTIONS_KEY].tolist() == [[False] * 3 + [True] * 2, [False] * 5]
