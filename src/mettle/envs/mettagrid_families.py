"""MettaGrid task families: a base game plus parameters, so that one integer (a task id) names one variant.

A task is a MettaGridConfig. A family is a name, a base config and an ordered list of parameters; each one
sets one or more dotted config paths (`game.max_steps`, `game.map_builder.objects.mine`, list items by
index: `game.agent.rewards.heart.reward.weights.0`) to a value drawn from `Choices` or a `Range` (integers,
both ends included, when both ends are ints; else a uniform float). `task(id)` draws every parameter in
order from `np.random.default_rng(id)`, so an id reproduces its variant (for a given numpy); id -1
(`BASE_TASK`) is the base itself.

Agents are rows: every variant keeps the base's number of agents and its observation and action interface
(token shape, features, actions, tags), so one policy and one row layout serve every task. A family checks
that when it is built: each choice, each range end (and a range's midpoint) is applied to the base one
parameter at a time, compared with the base and built into a game, and the maps of every combination of the
map parameters' checked values are built once (when there are at most MAX_CHECKED_MAPS), so a variant whose
agents or objects do not fit its map is refused here rather than in the middle of a run.

Paths are resolved here rather than by `MettaGridConfig.override` alone, which adds a misspelt dict key
silently (`objects.mien`) and cannot index lists; a config field is still assigned by mettagrid's own
`override`, which validates the value.

Families come from the catalogue (`FAMILIES`, which doubles as an example of the file format) or from a
YAML/JSON file:

    name: my-arena
    base: arena          # a catalogue task, {task: arena, args: {...}}, a MettaGridConfig file (relative to
                         # this file) or an inline MettaGridConfig mapping
    parameters:          # in drawing order
      game.max_steps: {range: [128, 512]}
      map_size: {paths: [game.map_builder.width, game.map_builder.height], choices: [12, 16]}

Held-out suites (`SUITES`, `load_suite`) are fixed, named variants to evaluate on, in the same spirit:
`{name, family: <family name or path> (or base: <as above>), variants: {name: {path or parameter: value}}}`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mettagrid.base_config import Config
from mettagrid.config.mettagrid_config import MettaGridConfig
from mettagrid.policy.policy_env_interface import PolicyEnvInterface
from mettagrid.simulator import Simulation
from pydantic import BaseModel, ValidationError

from mettle.envs.mettagrid_tasks import (
    CONFIG_SUFFIXES,
    TASKS,
    MettaGridEnvError,
    config_from_data,
    load_mettagrid_config,
    read_mapping_file,
    resolve_config_classes,
)
from mettle.errors import one_line

__all__ = [
    "BASE_TASK",
    "FAMILIES",
    "SUITES",
    "Choices",
    "Parameter",
    "Range",
    "Suite",
    "TaskFamily",
    "family_named",
    "is_family_file",
    "load_config_or_family",
    "load_family",
    "load_suite",
]

BASE_TASK = -1
"""The task id of a family's base config (what an env instance plays before it is assigned a task)."""
MAX_CHECKED_MAPS = 64
"""At most this many combinations of the map parameters' values are built at construction; beyond, each alone."""
BUCKETS = 4
"""Equal-width buckets that label a range's values (for per-bucket metrics)."""
CACHED_TASKS = 16
"""Recently built task configs kept per family (an env instance often replays its task)."""
AGENT_PARTS = frozenset({"agents", "num_agents"})
"""Path parts that change how many agents a game has."""
AGENTS_ARE_ROWS = "agents are rows: every task of a family must have the same number of agents"
MAP_ROOT = "game.map_builder"

Value = Any
"""A parameter value: plain JSON data (number, string, boolean, list, mapping)."""


# ---------------------------------------------------------------------------------- domains
@dataclass(frozen=True)
class Choices:
    """A parameter drawn uniformly from a list of values."""

    values: tuple[Value, ...]

    def __post_init__(self) -> None:
        """Keep the values as a tuple, whatever sequence was given."""
        object.__setattr__(self, "values", tuple(self.values))

    def problem(self) -> str | None:
        """Why these choices cannot be drawn from, with the fix; None when they can."""
        if not self.values:
            return "its choices are empty; list at least one value"
        for value in self.values:
            if not _is_plain(value):
                return f"choice {value!r} is not plain data; use numbers, strings, booleans, lists or mappings"
        return None

    def draw(self, rng: np.random.Generator) -> Value:
        """One value, uniformly (a fresh copy, so configs never share a list with the family)."""
        return copy.deepcopy(self.values[int(rng.integers(len(self.values)))])

    def checked_values(self) -> list[Value]:
        """Every choice: all are checked against the base at construction."""
        return list(self.values)

    def contains(self, value: Value) -> bool:
        """Whether a draw can give `value`."""
        return any(_same(value, choice) for choice in self.values)

    def label(self, value: Value) -> str:
        """The value itself, short."""
        return value if isinstance(value, str) else json.dumps(value)

    def labels(self) -> list[str]:
        """One label per distinct choice, in order."""
        return list(dict.fromkeys(self.label(value) for value in self.values))

    def to_dict(self) -> dict[str, Any]:
        """As written in a family file."""
        return {"choices": list(self.values)}


@dataclass(frozen=True)
class Range:
    """A parameter drawn uniformly from [low, high]: integers (both ends included) when both ends are ints."""

    low: float
    high: float

    @property
    def integer(self) -> bool:
        """Whether draws are integers."""
        return _is_int(self.low) and _is_int(self.high)

    def problem(self) -> str | None:
        """Why this range cannot be drawn from, with the fix; None when it can."""
        for end in (self.low, self.high):
            if not _is_number(end) or not math.isfinite(end):
                return f"range end {end!r} is not a finite number; give [low, high] as numbers"
        if self.low > self.high:
            return f"range minimum {self.low} is above its maximum {self.high}; swap them"
        return None

    def draw(self, rng: np.random.Generator) -> int | float:
        """One value, uniformly."""
        if self.integer:
            return int(rng.integers(int(self.low), int(self.high), endpoint=True))
        return float(rng.uniform(self.low, self.high))

    def checked_values(self) -> list[int | float]:
        """Both ends and the middle."""
        if self.integer:
            low, high = int(self.low), int(self.high)
            return list(dict.fromkeys([low, (low + high) // 2, high]))
        return list(dict.fromkeys([float(self.low), (self.low + self.high) / 2, float(self.high)]))

    def contains(self, value: Value) -> bool:
        """Whether a draw can give `value`."""
        if not _is_number(value) or not self.low <= value <= self.high:
            return False
        return _is_int(value) if self.integer else True

    def label(self, value: Value) -> str:
        """The bucket holding `value` ("10-13"); a value outside the range is its own label."""
        index = self._bucket(value)
        return self._bucket_label(index) if index is not None else json.dumps(value)

    def labels(self) -> list[str]:
        """Every non-empty bucket's label, low to high."""
        return [self._bucket_label(i) for i in range(BUCKETS) if self._bucket_bounds(i) is not None]

    def to_dict(self) -> dict[str, Any]:
        """As written in a family file."""
        return {"range": [self.low, self.high]}

    def _bucket(self, value: Value) -> int | None:
        """Which of the equal-width buckets holds `value` (None outside the range)."""
        if not self.contains(value):
            return None
        if self.integer:  # bucket k holds the k-th quarter of the (high - low + 1) integers
            return (int(value) - int(self.low)) * BUCKETS // (int(self.high) - int(self.low) + 1)
        if self.high == self.low:
            return 0
        return min(int((value - self.low) / (self.high - self.low) * BUCKETS), BUCKETS - 1)

    def _bucket_bounds(self, index: int) -> tuple[float, float] | None:
        """The smallest and largest value of bucket `index` (None if no integer falls in it)."""
        if not self.integer:
            width = (self.high - self.low) / BUCKETS
            return self.low + index * width, self.low + (index + 1) * width
        count, low = int(self.high) - int(self.low) + 1, int(self.low)
        first, last = -(-index * count // BUCKETS), -(-(index + 1) * count // BUCKETS) - 1
        return (low + first, low + last) if first <= last else None

    def _bucket_label(self, index: int) -> str:
        """"lo-hi" (or one integer) for bucket `index`."""
        bounds = self._bucket_bounds(index)
        assert bounds is not None
        low, high = bounds
        if self.integer:
            return f"{int(low)}" if low == high else f"{int(low)}-{int(high)}"
        return f"{low:.3g}-{high:.3g}"


Domain = Choices | Range


@dataclass(frozen=True)
class Parameter:
    """One drawn value set at every path in `paths` (the name itself when no paths are given)."""

    name: str
    domain: Domain
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """A parameter named by its one path needs no separate path list."""
        object.__setattr__(self, "paths", tuple(self.paths) or (self.name,))

    def describe(self) -> str:
        """How errors name it: its path, or its name and paths."""
        if self.paths == (self.name,):
            return f"parameter {self.name!r}"
        return f"parameter {self.name!r} ({', '.join(self.paths)})"

    def to_dict(self) -> dict[str, Any]:
        """As written in a family file."""
        paths = {} if self.paths == (self.name,) else {"paths": list(self.paths)}
        return {**paths, **self.domain.to_dict()}


# ---------------------------------------------------------------------------------- paths
class ConfigPathError(ValueError):
    """A dotted path that does not name a settable part of a config."""


def read_path(config: MettaGridConfig, path: str) -> Any:
    """The value at a dotted path (list items by index)."""
    return _child(*_locate(config, path))


def set_path(config: MettaGridConfig, path: str, value: Value) -> None:
    """Set a dotted path: config fields through mettagrid's validating `override`, dict and list items checked here."""
    container, key = _locate(config, path)
    try:  # a copy, so configs never share a list with the family; no `type` name left for mettagrid to import
        value = resolve_config_classes(copy.deepcopy(value), "the value")
    except MettaGridEnvError as error:
        raise ConfigPathError(str(error)) from None
    if isinstance(container, Config):
        try:
            container.override(str(key), value)
        except ValidationError as error:
            raise ConfigPathError(f"{value!r} is not valid there: {error.errors()[0]['msg']}") from None
        except (TypeError, ValueError) as error:  # mettagrid's own validators
            raise ConfigPathError(f"{value!r} is not valid there: {one_line(error)}") from None
        return
    if isinstance(container, BaseModel):  # a pydantic model that is not a mettagrid Config
        raise ConfigPathError(f"{type(container).__name__} fields cannot be set; set the field holding it instead")
    problem = _kind_change(container[key], value)
    if problem is not None:
        raise ConfigPathError(problem)
    container[key] = value


def _locate(root: Any, path: str) -> tuple[Any, str | int]:
    """The container holding the path's last part (a model, dict or list) and that part's key."""
    parts, node, walked = path.split("."), root, "the config"
    for i, part in enumerate(parts):
        key = _child_key(node, part, ".".join(parts[i:]), walked)
        if (isinstance(key, str) and "." in key) or i == len(parts) - 1:  # a dict key with dots ends the path
            return node, key
        node = _child(node, key)
        walked = ".".join(parts[: i + 1])
        if node is None:
            raise ConfigPathError(f"{walked} is unset (None) in the base; give it a value in the base config first")
    raise ConfigPathError("the path is empty")  # unreachable: split always gives one part


def _child(node: Any, key: str | int) -> Any:
    """The part `key` of a model (a field), dict or list."""
    return getattr(node, str(key)) if isinstance(node, BaseModel) else node[key]


def _child_key(node: Any, part: str, rest: str, walked: str) -> str | int:
    """The key of `part` under `node`, or a ConfigPathError saying what `node` has instead."""
    if isinstance(node, BaseModel):
        if part in type(node).model_fields:
            return part
        fields = ", ".join(type(node).model_fields)
        raise ConfigPathError(f"{walked} ({type(node).__name__}) has no field {part!r}; its fields: {fields}")
    if isinstance(node, dict):
        if part in node:
            return part
        if rest in node:  # mettagrid's dict keys may hold dots ("ore.gained")
            return rest
        raise ConfigPathError(f"{walked} has no key {part!r}; its keys: {', '.join(map(str, node)) or 'none'}")
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return int(part)
        raise ConfigPathError(f"{walked} is a list of {len(node)}; index it with 0 to {len(node) - 1}, not {part!r}")
    raise ConfigPathError(f"{walked} holds a {type(node).__name__}, which has no parts to set")


def _kind_change(old: Any, new: Any) -> str | None:
    """Why `new` may not replace `old` in a dict or list (which no model validates), or None."""
    if _is_number(old) and _is_number(new):
        if _is_int(old) and not _is_int(new):
            return f"{new!r} is not an integer, and the base holds the integer {old!r} there"
        return None
    if old is None or type(old) is type(new):
        return None
    return f"{new!r} is of type {type(new).__name__}, and the base holds {type(old).__name__} {old!r} there"


def _agent_path(path: str) -> bool:
    """Whether a path sets how many agents a game has (game.num_agents, a map builder's agents, game.agents)."""
    return any(part in AGENT_PARTS for part in path.split("."))


def _overlaps(path: str, root: str) -> bool:
    """Whether setting `path` may change what lies under `root` (either one contains the other)."""
    return path == root or path.startswith(root + ".") or root.startswith(path + ".")


# ---------------------------------------------------------------------------------- checks
def _interface_of(config: MettaGridConfig) -> dict[str, Any]:
    """What one policy and one row layout rely on: agents, token shape, actions, features, tags."""
    face = PolicyEnvInterface.from_mg_cfg(config)
    return {
        "number of agents": config.game.num_agents,
        "observation shape": tuple(face.observation_shape),
        "action names": tuple(face.action_names),
        "vibe action names": tuple(face.vibe_action_names),
        "observation features": tuple(sorted((f.id, f.name) for f in face.obs_features)),
        "tags": tuple(face.tags),
    }


def _variant_problem(config: MettaGridConfig, base_face: Mapping[str, Any]) -> str | None:
    """Why a variant cannot stand in for its base (another interface, a game that does not build); else None."""
    try:
        face = _interface_of(config)
    except Exception as error:  # mettagrid's own checks of a config it cannot describe
        return f"its observations and actions cannot be described ({one_line(error)})"
    changed = [name for name, value in face.items() if base_face[name] != value]
    if changed:
        reason = f"{AGENTS_ARE_ROWS}, " if "number of agents" in changed else ""
        return (f"it changes the {', '.join(changed)} of the base ({reason}every task of a family keeps the base's "
                "observations and actions)")
    return _game_problem(config)


def _game_problem(config: MettaGridConfig) -> str | None:
    """Why the game cannot be built (map or C++ config), or None; built once with a fixed map seed."""
    config = _with_map_seed(config)
    try:
        Simulation(config, seed=0).close()
    except Exception as error:  # map builders and the C++ core raise many kinds; all mean "this variant fails"
        return f"its game cannot be built ({one_line(error)})"
    return None


def _map_problem(config: MettaGridConfig) -> str | None:
    """Why the map does not hold every agent and object the config asks for (builders drop what does not fit)."""
    builder = config.game.map_builder.model_copy(deep=True)
    if hasattr(builder, "seed"):
        builder.seed = 0  # the same answer every time
    requested = _requested_objects(builder.model_dump(mode="json"))  # before building: builders trim their config
    try:
        grid = np.asarray(builder.create().build().grid).astype(str)
    except Exception as error:  # as in _game_problem: any builder failure means this variant fails
        return f"its map cannot be built ({one_line(error)})"
    agents = int(np.char.startswith(grid, "agent").sum())
    if agents != config.game.num_agents:
        return f"its map holds {agents} agents, not the game's {config.game.num_agents} ({AGENTS_ARE_ROWS})"
    for name, wanted in requested.items():
        placed = int((grid == name).sum())
        if placed < wanted:
            return f"its map has room for only {placed} of its {wanted} {name} objects"
    return None


def _with_map_seed(config: MettaGridConfig) -> MettaGridConfig:
    """A copy whose map builder has a fixed seed, so a check gives the same answer every time."""
    config = config.model_copy(deep=True)
    if hasattr(config.game.map_builder, "seed"):
        config.game.map_builder.seed = 0
    return config


def _requested_objects(data: Any) -> Counter[str]:
    """Object counts a map builder's settings ask for: every `objects` mapping of names to counts, summed."""
    counts: Counter[str] = Counter()
    if isinstance(data, dict) and isinstance(data.get("objects"), dict):
        counts.update({name: count for name, count in data["objects"].items() if _is_int(count)})
    children = data if isinstance(data, list) else data.values() if isinstance(data, dict) else ()
    for child in children:
        counts.update(_requested_objects(child))
    return counts


# ---------------------------------------------------------------------------------- family
class TaskFamily:
    """A base MettaGridConfig and ordered parameters; a task id >= 0 reproduces one variant, -1 is the base.

    `task` returns a fresh copy each call (callers may change it); `base` does too.
    """

    def __init__(self, name: str, base: MettaGridConfig, parameters: Sequence[Parameter] | Mapping[str, Domain],
                 source: str | None = None) -> None:
        self.name = name
        self.parameters = _as_parameters(parameters)
        self._where = f"task family {name!r}" + (f" ({source})" if source else "")
        self._base = base.model_copy(deep=True)
        self._face = _interface_of(self._base)
        self._cache: OrderedDict[int, MettaGridConfig] = OrderedDict()
        self._check()

    # ---------------------------------------------------------------- public
    @property
    def base(self) -> MettaGridConfig:
        """A copy of the base config (task -1)."""
        return self._base.model_copy(deep=True)

    @property
    def num_agents(self) -> int:
        """Agents per game, the same in every task."""
        return self._base.game.num_agents

    def values(self, task_id: int) -> dict[str, Value]:
        """Each parameter's value in task `task_id` (the base's own values for -1)."""
        task_id = self._task_id(task_id)
        if task_id == BASE_TASK:
            return {p.name: copy.deepcopy(read_path(self._base, p.paths[0])) for p in self.parameters}
        rng = np.random.default_rng(task_id)
        return {p.name: p.domain.draw(rng) for p in self.parameters}

    def task(self, task_id: int) -> MettaGridConfig:
        """Task `task_id`'s config, a fresh copy (the same id gives an equal config every time)."""
        task_id = self._task_id(task_id)
        config = self._cache.get(task_id)
        if config is None:
            config = self._build(self.values(task_id), f"task {task_id}")
            self._cache[task_id] = config
            while len(self._cache) > CACHED_TASKS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(task_id)
        return config.model_copy(deep=True)

    def buckets(self, task_id: int) -> dict[str, str]:
        """A short label per parameter for task `task_id`: a choice's value, or a range's bucket ("10-13")."""
        values = self.values(task_id)
        return {p.name: p.domain.label(values[p.name]) for p in self.parameters}

    def bucket_labels(self) -> dict[str, list[str]]:
        """Every parameter's possible labels, in order (for per-bucket metrics and plots)."""
        return {p.name: p.domain.labels() for p in self.parameters}

    def variant(self, overrides: Mapping[str, Value], where: str | None = None) -> MettaGridConfig:
        """The base with `overrides` (parameter names or dotted paths -> values), checked like the family's tasks.

        `where` names the variant in errors (default: this family).
        """
        paths = {path: value for key, value in overrides.items() for path in self._paths_of(key)}
        return _variant_of(self._base, paths, where or f"{self._where}: variant {dict(overrides)}")

    def can_draw(self, overrides: Mapping[str, Value]) -> bool:
        """Whether some task id gives exactly the base with `overrides` (a held-out variant must not)."""
        by_path = {path: value for key, value in overrides.items() for path in self._paths_of(key)}
        for parameter in self.parameters:
            values = [by_path.pop(path, read_path(self._base, path)) for path in parameter.paths]
            if any(not _same(v, values[0]) for v in values) or not parameter.domain.contains(values[0]):
                return False
        return all(_same(value, read_path(self._base, path)) for path, value in by_path.items())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the name, the base config and the parameters (what `family_from_data` reads back)."""
        return {
            "name": self.name,
            "base": self._base.model_dump(mode="json"),
            "parameters": {p.name: p.to_dict() for p in self.parameters},
        }

    @functools.cached_property
    def digest(self) -> str:
        """A short hash of `to_dict`: two families with the same digest draw the same tasks."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"TaskFamily({self.name!r}, parameters={[p.name for p in self.parameters]})"

    # ---------------------------------------------------------------- building
    def _task_id(self, task_id: int) -> int:
        """A valid task id as an int: -1 (the base) or any non-negative integer."""
        if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)) or task_id < BASE_TASK:
            raise MettaGridEnvError(f"{self._where}: task id {task_id!r} is not an integer >= {BASE_TASK}; "
                                    f"use a non-negative id, or {BASE_TASK} for the base")
        return int(task_id)

    def _build(self, values: Mapping[str, Value], where: str) -> MettaGridConfig:
        """The base with each parameter's value set at its paths."""
        config = self._base.model_copy(deep=True)
        for parameter in self.parameters:
            for path in parameter.paths:
                self._set_checked(config, path, values[parameter.name], f"{where}: {parameter.describe()}")
        return config

    def _set_checked(self, config: MettaGridConfig, path: str, value: Value, where: str) -> None:
        """`set_path`, its failures as one MettaGridEnvError line naming `where`."""
        try:
            set_path(config, path, value)
        except (ConfigPathError, MettaGridEnvError) as error:
            raise MettaGridEnvError(f"{self._where}: {where}: {error}") from None

    def _paths_of(self, key: str) -> tuple[str, ...]:
        """A parameter name's paths, or the key itself as one path."""
        named = [p.paths for p in self.parameters if p.name == key]
        return named[0] if named else (key,)

    # ---------------------------------------------------------------- construction checks
    def _error(self, parameter: Parameter, problem: str) -> MettaGridEnvError:
        """A one-line refusal naming the family and the parameter."""
        return MettaGridEnvError(f"{self._where}: {parameter.describe()}: {problem}")

    def _check(self) -> None:
        """Refuse, in one line naming the parameter and the fix, a family some of whose tasks would not work."""
        if not self.name or not isinstance(self.name, str):
            raise MettaGridEnvError(f"{self._where}: a family needs a non-empty name")
        if not self.parameters:
            raise MettaGridEnvError(f"{self._where}: no parameters; give at least one (else use the base task)")
        self._check_unique()
        for parameter in self.parameters:
            self._check_parameter(parameter)
        self._check_maps()

    def _check_unique(self) -> None:
        """Each parameter name and each path once: a later parameter would silently undo an earlier one."""
        names: set[str] = set()
        paths: dict[str, str] = {}
        for parameter in self.parameters:
            if parameter.name in names:
                raise self._error(parameter, "the name is used twice; give each parameter its own name")
            names.add(parameter.name)
            for path in parameter.paths:
                if path in paths:
                    raise self._error(parameter, f"path {path!r} is already set by parameter {paths[path]!r}; "
                                                 "set each path from one parameter")
                paths[path] = parameter.name

    def _check_parameter(self, parameter: Parameter) -> None:
        """Its domain, its paths, and every checked value applied to the base alone."""
        problem = parameter.domain.problem()
        if problem is not None:
            raise self._error(parameter, problem)
        for path in parameter.paths:
            self._check_path(parameter, path)
        for value in parameter.domain.checked_values():
            config = self._build_one(parameter, value)
            problem = _variant_problem(config, self._face)
            if problem is not None:
                raise self._error(parameter, f"value {value!r}: {problem}; narrow its values")

    def _check_path(self, parameter: Parameter, path: str) -> None:
        """A path must exist in the base, leave the agent count alone and take effect."""
        if _agent_path(path):
            raise self._error(parameter, f"path {path!r} sets how many agents a game has: {AGENTS_ARE_ROWS}; "
                                         "drop this parameter")
        if path.startswith("game.agent.") and self._base.game.agents:
            raise self._error(parameter, f"path {path!r} changes nothing: the base lists its agents in game.agents; "
                                         "set game.agents.<index>.… instead")
        try:
            read_path(self._base, path)
        except ConfigPathError as error:
            raise self._error(parameter, f"path {path!r} is not in the base config: {error}; "
                                         "name an existing dotted path") from None

    def _build_one(self, parameter: Parameter, value: Value) -> MettaGridConfig:
        """The base with one parameter set (integers kept integers: a float range on an integer field is refused)."""
        config = self._base.model_copy(deep=True)
        for path in parameter.paths:
            try:
                set_path(config, path, value)
            except (ConfigPathError, MettaGridEnvError) as error:
                raise self._error(parameter, f"value {value!r} at {path!r}: {error}; fix its values") from None
            if isinstance(value, float) and _is_int(read_path(config, path)):
                raise self._error(parameter, f"path {path!r} holds integers, and this parameter gives floats "
                                             f"({value!r}); give integer choices or range ends")
        return config

    def _check_maps(self) -> None:
        """Build the map of every combination of the map parameters' checked values (each alone above the cap)."""
        shaping = [p for p in self.parameters if any(_overlaps(path, MAP_ROOT) for path in p.paths)]
        grids = [[(p, v) for v in p.domain.checked_values()] for p in shaping]
        if math.prod(len(g) for g in grids) > MAX_CHECKED_MAPS:
            combos: list[tuple[tuple[Parameter, Value], ...]] = [(pv,) for g in grids for pv in g]
        else:
            combos = list(itertools.product(*grids))
        for combo in combos:
            config = self._base.model_copy(deep=True)
            for parameter, value in combo:
                for path in parameter.paths:
                    set_path(config, path, value)
            problem = _map_problem(config) if combo else None
            if problem is not None:
                values = ", ".join(f"{p.name}={v!r}" for p, v in combo)
                raise MettaGridEnvError(f"{self._where}: with {values}: {problem}; narrow these parameters so "
                                        "every combination fits")


# ---------------------------------------------------------------------------------- values
def _as_parameters(parameters: Sequence[Parameter] | Mapping[str, Domain]) -> tuple[Parameter, ...]:
    """Parameters as given, or built from {dotted path: Choices or Range} (each path its own parameter)."""
    if isinstance(parameters, Mapping):
        return tuple(Parameter(path, domain) for path, domain in parameters.items())
    return tuple(parameters)


def _is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_plain(value: Any) -> bool:
    """JSON data: what a family file can hold and a label can show."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON data (1 and 1.0 alike, True and 1 not)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or (
        _is_number(a) and _is_number(b) and a == b)


# ---------------------------------------------------------------------------------- reading
def family_from_data(data: Mapping[str, Any], where: str, base_dir: Path | None = None,
                     default_name: str | None = None) -> TaskFamily:
    """A family from plain data (a file's content, `to_dict`'s output, a FAMILIES entry); `where` starts errors,
    relative base paths start at `base_dir`, and `default_name` names a family that does not name itself."""
    _check_keys(data, {"name", "base", "parameters"}, {"base", "parameters"}, where)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise MettaGridEnvError(f"{where}: name {name!r} is not a non-empty string; give the family a name")
    base = _base_from_data(data["base"], f"{where}: base", base_dir)
    specs = data["parameters"]
    if not isinstance(specs, Mapping) or not specs:
        raise MettaGridEnvError(f"{where}: parameters must be a non-empty mapping of path (or name) -> "
                                "{choices: [...]} or {range: [low, high]}")
    parameters = [_parameter_from_data(key, spec, f"{where}: parameters.{key}") for key, spec in specs.items()]
    return TaskFamily(name, base, parameters, source=where)


def _parameter_from_data(name: str, spec: Any, where: str) -> Parameter:
    """`{choices: [...]}` or `{range: [low, high]}`, with optional `paths: [...]`."""
    if not isinstance(spec, Mapping):
        raise MettaGridEnvError(f"{where}: expected {{choices: [...]}} or {{range: [low, high]}}, got {spec!r}")
    _check_keys(spec, {"paths", "choices", "range"}, set(), where)
    if ("choices" in spec) == ("range" in spec):
        raise MettaGridEnvError(f"{where}: give exactly one of choices: [...] or range: [low, high]")
    paths = spec.get("paths", [name])
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise MettaGridEnvError(f"{where}: paths must be a non-empty list of dotted config paths, got {paths!r}")
    if "choices" in spec:
        if not isinstance(spec["choices"], list):
            raise MettaGridEnvError(f"{where}: choices must be a list of values, got {spec['choices']!r}")
        return Parameter(name, Choices(tuple(spec["choices"])), tuple(paths))
    ends = spec["range"]
    if not isinstance(ends, list) or len(ends) != 2:
        raise MettaGridEnvError(f"{where}: range must be [low, high], got {ends!r}")
    return Parameter(name, Range(ends[0], ends[1]), tuple(paths))


def _base_from_data(spec: Any, where: str, base_dir: Path | None) -> MettaGridConfig:
    """A catalogue task name, {task, args}, a config file path (relative to the family file) or a config mapping."""
    if isinstance(spec, str):
        if spec in TASKS or not spec.endswith(CONFIG_SUFFIXES):
            return _catalogue_task(spec, {}, where)
        path = Path(spec) if base_dir is None or Path(spec).is_absolute() else base_dir / spec
        data = read_mapping_file(path, f"{where}: MettaGrid config")
        if "parameters" in data:
            raise MettaGridEnvError(f"{where}: {path} is a task family, not a MettaGridConfig; name a config file")
        return config_from_data(data, f"{where}: MettaGrid config {path}")
    if isinstance(spec, Mapping) and "task" in spec:
        _check_keys(spec, {"task", "args"}, {"task"}, where)
        args = spec.get("args", {})
        if not isinstance(args, Mapping):
            raise MettaGridEnvError(f"{where}: args must be a mapping of the task's keyword arguments, got {args!r}")
        return _catalogue_task(str(spec["task"]), dict(args), where)
    if isinstance(spec, Mapping):
        return config_from_data(dict(spec), where)
    raise MettaGridEnvError(f"{where}: expected a task name, {{task: <name>, args: {{...}}}}, a config file path "
                            f"or a MettaGridConfig mapping, got {spec!r}")


def _catalogue_task(name: str, args: dict[str, Any], where: str) -> MettaGridConfig:
    """A catalogue task, its failures naming `where`."""
    if name not in TASKS:
        raise MettaGridEnvError(f"{where}: unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))} "
                                f"(or a {'/'.join(CONFIG_SUFFIXES)} MettaGridConfig file)")
    try:
        return load_mettagrid_config(name, **args)
    except MettaGridEnvError as error:
        raise MettaGridEnvError(f"{where}: {error}") from None


def _check_keys(data: Mapping[str, Any], allowed: set[str], required: set[str], where: str) -> None:
    """Refuse unknown and missing keys, naming them and the accepted ones."""
    unknown = sorted(set(map(str, data)) - allowed)
    missing = sorted(required - set(data))
    if unknown or missing:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
        raise MettaGridEnvError(f"{where}: {problem}; the keys are {', '.join(sorted(allowed))}")


def is_family_file(path: str | Path) -> bool:
    """Whether a YAML/JSON file holds a task family (a mapping with `parameters`) rather than a MettaGridConfig."""
    return "parameters" in read_mapping_file(Path(path), "MettaGrid file")


def load_family(name_or_path: str, base_dir: Path | None = None) -> TaskFamily:
    """A shipped family by name, or a family file (relative paths from `base_dir` when given)."""
    if name_or_path in FAMILIES:
        return _shipped_family(name_or_path)
    if not name_or_path.endswith(CONFIG_SUFFIXES):
        raise MettaGridEnvError(f"unknown task family {name_or_path!r}; known families: {', '.join(FAMILIES)} "
                                f"(or a path to a {'/'.join(CONFIG_SUFFIXES)} family file)")
    path = Path(name_or_path) if base_dir is None or Path(name_or_path).is_absolute() else base_dir / name_or_path
    data = read_mapping_file(path, "task family file")
    if "parameters" not in data:
        raise MettaGridEnvError(f"task family file {path}: no parameters: it holds one task, not a family; "
                                "add parameters: {<path>: {choices: [...]}}")
    return family_from_data(data, f"task family file {path}", path.parent, path.stem)


def load_config_or_family(name_or_path: str, **task_kwargs: Any) -> MettaGridConfig | TaskFamily:
    """What a MettaGrid env name means: a catalogue task or family, or a config or family file (read once)."""
    if name_or_path in TASKS:
        return load_mettagrid_config(name_or_path, **task_kwargs)
    if name_or_path in FAMILIES:
        if task_kwargs:
            raise MettaGridEnvError(f"task family {name_or_path!r}: task arguments {sorted(task_kwargs)} apply to "
                                    "catalogue tasks only; put them in a family file's base: {task, args}")
        return _shipped_family(name_or_path)
    if not name_or_path.endswith(CONFIG_SUFFIXES):
        raise MettaGridEnvError(
            f"unknown MettaGrid task {name_or_path!r}; known tasks: {', '.join(sorted(TASKS))}; known task families: "
            f"{', '.join(FAMILIES)} (or a path to a {'/'.join(CONFIG_SUFFIXES)} MettaGridConfig or family file)")
    if task_kwargs:
        raise MettaGridEnvError(f"MettaGrid file {name_or_path}: task arguments {sorted(task_kwargs)} apply to "
                                "catalogue tasks only")
    path = Path(name_or_path)
    data = read_mapping_file(path, "MettaGrid file")
    if "parameters" in data:
        return family_from_data(data, f"task family file {path}", path.parent, path.stem)
    return config_from_data(data, f"MettaGrid config {path}")


def family_named(name_or_path: str) -> TaskFamily | None:
    """The family a MettaGrid env name names, or None when it names one task (a catalogue task or config file)."""
    loaded = load_config_or_family(name_or_path) if name_or_path not in TASKS else None
    return loaded if isinstance(loaded, TaskFamily) else None


@functools.cache
def _shipped_family(name: str) -> TaskFamily:
    """A FAMILIES entry, built and checked once per process (families are not changed once built)."""
    return family_from_data(FAMILIES[name], f"task family {name!r}", default_name=name)


# ---------------------------------------------------------------------------------- suites
@dataclass(frozen=True)
class Suite:
    """Fixed, named variants to evaluate a policy on; `family` names the family they were held out of."""

    name: str
    variants: list[tuple[str, MettaGridConfig]]
    family: str | None


def load_suite(name_or_path: str) -> Suite:
    """A shipped suite by name, or a suite file: {name, family (or base), variants: {name: {path: value}}}."""
    if name_or_path in SUITES:
        return suite_from_data(SUITES[name_or_path], f"suite {name_or_path!r}", default_name=name_or_path)
    if not name_or_path.endswith(CONFIG_SUFFIXES):
        raise MettaGridEnvError(f"unknown evaluation suite {name_or_path!r}; known suites: {', '.join(SUITES)} "
                                f"(or a path to a {'/'.join(CONFIG_SUFFIXES)} suite file)")
    path = Path(name_or_path)
    return suite_from_data(read_mapping_file(path, "suite file"), f"suite file {path}", path.parent, path.stem)


def suite_from_data(data: Mapping[str, Any], where: str, base_dir: Path | None = None,
                    default_name: str | None = None) -> Suite:
    """A suite from plain data; each variant is checked like a family's task (same interface, fits its map)."""
    _check_keys(data, {"name", "family", "base", "variants"}, {"variants"}, where)
    if ("family" in data) == ("base" in data):
        raise MettaGridEnvError(f"{where}: give exactly one of family: <name or file> or base: <task or config>")
    variants = data["variants"]
    if not isinstance(variants, Mapping) or not variants:
        raise MettaGridEnvError(f"{where}: variants must be a non-empty mapping of name -> {{path: value}}")
    name = str(data.get("name", default_name))
    if "family" in data:
        family = load_family(str(data["family"]), base_dir)
        configs = [(str(v), family.variant(_overrides(o, f"{where}: {v}"), f"{where}: variant {v!r}"))
                   for v, o in variants.items()]
        return Suite(name, configs, str(data["family"]))
    base = _base_from_data(data["base"], f"{where}: base", base_dir)
    return Suite(name, [(str(v), _variant_of(base, _overrides(o, f"{where}: {v}"), f"{where}: variant {v!r}"))
                        for v, o in variants.items()], None)


def _overrides(data: Any, where: str) -> dict[str, Value]:
    """A variant's mapping of dotted paths (or family parameter names) to values."""
    if not isinstance(data, Mapping) or not data:
        raise MettaGridEnvError(f"{where}: expected a non-empty mapping of dotted path -> value, got {data!r}")
    return {str(key): value for key, value in data.items()}


def _variant_of(base: MettaGridConfig, overrides: Mapping[str, Value], where: str) -> MettaGridConfig:
    """The base with `overrides`, refused when a path is unknown or the variant does not fit like the base."""
    config = base.model_copy(deep=True)
    for path, value in overrides.items():
        if _agent_path(path):
            raise MettaGridEnvError(f"{where}: path {path!r} sets how many agents a game has: {AGENTS_ARE_ROWS}")
        try:
            set_path(config, path, value)
        except ConfigPathError as error:
            raise MettaGridEnvError(f"{where}: {path}: {error}") from None
    problem = _variant_problem(config, _interface_of(base)) or _map_problem(config)
    if problem is not None:
        raise MettaGridEnvError(f"{where}: {problem}; choose values that fit the base")
    return config


# ---------------------------------------------------------------------------------- catalogue
_MAP_SIZE = ["game.map_builder.width", "game.map_builder.height"]
"""A square map's side: arena's whole map, navigation's interior (its map builder adds the wall border)."""
_HEART_REWARD = ["game.agent.rewards.heart.reward.weights.0"]

FAMILIES: dict[str, dict[str, Any]] = {
    "arena-family": {
        "name": "arena-family",
        "base": "arena",  # 14x14, 6 mines, 3 altars, 256 steps, 12 agents
        "parameters": {
            "map_size": {"paths": _MAP_SIZE, "choices": [10, 12, 14, 16, 18]},
            "mines": {"paths": ["game.map_builder.objects.mine"], "range": [3, 10]},
            "altars": {"paths": ["game.map_builder.objects.altar"], "choices": [1, 2, 3, 4]},
            "max_steps": {"paths": ["game.max_steps"], "choices": [128, 192, 256, 320]},
            "heart_reward": {"paths": _HEART_REWARD, "range": [0.5, 1.5]},
        },
    },
    "navigation-family": {
        "name": "navigation-family",
        "base": "navigation",  # 20x20 (map_size 18 inside the border), 8 rooms, 4 goals, 200 steps, 4 agents
        "parameters": {
            "map_size": {"paths": _MAP_SIZE, "choices": [14, 16, 18, 20, 22]},
            "rooms": {"paths": ["game.map_builder.instance.rooms"], "range": [4, 8]},
            "goals": {"paths": ["game.map_builder.instance.children.1.scene.objects.goal"], "choices": [2, 3, 4, 6]},
            "max_steps": {"paths": ["game.max_steps"], "range": [150, 300]},
            "heart_reward": {"paths": _HEART_REWARD, "choices": [0.5, 1.0, 2.0]},
        },
    },
}
"""Shipped families, as the data a family file holds: variants easier (smaller maps, more mines, altars and
goals, longer episodes) and harder (larger maps, fewer of them, shorter episodes) than the catalogue task."""

SUITES: dict[str, dict[str, Any]] = {
    "arena-heldout": {
        "name": "arena-heldout",
        "family": "arena-family",
        "variants": {
            "size-20": {"map_size": 20, "altars": 2},
            "size-22-one-altar": {"map_size": 22, "mines": 5, "altars": 1},
            "size-17-two-mines": {"map_size": 17, "mines": 2, "altars": 2},
            "size-24-sparse": {"map_size": 24, "mines": 3, "altars": 1, "max_steps": 320},
        },
    },
    "navigation-heldout": {
        "name": "navigation-heldout",
        "family": "navigation-family",
        "variants": {
            "size-24": {"map_size": 24, "goals": 3},
            "size-18-one-goal": {"map_size": 18, "goals": 1},
            "size-26-rooms-10": {"map_size": 26, "rooms": 10, "goals": 2, "max_steps": 300},
            "size-28-one-goal": {"map_size": 28, "goals": 1, "max_steps": 300},
        },
    },
}
"""Held-out evaluation suites, harder than the default maps (larger, fewer altars, mines or goals). None is a
task its family draws: every variant sets a map size outside the family's choices (larger than all, or odd
between them) or a count below its range or choices; `TaskFamily.can_draw` is False for each (tested)."""
