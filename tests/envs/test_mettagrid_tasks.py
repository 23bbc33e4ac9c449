"""The MettaGrid task catalogue: tasks build, reject bad sizes, survive serialisation, and leave room to learn."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
import pytest
from mettagrid.config.mettagrid_config import MettaGridConfig
from mettagrid.map_builder.ascii import AsciiMapBuilderConfig
from mettagrid.simulator import Simulation

from mettle.envs.mettagrid import MettaGridEnvironment
from mettle.envs.mettagrid_tasks import TASKS, arena, navigation
from mettle.rl.training.environment import random_actions

MOVES = {1: (-1, 0), 2: (1, 0), 3: (0, -1), 4: (0, 1)}
"""Action id -> (row, col) step: move_north, move_south, move_west, move_east."""


@pytest.mark.parametrize("name", sorted(TASKS))
def test_default_tasks_build_and_step(name: str) -> None:
    config = TASKS[name]()
    env = MettaGridEnvironment(config, num_envs=2, seed=0)
    agents = config.game.num_agents
    assert env.batch_info.num_rows == 2 * agents
    assert env.policy_env_info.extras["action_names"] == ["noop", "move_north", "move_south", "move_west", "move_east"]
    rng = np.random.default_rng(0)
    for _ in range(5):
        env.send_actions(random_actions(env.policy_env_info, env.batch_info.num_rows, rng))
    assert env.get_observations().observations.shape[0] == 2 * agents
    env.close()


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: navigation(width=2), "width and height must be >= 3"),
        (lambda: navigation(width=5, height=5, num_agents=8, goals=4), "do not fit the 9 free cells of a 5x5 map"),
        (lambda: navigation(cooldown=0), "cooldown >= 1"),
        (lambda: navigation(goals=0), "goals >= 1"),
        (lambda: navigation(num_agents=0), "num_agents >= 1"),
        (lambda: arena(height=1), "width and height must be >= 3"),
        (lambda: arena(width=5, height=5), "do not fit"),
        (lambda: arena(altars=0), "at least one mine and one altar"),
        (lambda: arena(max_steps=0), "max_steps >= 1"),
    ],
)
def test_bad_sizes_fail_with_the_numbers(build: Callable[[], MettaGridConfig], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_survive_a_model_dump_round_trip(name: str) -> None:
    config = TASKS[name]()
    data = config.model_dump(mode="json")
    copy = MettaGridConfig.model_validate(data)
    assert copy.model_dump(mode="json") == data
    first, second = (MettaGridEnvironment(c, num_envs=2, seed=3) for c in (config, copy))
    rng = np.random.default_rng(0)
    for _ in range(10):  # same maps, same dynamics: the map builder and handlers came through intact
        np.testing.assert_array_equal(first.get_observations().observations, second.get_observations().observations)
        actions = random_actions(first.policy_env_info, first.batch_info.num_rows, rng)
        first.send_actions(actions)
        second.send_actions(actions)
    first.close()
    second.close()


def _corridor(config: MettaGridConfig, row: str) -> MettaGridConfig:
    """The task's objects and rules on a one-row map (`@` agent, `g` goal, `m` mine, `a` altar)."""
    config.game.num_agents = row.count("@")
    names = {"@": "agent.agent", "g": "goal", "m": "mine", "a": "altar", "#": "wall", ".": "empty"}
    border = "#" * (len(row) + 2)
    config.game.map_builder = AsciiMapBuilderConfig(map_data=[border, f"#{row}#", border], char_to_map_name=names)
    return MettaGridConfig.model_validate(config.model_dump(mode="json"))


def _rewards(config: MettaGridConfig, actions: list[int]) -> list[float]:
    """Agent 0's reward after each action of a one-agent game."""
    env = MettaGridEnvironment(config, num_envs=1, seed=0)
    rewards = []
    for action in actions:
        env.send_actions(np.array([[action]]))
        rewards.append(float(env.get_observations().rewards[0]))
    env.close()
    return rewards


def test_a_goal_pays_again_after_its_cooldown() -> None:
    config = _corridor(navigation(cooldown=4, max_steps=50), "@g.")
    paid = [step for step, reward in enumerate(_rewards(config, [4] * 13)) if reward]  # keep moving east into it
    assert paid == [0, 4, 8, 12]


def test_an_altar_turns_mined_ore_into_hearts() -> None:
    config = _corridor(arena(max_steps=50), "m@a")
    # altar without ore: nothing; three mines; three hearts; then no ore is left
    rewards = _rewards(config, [4, 3, 3, 3, 4, 4, 4, 4])
    assert rewards == [0, 0, 0, 0, 1, 1, 1, 0]


# ------------------------------------------------------------------ random vs a scripted policy
def _first_move(walls: np.ndarray, blocked: set[tuple[int, int]], start: tuple[int, int],
                targets: set[tuple[int, int]]) -> int:
    """The first move of a shortest path to a cell beside a target, or into the target when beside one."""
    for action, (dr, dc) in MOVES.items():
        if (start[0] + dr, start[1] + dc) in targets:
            return action
    first = {start: 0}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        for action, (dr, dc) in MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            if nxt in first or walls[nxt] or nxt in blocked:
                continue
            first[nxt] = first[cell] or action
            if any((nxt[0] + r, nxt[1] + c) in targets for r, c in MOVES.values()):
                return first[nxt]
            queue.append(nxt)
    return 0


Want = Callable[[int, set[tuple[int, int]], dict[str, set[tuple[int, int]]]], str]
"""(agent's first inventory item, cells beside it, cells of each object kind) -> the object kind to go to."""


def _scripted_actions(sim: Simulation, want: Want) -> np.ndarray:
    """Each agent walks to the nearest object of the kind it wants and moves into it."""
    walls = np.zeros((sim.map_height, sim.map_width), dtype=bool)
    kinds: dict[str, set[tuple[int, int]]] = {}
    agents: dict[int, tuple[tuple[int, int], int]] = {}
    for obj in sim.grid_objects().values():
        cell = (obj["r"], obj["c"])
        if obj["type_name"] == "wall":
            walls[cell] = True
        elif obj["type_name"] == "agent":
            agents[obj["agent_id"]] = (cell, obj["inventory"].get(0, 0))
        else:
            kinds.setdefault(obj["type_name"], set()).add(cell)
    blocked = set().union(*kinds.values()) | {cell for cell, _ in agents.values()}
    actions = np.zeros(len(agents), dtype=np.int64)
    for agent, (cell, item) in agents.items():
        beside = {(cell[0] + r, cell[1] + c) for r, c in MOVES.values()}
        actions[agent] = _first_move(walls, blocked - {cell}, cell, kinds[want(item, beside, kinds)])
    return actions


def _mean_return(config: MettaGridConfig, num_envs: int, want: Want | None) -> float:
    """Mean per-agent return of one episode per game: uniformly random actions, or the scripted policy."""
    env = MettaGridEnvironment(config, num_envs=num_envs, seed=0)
    rng = np.random.default_rng(0)
    infos: list[dict] = []
    while not infos:
        if want is None:
            actions = random_actions(env.policy_env_info, env.batch_info.num_rows, rng)
        else:
            actions = np.concatenate([_scripted_actions(sim, want) for sim in env.simulations])[:, None]
        env.send_actions(actions)
        infos = env.get_observations().infos
    env.close()
    return float(np.mean([info["episode_return"] for info in infos]))


def _to_goal(item: int, beside: set[tuple[int, int]], kinds: dict[str, set[tuple[int, int]]]) -> str:
    """Navigation: always the nearest goal (then keep moving into it: it pays whenever charged)."""
    return "goal"


def _mine_then_altar(ore: int, beside: set[tuple[int, int]], kinds: dict[str, set[tuple[int, int]]]) -> str:
    """Arena: mine up to 10 ore, then convert it; convert early when an altar is already beside the agent."""
    return "altar" if ore >= 10 or (ore and beside & kinds["altar"]) else "mine"


@pytest.mark.parametrize(("name", "want"), [("navigation", _to_goal), ("arena", _mine_then_altar)])
def test_a_policy_that_navigates_earns_many_times_what_random_moves_do(name: str, want: Want) -> None:
    config = TASKS[name]()
    random_mean = _mean_return(config, 8, None)
    scripted_mean = _mean_return(config, 2, want)
    assert 0.2 < random_mean < 4.0
    assert scripted_mean > 8 * random_mean
