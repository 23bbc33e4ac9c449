"""A sweep's search space: `key=log(lo,hi)` and the like, read by a small strict parser (nothing is evaluated).

    log(lo,hi)        a float drawn log-uniformly, 0 < lo <= hi
    float(lo,hi)      a float drawn uniformly (also `uniform(lo,hi)`)
    int(lo,hi)        an integer in [lo, hi], both ends included
    choice(a,b,...)   one of the listed values, each read as an override value is (JSON, else a string)

A space file (`--space FILE`, YAML or JSON) maps keys to the same texts, or to a list (a choice).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mettle.config import parse_value
from mettle.errors import ConfigError, one_line

if TYPE_CHECKING:
    import optuna

Kind = Literal["log", "float", "int", "choice"]
KINDS: dict[str, Kind] = {"log": "log", "float": "float", "uniform": "float", "int": "int", "choice": "choice"}
"""Distribution names as typed -> the kind they draw."""
CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.DOTALL)
"""`name(arguments)`: a value of this shape is a distribution, never a plain override value."""
INTEGER = re.compile(r"^[+-]?\d+$")
USAGE = "use log(lo,hi), float(lo,hi), uniform(lo,hi), int(lo,hi) or choice(a,b,...)"
Choice = bool | int | float | str | None


@dataclass(frozen=True)
class Distribution:
    """One key's range of values: `low`/`high` for log, float and int; `choices` for choice."""

    kind: Kind
    text: str
    """What was typed (or read from the space file), for messages."""
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Choice, ...] = ()

    def extremes(self) -> list[Choice]:
        """The values to validate the key with before any trial: both ends, or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def suggest(self, trial: optuna.Trial, name: str) -> Choice:
        """The trial's value for `name`, drawn by Optuna's sampler."""
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high))
        return trial.suggest_float(name, self.low, self.high, log=self.kind == "log")


def is_distribution(value: str) -> bool:
    """Whether an override's value has the shape of a distribution (`name(...)`), known or not."""
    return CALL.match(value) is not None


def parse_distribution(key: str, text: str) -> Distribution:
    """`text` as a Distribution; anything else (an unknown name, a missing bound, low > high) is one ConfigError."""
    match = CALL.match(text)
    if match is None:
        raise ConfigError(f"search space {key}={text}: not a distribution; {USAGE}")
    name, body = match.group(1), match.group(2)
    if name not in KINDS:
        raise ConfigError(f"search space {key}={text}: unknown distribution {name!r}; {USAGE}")
    kind = KINDS[name]
    items = [item.strip() for item in body.split(",")] if body.strip() else []
    if kind == "choice":
        return Distribution(kind, text, choices=parse_choices(key, text, items))
    if len(items) != 2:
        raise ConfigError(f"search space {key}={text}: {name}() takes 2 bounds (low, high), got {len(items)}")
    low, high = (parse_bound(key, text, item, kind) for item in items)
    if low > high:
        raise ConfigError(f"search space {key}={text}: low {items[0]} is above high {items[1]}")
    if kind == "log" and low <= 0:
        raise ConfigError(f"search space {key}={text}: log() needs 0 < low, got {items[0]}; use float() for a "
                          "range that reaches 0")
    return Distribution(kind, text, low, high)


def parse_bound(key: str, text: str, item: str, kind: Kind) -> float:
    """One bound: an integer for int(), a finite number otherwise."""
    if kind == "int":
        if not INTEGER.match(item):
            raise ConfigError(f"search space {key}={text}: {item!r} is not an integer")
        return float(int(item))
    try:
        value = float(item)
    except ValueError:
        raise ConfigError(f"search space {key}={text}: {item!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"search space {key}={text}: {item!r} is not a finite number")
    return value


def parse_choices(key: str, text: str, items: list[str]) -> tuple[Choice, ...]:
    """choice()'s values: at least one, none empty or repeated, each a number, boolean, null or string."""
    if not items or any(not item for item in items):
        raise ConfigError(f"search space {key}={text}: choice() needs values separated by commas, none empty")
    values = [parse_value(item) for item in items]
    for item, value in zip(items, values, strict=True):
        if isinstance(value, list | dict) or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"search space {key}={text}: choice value {item!r} must be a number, true/false, "
                              "null or a string")
    if len({json.dumps(value) for value in values}) < len(values):
        raise ConfigError(f"search space {key}={text}: a choice is listed twice")
    return tuple(values)


def space_from_file(path: Path) -> dict[str, Distribution]:
    """A YAML or JSON mapping of key -> distribution text (or a list: a choice), read as data only."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"--space {path}: cannot read it: {one_line(error, first_line=True)}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--space {path}: expected a mapping of config keys to distributions, e.g. "
                          "optimizer.learning_rate: log(1e-4,3e-3)")
    space = {}
    for key, value in data.items():
        if isinstance(value, list):
            value = f"choice({','.join(choice_text(item) for item in value)})"
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"--space {path}: {key!r}: give a distribution as text, e.g. 'int(2,10)', or a list "
                              "of choices")
        space[key] = parse_distribution(key, value)
    return space


def choice_text(value: Any) -> str:
    """A space file's list item as choice() text (a string as it is, anything else as JSON)."""
    return value if isinstance(value, str) else json.dumps(value)


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, Distribution]]:
    """Plain `key=value` overrides (every trial gets them) and `key=dist(...)` ones (the search space)."""
    fixed: list[str] = []
    space: dict[str, Distribution] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value (e.g. update_epochs='int(2,10)')")
        if not is_distribution(value):
            fixed.append(item)
        elif key.strip() in space:
            raise ConfigError(f"search space: {key.strip()} is given twice")
        else:
            space[key.strip()] = parse_distribution(key.strip(), value)
    return fixed, space


def override_text(key: str, value: Choice) -> str:
    """`key=value` that reads back as `value` (strings as typed, everything else as JSON)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"
