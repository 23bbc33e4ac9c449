"""A small catalogue of MettaGrid tasks, sized so PPO learns them on a couple of CPU cores in minutes.

Every task keeps the action set to `noop` plus the four cardinal moves (no vibes, no attack): in
MettaGrid an agent "uses" an object by moving into it, so moves are all a task needs. Episodes end
by truncation at `max_steps` (a time limit, so the final observation's value is bootstrapped), maps
carry a one-cell wall border and the observation window is 11x11. Mines, altars and goals each hold an
inventory item, so each kind has a token feature of its own (the tag values of two kinds differ by only
0.1 after normalisation).

Both tasks are built so that a uniformly random policy earns a small fraction of what a trained one
does (the bench/mettagrid_learning.py criterion is 5x after 10 minutes on 2 cores):

* `arena`: agents mine ore (move into a mine: +1 ore, any number of times) and turn it into hearts at
  an altar (move into an altar while holding ore: -1 ore, +1 heart); each heart pays 1. Mines show one
  ore and altars one heart, which never change. Random moves make about 2 hearts per agent in 256 steps;
  shuttling between a mine and an altar makes dozens.
* `navigation`: agents search a dungeon (rooms joined by corridors) for a few goals. A goal holds up to
  `cooldown` charge and gains one per step; moving into a fully charged goal spends the charge for a
  heart (+1 reward), so a goal pays at most once every `cooldown` steps and stays where it is. Random
  moves find about 2 hearts per agent in 200 steps; reaching a goal early and using it whenever it is
  charged makes over 20.

Loading: `load_mettagrid_config` turns a task name (with its builder's keyword arguments) or a .yaml/.json
file into a validated MettaGridConfig. Files are read only when they are regular files, parsed with
`yaml.safe_load`/`json`, and the class names mettagrid writes into map builder and scene configs (`type`)
are looked up among modules already imported: mettagrid itself would import whatever module a file names.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from mettagrid.config.action_config import ActionsConfig, ChangeVibeActionConfig, MoveActionConfig, NoopActionConfig
from mettagrid.config.game_value import InventoryValue
from mettagrid.config.handler_config import (
    Handler,
    actorHas,
    query,
    queryDelta,
    targetHas,
    updateActor,
    updateTarget,
)
from mettagrid.config.mettagrid_config import (
    AgentConfig,
    GameConfig,
    GridObjectConfig,
    InventoryConfig,
    MettaGridConfig,
    ResourceLimitsConfig,
    WallConfig,
)
from mettagrid.config.obs_config import ObsConfig
from mettagrid.config.reward_config import reward
from mettagrid.config.tag import typeTag
from mettagrid.map_builder.map_builder import MapBuilderConfig
from mettagrid.map_builder.random_map import RandomMapBuilderConfig
from mettagrid.mapgen.mapgen import MapGenConfig
from mettagrid.mapgen.scene import ChildrenAction, SceneConfig
from mettagrid.mapgen.scenes.bsp import BSPConfig
from mettagrid.mapgen.scenes.make_connected import MakeConnectedConfig
from mettagrid.mapgen.scenes.random import RandomConfig
from pydantic import ValidationError

from mettle.errors import one_line
from mettle.files import FileTooLargeError, NotRegularFileError, read_limited

__all__ = [
    "CONFIG_SUFFIXES",
    "TASKS",
    "MettaGridEnvError",
    "arena",
    "config_from_data",
    "load_mettagrid_config",
    "navigation",
    "read_mapping_file",
    "resolve_config_classes",
]

OBS_SIZE = 11
"""Side of the egocentric observation window: large enough to see most of a task's map."""
NUM_TOKENS = 128
"""Observation tokens per agent; the default maps use well under this (no token is dropped)."""
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 16 * 2**20
"""Config and family files are refused unread above this size (a size on disk is data too)."""


class MettaGridEnvError(ValueError):
    """A MettaGrid task or config that cannot be used: unknown name, unreadable file, invalid content."""


def _moves_only() -> ActionsConfig:
    """Noop and the four moves: change_vibe alone would add ~150 actions no task needs."""
    return ActionsConfig(
        noop=NoopActionConfig(),
        move=MoveActionConfig(),
        change_vibe=ChangeVibeActionConfig(enabled=False),
    )


def _heart_collector() -> AgentConfig:
    """Agents paid 1 per heart they gain."""
    return AgentConfig(rewards={"heart": reward(InventoryValue(item="heart"))})


def _game(num_agents: int, max_steps: int, resources: list[str], **fields: object) -> GameConfig:
    """Settings shared by every task: small observations, truncating time limit, moves only."""
    if num_agents < 1 or max_steps < 1:
        raise ValueError(f"need num_agents >= 1 and max_steps >= 1, got {num_agents}, {max_steps}")
    return GameConfig(
        num_agents=num_agents,
        max_steps=max_steps,
        episode_truncates=True,
        resource_names=resources,
        protocol_details_obs=False,
        obs=ObsConfig(width=OBS_SIZE, height=OBS_SIZE, num_tokens=NUM_TOKENS),
        actions=_moves_only(),
        agent=_heart_collector(),
        **fields,
    )


def _check_room(width: int, height: int, things: int) -> None:
    """Fail early, with the numbers, when the map's interior cannot hold every agent and object."""
    if width < 3 or height < 3:
        raise ValueError(f"width and height must be >= 3 (one-cell border), got {width}x{height}")
    inside = (width - 2) * (height - 2)
    if things > inside:
        raise ValueError(f"{things} agents and objects do not fit the {inside} free cells of a {width}x{height} map")


def arena(
    num_agents: int = 12,
    width: int = 14,
    height: int = 14,
    mines: int = 6,
    altars: int = 3,
    max_steps: int = 256,
) -> MettaGridConfig:
    """Agents turn ore from mines into hearts at altars; one reward per heart."""
    _check_room(width, height, num_agents + mines + altars)
    if mines < 1 or altars < 1:
        raise ValueError(f"need at least one mine and one altar, got {mines} mines and {altars} altars")
    objects = {"wall": WallConfig(), "mine": _mine(), "altar": _altar()}
    map_builder = RandomMapBuilderConfig(
        width=width, height=height, border_width=1, agents=num_agents, objects={"mine": mines, "altar": altars}
    )
    game = _game(num_agents, max_steps, ["ore", "heart"], objects=objects, map_builder=map_builder)
    return MettaGridConfig(label="arena", game=game)


def _mine() -> GridObjectConfig:
    """Gives one ore per use, without limit; it shows one ore so that tokens tell it from an altar."""
    return GridObjectConfig(
        name="mine",
        inventory=InventoryConfig(initial={"ore": 1}),
        on_use_handler=Handler(mutations=[updateActor({"ore": 1})]),
    )


def _altar() -> GridObjectConfig:
    """Turns one of the user's ore into a heart per use; it shows one heart so that tokens tell it from a mine."""
    return GridObjectConfig(
        name="altar",
        inventory=InventoryConfig(initial={"heart": 1}),
        on_use_handler=Handler(filters=[actorHas({"ore": 1})], mutations=[updateActor({"ore": -1, "heart": 1})]),
    )


def navigation(
    num_agents: int = 4,
    width: int = 20,
    height: int = 20,
    rooms: int = 8,
    goals: int = 4,
    cooldown: int = 5,
    max_steps: int = 200,
) -> MettaGridConfig:
    """Agents find goals in a dungeon of rooms and corridors; a goal pays a heart, then recharges `cooldown` steps."""
    _check_room(width, height, num_agents + goals)
    if goals < 1 or rooms < 1 or cooldown < 1:
        raise ValueError(f"need goals >= 1, rooms >= 1 and cooldown >= 1, got {goals}, {rooms}, {cooldown}")
    objects = {"wall": WallConfig(), "goal": _recharging_goal(cooldown)}
    game = _game(
        num_agents,
        max_steps,
        ["heart", "charge"],
        objects=objects,
        map_builder=_dungeon(width, height, rooms, num_agents, {"goal": goals}),
        on_tick=Handler(mutations=[queryDelta(query(typeTag("goal")), {"charge": 1})]),
    )
    return MettaGridConfig(label="navigation", game=game)


def _recharging_goal(cooldown: int) -> GridObjectConfig:
    """A goal holding up to `cooldown` charge (one more each step); using it full spends it all for a heart."""
    limit = ResourceLimitsConfig(base=cooldown, max=cooldown, resources=["charge"])
    return GridObjectConfig(
        name="goal",
        inventory=InventoryConfig(initial={"charge": cooldown}, limits={"charge": limit}),
        on_use_handler=Handler(
            filters=[targetHas({"charge": cooldown})],
            mutations=[updateTarget({"charge": -cooldown}), updateActor({"heart": 1})],
        ),
    )


def _dungeon(width: int, height: int, rooms: int, agents: int, objects: dict[str, int]) -> MapGenConfig:
    """BSP rooms joined by corridors inside a one-cell wall border, agents and objects on random free cells."""
    # mettagrid's Maze scene does not survive a model_dump round trip in 0.26 (its sizes serialise as {}), so
    # the walls come from BSP rooms and corridors, made fully connected before agents and objects are placed.
    dungeon = BSPConfig(
        rooms=rooms,
        min_room_size=2,
        min_room_size_ratio=0.5,
        max_room_size_ratio=0.9,
        children=[
            ChildrenAction(where="full", scene=MakeConnectedConfig()),
            ChildrenAction(where="full", scene=RandomConfig(agents=agents, objects=objects)),
        ],
    )
    return MapGenConfig(width=width - 2, height=height - 2, border_width=1, instance=dungeon)


TASKS: dict[str, Callable[..., MettaGridConfig]] = {"arena": arena, "navigation": navigation}
"""Task name -> config builder; keyword arguments of the builder customise the task."""


# ---------------------------------------------------------------------------------- loading
def load_mettagrid_config(name_or_path: str, **task_kwargs: Any) -> MettaGridConfig:
    """Build a catalogue task, or read and validate a config file; every failure is one MettaGridEnvError line."""
    if name_or_path in TASKS:
        try:
            return TASKS[name_or_path](**task_kwargs)
        except (TypeError, ValueError) as error:
            raise MettaGridEnvError(f"MettaGrid task {name_or_path!r}: {one_line(error)}") from None
    if not name_or_path.endswith(CONFIG_SUFFIXES):
        raise MettaGridEnvError(
            f"unknown MettaGrid task {name_or_path!r}; known tasks: {', '.join(sorted(TASKS))} "
            f"(or a path to a {'/'.join(CONFIG_SUFFIXES)} file holding a MettaGridConfig)"
        )
    if task_kwargs:
        raise MettaGridEnvError(
            f"MettaGrid config {name_or_path}: task arguments {sorted(task_kwargs)} apply to catalogue tasks only"
        )
    path = Path(name_or_path)
    return config_from_data(read_mapping_file(path, "MettaGrid config"), f"MettaGrid config {path}")


def read_mapping_file(path: Path, what: str) -> dict[str, Any]:
    """A regular YAML/JSON file's top-level mapping; `what` names the file's role in the one-line errors."""
    try:  # a FIFO or device would block the read, or never end; a link to a config file is fine
        text = read_limited(path, MAX_FILE_BYTES, follow_symlinks=True)
    except NotRegularFileError:
        raise MettaGridEnvError(f"{what} {path}: not a regular file") from None
    except FileTooLargeError as error:
        raise MettaGridEnvError(f"{what} {path}: {one_line(error)}") from None
    except OSError as error:
        raise MettaGridEnvError(f"{what} {path}: cannot read it ({error.strerror or error})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise MettaGridEnvError(f"{what} {path}: not valid {path.suffix[1:].upper()}: {one_line(error)}") from None
    if not isinstance(data, dict):
        raise MettaGridEnvError(f"{what} {path}: expected a mapping of fields, got {type(data).__name__}")
    return data


def config_from_data(data: dict[str, Any], where: str) -> MettaGridConfig:
    """Validate plain data as a MettaGridConfig; `where` (e.g. "MettaGrid config <path>") starts each error."""
    data = resolve_config_classes(data, where)
    try:
        return MettaGridConfig.model_validate(data)
    except ValidationError as error:
        raise MettaGridEnvError(f"{where}: invalid MettaGridConfig: {_validation_summary(error)}") from None
    except (TypeError, ValueError, KeyError, AssertionError) as error:  # raised by mettagrid's own validators
        raise MettaGridEnvError(f"{where}: invalid MettaGridConfig: {one_line(error)}") from None


def resolve_config_classes(data: Any, where: str) -> Any:
    """A copy of `data` whose dotted `type` names are the loaded mettagrid classes they name (mettagrid would
    import any module a `type` names); `where` starts the one-line error for a name that is not one."""
    return _resolve_classes(data, where, "")


def _resolve_classes(data: Any, where: str, at: str) -> Any:
    """`resolve_config_classes` below the dotted path `at`."""
    if isinstance(data, list):
        return [_resolve_classes(item, where, f"{at}.{i}") for i, item in enumerate(data)]
    if not isinstance(data, dict):
        return data
    out = {key: _resolve_classes(value, where, f"{at}.{key}") for key, value in data.items()}
    name = out.get("type")
    if isinstance(name, str) and "." in name:
        out["type"] = _loaded_config_class(name)
        if out["type"] is None:
            raise MettaGridEnvError(
                f"{where}: {at[1:] + '.' if at else ''}type {name!r} is not a map builder or scene config class "
                "of a mettagrid module already loaded; name one of those (mettle imports no module a file names)"
            )
    return out


def _loaded_class(name: str) -> type | None:
    """The class a dotted name reaches from a module already imported, without importing anything."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        value: Any = sys.modules.get(".".join(parts[:cut]))
        for attribute in parts[cut:]:
            value = getattr(value, attribute, None) if value is not None else None
        if isinstance(value, type):
            return value
    return None


def _loaded_config_class(name: str) -> type | None:
    """The mettagrid map builder or scene config class `name` names, if its module is loaded (else None)."""
    found = _loaded_class(name) if name.startswith("mettagrid.") else None
    return found if found is not None and issubclass(found, (MapBuilderConfig, SceneConfig)) else None


def _validation_summary(error: ValidationError) -> str:
    """The first problem with its field path, and how many more there are."""
    problems = error.errors()
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"]) or "<root>"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where}: {first['msg']}{more}"
