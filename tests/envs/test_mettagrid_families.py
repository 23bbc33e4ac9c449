"""MettaGrid task families: ids reproduce variants, bad families are refused in one line, envs play assigned tasks."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mettagrid.config.mettagrid_config import MettaGridConfig

from mettle.contracts import EnvStateError
from mettle.envs.mettagrid import MettaGridEnvError, MettaGridEnvironment, make_mettagrid_environment
from mettle.envs.mettagrid_families import (
    BASE_TASK,
    FAMILIES,
    SUITES,
    Choices,
    Parameter,
    Range,
    TaskFamily,
    family_from_data,
    family_named,
    is_family_file,
    load_family,
    load_suite,
    read_path,
    set_path,
)
from mettle.envs.mettagrid_tasks import arena, navigation
from mettle.rl.training.environment import random_actions

SMALL = {"num_agents": 2, "width": 8, "height": 8, "mines": 2, "altars": 1, "max_steps": 20}
"""A tiny arena: fast to build and to play."""


def small_family(max_steps: Range | Choices | None = None) -> TaskFamily:
    """A family over the tiny arena: map size, mines, episode length and heart reward."""
    return TaskFamily("tiny", arena(**SMALL), [
        Parameter("map_size", Choices((7, 8, 9)), ("game.map_builder.width", "game.map_builder.height")),
        Parameter("game.map_builder.objects.mine", Range(1, 3)),
        Parameter("max_steps", max_steps or Range(10, 30), ("game.max_steps",)),
        Parameter("heart_reward", Range(0.5, 1.5), ("game.agent.rewards.heart.reward.weights.0",)),
    ])


def dump(config: MettaGridConfig) -> dict[str, Any]:
    """A config as plain data, to compare two."""
    return config.model_dump(mode="json")


# ---------------------------------------------------------------------------------- tasks
def test_a_task_id_reproduces_its_config() -> None:
    family, again = small_family(), small_family()
    assert dump(family.task(3)) == dump(family.task(3)) == dump(again.task(3))
    assert family.values(3) == again.values(3)
    config, values = family.task(3), family.values(3)
    assert read_path(config, "game.map_builder.width") == read_path(config, "game.map_builder.height")
    assert read_path(config, "game.map_builder.width") == values["map_size"]
    assert config.game.max_steps == values["max_steps"] and isinstance(values["max_steps"], int)
    assert read_path(config, "game.agent.rewards.heart.reward.weights") == [values["heart_reward"]]
    config.game.max_steps = 999  # a caller's change does not reach the family
    assert family.task(3).game.max_steps == values["max_steps"]
    assert dump(family.task(BASE_TASK)) == dump(arena(**SMALL)) == dump(family.base)


def test_distinct_ids_give_distinct_configs() -> None:
    family = small_family()
    configs = {json.dumps(dump(family.task(t)), sort_keys=True) for t in range(20)}
    assert len(configs) == 20  # a float parameter makes every draw differ
    sizes = {family.values(t)["map_size"] for t in range(20)}
    assert sizes == {7, 8, 9}
    assert all(1 <= family.values(t)["game.map_builder.objects.mine"] <= 3 for t in range(20))


def test_buckets_label_choices_and_quarters_of_ranges() -> None:
    assert Range(10, 25).labels() == ["10-13", "14-17", "18-21", "22-25"]
    assert [Range(10, 25).label(v) for v in (10, 13, 14, 25)] == ["10-13", "10-13", "14-17", "22-25"]
    assert Range(1, 3).labels() == ["1", "2", "3"]
    assert Range(0.0, 1.0).labels() == ["0-0.25", "0.25-0.5", "0.5-0.75", "0.75-1"]
    assert Range(0.0, 1.0).label(1.0) == "0.75-1" and Range(0.0, 1.0).label(2.0) == "2.0"
    assert Choices((0.5, 1, "x")).labels() == ["0.5", "1", "x"]
    family = small_family()
    labels = family.bucket_labels()
    assert list(labels) == ["map_size", "game.map_builder.objects.mine", "max_steps", "heart_reward"]
    assert labels["map_size"] == ["7", "8", "9"] and labels["max_steps"] == ["10-15", "16-20", "21-25", "26-30"]
    for task in range(10):
        assert all(label in labels[name] for name, label in family.buckets(task).items())
    assert family.buckets(BASE_TASK)["map_size"] == "8"


def test_bad_task_ids_are_refused() -> None:
    family = small_family()
    for bad in (-2, 1.5, True, "3"):
        with pytest.raises(MettaGridEnvError, match="task id"):
            family.task(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("parameter", "path", "problem"),
    [
        (Parameter("game.max_stepz", Range(10, 20)), "game.max_stepz", "has no field 'max_stepz'"),
        (Parameter("game.map_builder.objects.mien", Range(1, 2)), "objects.mien", "has no key 'mien'"),
        (Parameter("game.agent.rewards.heart.reward.weights.3", Range(1.0, 2.0)), "weights.3", "a list of 1"),
        (Parameter("game.max_steps", Range(30, 10)), "game.max_steps", "minimum 30 is above its maximum 10"),
        (Parameter("game.max_steps", Choices(())), "game.max_steps", "choices are empty"),
        (Parameter("game.num_agents", Choices((2, 3))), "game.num_agents", "agents are rows"),
        (Parameter("game.map_builder.agents", Choices((2, 3))), "game.map_builder.agents", "agents are rows"),
        (Parameter("game.obs.num_tokens", Choices((64, 128))), "game.obs.num_tokens", "observation shape"),
        (Parameter("game.map_builder.objects.mine", Choices((2, 60))), "objects.mine", "room for only"),
        (Parameter("game.max_steps", Range(10.0, 20.5)), "game.max_steps", "holds integers"),
        (Parameter("game.map_builder.objects.mine", Range(1.0, 3.0)), "objects.mine", "not an integer"),
        (Parameter("game.max_steps", Choices(("long",))), "game.max_steps", "not valid there"),
    ],
)
def test_bad_parameters_are_refused_in_one_line_naming_the_path(parameter: Parameter, path: str,
                                                                 problem: str) -> None:
    with pytest.raises(MettaGridEnvError) as caught:
        TaskFamily("bad", arena(**SMALL), [parameter])
    message = str(caught.value)
    assert path in message and problem in message and "'bad'" in message and "\n" not in message


def test_override_alone_would_accept_a_misspelt_key() -> None:
    config = arena(**SMALL)
    config.override("game.map_builder.objects.mien", 3)  # mettagrid adds the key: why families resolve paths
    assert read_path(config, "game.map_builder.objects")["mien"] == 3


def test_combinations_that_do_not_fit_the_map_are_refused() -> None:
    fits_alone = [Parameter("size", Choices((5, 8)), ("game.map_builder.width", "game.map_builder.height")),
                  Parameter("game.map_builder.objects.mine", Choices((2, 12)))]
    with pytest.raises(MettaGridEnvError, match=r"with size=5, game.map_builder.objects.mine=12: .*room for only"):
        TaskFamily("crowded", arena(**SMALL), fits_alone)


def test_duplicate_paths_and_names_are_refused() -> None:
    with pytest.raises(MettaGridEnvError, match="already set by parameter 'a'"):
        TaskFamily("dup", arena(**SMALL), [Parameter("a", Range(10, 20), ("game.max_steps",)),
                                           Parameter("b", Range(10, 20), ("game.max_steps",))])
    with pytest.raises(MettaGridEnvError, match="name is used twice"):
        TaskFamily("dup", arena(**SMALL), [Parameter("a", Range(10, 20), ("game.max_steps",)),
                                           Parameter("a", Range(1, 2), ("game.map_builder.objects.mine",))])


# ---------------------------------------------------------------------------------- files
def family_data(base: Any = None) -> dict[str, Any]:
    """A family file's content over the tiny arena."""
    return {
        "name": "my-fam",
        "base": base if base is not None else {"task": "arena", "args": SMALL},
        "parameters": {
            "game.max_steps": {"range": [10, 30]},
            "game.map_builder.objects.mine": {"choices": [1, 2, 3]},
            "size": {"paths": ["game.map_builder.width", "game.map_builder.height"], "choices": [7, 9]},
        },
    }


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_family_files_load_and_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"fam{suffix}"
    data = family_data()
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    family = load_family(str(path))
    assert family.name == "my-fam" and is_family_file(path) and family_named(str(path)) is not None
    assert family.values(4)["size"] in (7, 9)
    copy = family_from_data(json.loads(json.dumps(family.to_dict())), "round trip")
    assert copy.digest == family.digest and dump(copy.task(4)) == dump(family.task(4))
    env = make_mettagrid_environment(str(path), num_envs=1, seed=0)
    assert env.task_family is not None and env.task_family.digest == family.digest
    env.close()


def test_a_family_base_may_be_a_config_file_beside_it(tmp_path: Path) -> None:
    (tmp_path / "game.yaml").write_text(yaml.safe_dump(dump(arena(**SMALL))))
    (tmp_path / "fam.yaml").write_text(yaml.safe_dump(family_data(base="game.yaml")))
    assert load_family(str(tmp_path / "fam.yaml")).num_agents == 2
    assert not is_family_file(tmp_path / "game.yaml") and family_named(str(tmp_path / "game.yaml")) is None
    env = make_mettagrid_environment(str(tmp_path / "game.yaml"), num_envs=1, seed=0)
    assert env.task_family is None
    env.close()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"extra": 1}, "unknown key 'extra'"),
        ({"parameters": {}}, "parameters must be a non-empty mapping"),
        ({"parameters": {"game.max_steps": {"range": [1, 2], "choices": [1]}}}, "exactly one of"),
        ({"parameters": {"game.max_steps": {"range": [1]}}}, "range must be [low, high]"),
        ({"parameters": {"game.max_steps": {"range": ["a", 3]}}}, "not a finite number"),
        ({"parameters": {"x": {"paths": [], "choices": [1]}}}, "paths must be a non-empty list"),
        ({"base": "arenaa"}, "unknown task 'arenaa'"),
        ({"base": {"task": "arena", "args": {"mienz": 1}}}, "unexpected keyword"),
        ({"base": "missing.yaml"}, "cannot read"),
    ],
)
def test_bad_family_files_fail_in_one_line(tmp_path: Path, change: dict[str, Any], problem: str) -> None:
    path = tmp_path / "fam.yaml"
    path.write_text(yaml.safe_dump({**family_data(), **change}))
    with pytest.raises(MettaGridEnvError) as caught:
        load_family(str(path))
    assert problem in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_class_names_in_files_import_nothing(tmp_path: Path) -> None:
    data = dump(arena(**SMALL))
    for name in ("mettle_no_such_module.Builder.Config", "os.system", "json.JSONDecoder"):
        data["game"]["map_builder"]["type"] = name
        path = tmp_path / "game.json"
        path.write_text(json.dumps(data))
        with pytest.raises(MettaGridEnvError, match="not a map builder or scene config class") as caught:
            make_mettagrid_environment(str(path))
        assert "game.map_builder.type" in str(caught.value)
    assert "mettle_no_such_module" not in sys.modules


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(MettaGridEnvError, match="known families: arena-family, navigation-family"):
        load_family("arena-famly")
    with pytest.raises(MettaGridEnvError, match="known task families: arena-family, navigation-family"):
        make_mettagrid_environment("arena-famly")
    with pytest.raises(MettaGridEnvError, match="known suites: arena-heldout, navigation-heldout"):
        load_suite("arena-held")
    with pytest.raises(MettaGridEnvError, match="apply to catalogue tasks only"):
        make_mettagrid_environment("arena-family", width=9)


# ---------------------------------------------------------------------------------- shipped
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_shipped_families_build_and_step(name: str) -> None:
    env = make_mettagrid_environment(name, num_envs=2, seed=0)
    family = env.task_family
    assert family is not None and family is family_named(name)
    env.assign_tasks({0: 1, 1: 2})
    env.reset(0)
    assert env.current_tasks == (1, 2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        env.send_actions(random_actions(env.policy_env_info, env.batch_info.num_rows, rng))
    env.close()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_shipped_families_vary_around_the_catalogue_task(name: str) -> None:
    family = load_family(name)
    builders: dict[str, Callable[[], MettaGridConfig]] = {"arena-family": arena, "navigation-family": navigation}
    default = builders[name]()
    sizes = [family.values(t)["map_size"] for t in range(100)]
    steps = [family.values(t)["max_steps"] for t in range(100)]
    size = read_path(default, "game.map_builder.width")
    assert min(sizes) < size < max(sizes) and min(steps) < default.game.max_steps < max(steps)
    for task in range(0, 100, 7):  # every drawn variant plays: its game builds for several map seeds
        config = family.task(task)
        for seed in range(3):
            set_path(config, "game.map_builder.seed", seed)
            grid = config.game.map_builder.create().build().grid
            assert sum(str(cell).startswith("agent") for cell in np.ravel(grid)) == family.num_agents


@pytest.mark.parametrize("name", sorted(SUITES))
def test_heldout_suites_are_harder_and_never_drawn(name: str) -> None:
    suite = load_suite(name)
    spec = SUITES[name]
    family = load_family(spec["family"])
    assert suite.name == name and suite.family == spec["family"] and len(suite.variants) >= 3
    default = family.values(BASE_TASK)
    for (variant, config), overrides in zip(suite.variants, spec["variants"].values(), strict=True):
        assert not family.can_draw(overrides), variant
        fewer = [key for key in ("mines", "altars", "goals") if key in overrides and overrides[key] < default[key]]
        assert overrides["map_size"] > default["map_size"] or (overrides["map_size"] == default["map_size"] and fewer)
        assert read_path(config, "game.map_builder.width") == overrides["map_size"]
        assert config.game.num_agents == family.num_agents
    drawn = family.values(0)
    assert family.can_draw(drawn)


def test_suite_files_name_a_family_or_a_base(tmp_path: Path) -> None:
    (tmp_path / "fam.yaml").write_text(yaml.safe_dump(family_data()))
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "family": "fam.yaml",
                                    "variants": {"big": {"size": 10, "game.max_steps": 40}}}))
    suite = load_suite(str(path))
    assert suite.family == "fam.yaml" and [v for v, _ in suite.variants] == ["big"]
    assert read_path(suite.variants[0][1], "game.map_builder.height") == 10
    assert suite.variants[0][1].game.max_steps == 40
    path.write_text(yaml.safe_dump({"base": {"task": "arena", "args": SMALL},
                                    "variants": {"long": {"game.max_steps": 50}}}))
    suite = load_suite(str(path))
    assert suite.name == "suite" and suite.family is None and suite.variants[0][1].game.max_steps == 50
    path.write_text(yaml.safe_dump({"base": "arena", "variants": {"bad": {"game.map_builder.agents": 3}}}))
    with pytest.raises(MettaGridEnvError, match=r"'bad'.*agents are rows"):
        load_suite(str(path))


# ---------------------------------------------------------------------------------- the environment
def test_assigned_tasks_start_at_the_next_episode() -> None:
    family = small_family(max_steps=Choices((6,)))
    task = next(t for t in range(100) if family.values(t)["map_size"] == 9)
    env = MettaGridEnvironment(family=family, num_envs=2, seed=0)
    assert env.config.game.max_steps == 20 and env.current_tasks == (BASE_TASK, BASE_TASK)
    env.assign_tasks({0: task})
    noop = np.zeros((4, 1), dtype=np.int64)
    infos = []
    for _ in range(25):  # the base's 20-step episode, then the task's 6-step ones
        sims = env.simulations
        assert sims[0] is not None and sims[1] is not None
        assert sims[1].map_width == 8
        infos.extend(env.get_observations().infos)
        env.send_actions(noop)
    assert env.current_tasks == (task, BASE_TASK)
    assert env.simulations[0] is not None and env.simulations[0].map_width == 9
    by_env = {(i["env_id"], i["task_id"], i["episode_length"]) for i in infos}
    assert by_env == {(0, BASE_TASK, 20), (1, BASE_TASK, 20)}
    for _ in range(8):
        infos.extend(env.get_observations().infos)
        env.send_actions(noop)
    assert (0, task, 6) in {(i["env_id"], i["task_id"], i["episode_length"]) for i in infos}
    env.assign_tasks({1: task})
    env.reset(1)  # a reset starts the assigned task at once
    assert env.current_tasks == (task, task)
    env.close()


def test_assign_tasks_checks_its_input() -> None:
    plain = MettaGridEnvironment(arena(**SMALL), num_envs=1, seed=0)
    with pytest.raises(NotImplementedError, match="no task family"):
        plain.assign_tasks({0: 1})
    plain.send_actions(np.zeros((2, 1), dtype=np.int64))
    assert "task" not in (plain._log.starts[0] or {})  # without a family the log is as before
    plain.close()
    env = MettaGridEnvironment(family=small_family(), num_envs=2, seed=0)
    with pytest.raises(MettaGridEnvError, match="env instance 2"):
        env.assign_tasks({2: 1})
    with pytest.raises(MettaGridEnvError, match="task id -5"):
        env.assign_tasks({0: -5})
    with pytest.raises(MettaGridEnvError, match="not both"):
        MettaGridEnvironment(arena(**SMALL), family=small_family())
    env.close()


def test_a_heart_reward_parameter_scales_the_rewards() -> None:
    family = TaskFamily("paid", arena(num_agents=2, width=6, height=6, mines=4, altars=4, max_steps=80),
                        [Parameter("pay", Choices((3.0,)), ("game.agent.rewards.heart.reward.weights.0",))])
    env = MettaGridEnvironment(family=family, num_envs=2, seed=0)
    env.assign_tasks({0: 0, 1: 0})
    env.reset(0)
    rng = np.random.default_rng(0)
    infos: list[dict[str, Any]] = []
    for _ in range(81):
        infos.extend(env.get_observations().infos)
        env.send_actions(random_actions(env.policy_env_info, 4, rng))
    infos.extend(env.get_observations().infos)
    assert len(infos) == 4 and sum(i.get("agent/heart.gained", 0.0) for i in infos) > 0
    for info in infos:
        assert info["episode_return"] == pytest.approx(3.0 * info.get("agent/heart.gained", 0.0))
    env.close()


def run_steps(env: MettaGridEnvironment, steps: int, seed: int, assign: dict[int, dict[int, int]]) -> list[Any]:
    """Step with seeded random actions, assigning tasks at the given steps; what each step delivered."""
    rng = np.random.default_rng(seed)
    seen = []
    for step in range(steps):
        batch = env.get_observations()
        seen.append((batch.observations.copy(), batch.rewards.copy(), batch.mask.copy(),
                     sorted((i["env_id"], i["agent_id"], i["task_id"]) for i in batch.infos)))
        if step in assign:
            env.assign_tasks(assign[step])
        env.send_actions(random_actions(env.policy_env_info, env.batch_info.num_rows, rng))
    return seen


def test_state_round_trip_with_pending_tasks_continues_exactly() -> None:
    family = small_family(max_steps=Range(8, 12))
    unbroken = MettaGridEnvironment(family=family, num_envs=3, seed=5, desync_episodes=True)
    run_steps(unbroken, 30, seed=1, assign={3: {0: 11, 1: 12}, 17: {2: 13}, 29: {0: 14, 1: BASE_TASK}})
    assert unbroken._pending  # some assignments wait for their game's next episode
    state = unbroken.state_dict()
    assert state is not None
    resumed = MettaGridEnvironment(family=small_family(max_steps=Range(8, 12)), num_envs=3, seed=0,
                                   desync_episodes=True)
    resumed.load_state_dict(state)
    assert resumed.current_tasks == unbroken.current_tasks and resumed._pending == unbroken._pending
    later = {5: {2: 15}, 20: {0: BASE_TASK, 1: 16}}
    expected, got = run_steps(unbroken, 40, 2, later), run_steps(resumed, 40, 2, later)
    for (obs, rewards, mask, infos), (obs2, rewards2, mask2, infos2) in zip(expected, got, strict=True):
        np.testing.assert_array_equal(obs, obs2)
        np.testing.assert_array_equal(rewards, rewards2)
        np.testing.assert_array_equal(mask, mask2)
        assert infos == infos2
    tasks = {task for *_, infos in expected for (_, _, task) in infos}
    assert {14, 15, 16} <= tasks
    unbroken.close()
    resumed.close()


def test_state_of_another_family_is_refused() -> None:
    env = MettaGridEnvironment(family=small_family(), num_envs=1, seed=0)
    env.send_actions(np.zeros((2, 1), dtype=np.int64))
    state = env.state_dict()
    other = MettaGridEnvironment(family=small_family(max_steps=Range(10, 31)), num_envs=1, seed=0)
    with pytest.raises(EnvStateError, match="task family tiny@"):
        other.load_state_dict(state)  # type: ignore[arg-type]
    plain = MettaGridEnvironment(arena(**SMALL), num_envs=1, seed=0)
    with pytest.raises(EnvStateError, match="this environment none"):
        plain.load_state_dict(state)  # type: ignore[arg-type]
    for each in (env, other, plain):
        each.close()
