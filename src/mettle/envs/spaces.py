"""One agent's spaces as mettle delivers them: float32 feature rows in, [rows, heads] integer choices out.

The Gymnasium and PettingZoo adapters convert through these, and the MettaGrid adapter checks its actions
with the same range test:

* `ObservationWriter` writes Box observations as they are and flattens the others as gymnasium does
  (Discrete and MultiDiscrete one-hot, MultiBinary as 0/1, Dict and Tuple part after part) into float32 rows;
* `ActionConverter` checks [rows, heads] int64 choices and turns them into what a simulator takes,
  batched (a vector env) or one row at a time (a PettingZoo agent);
* `BoxActionConverter` does the same for [rows, dims] float32 Box actions, clipping them to the space's bounds:
  policies send (and episode logs keep) the Gaussian's unclipped sample, and only the simulator sees it clipped;
  `action_converter` picks one of the two for a space;
* `scalar_infos` keeps the numeric scalars of an info dict, nested dicts flattened as `outer/inner`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from mettle.errors import one_line

__all__ = ["ActionConverter", "BoxActionConverter", "ObservationWriter", "action_converter", "byte_box_part",
           "feature_space", "scalar_infos"]

UNSUPPORTED_ACTIONS = "mettle policies need Discrete, MultiDiscrete or float Box actions"
FEATURE_PARTS = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
"""Observation spaces with a feature form, alone or nested in Dict/Tuple (Text, Graph, Sequence, OneOf have none)."""
SUPPORTED_OBSERVATIONS = "Box, Discrete, MultiDiscrete, MultiBinary, or Dict/Tuple nests of them"
Key = str | int
"""A Dict key or Tuple index on the way to one part of an observation."""


def observation_parts(space: gym.Space[Any], path: tuple[Key, ...] = ()) -> Iterator[tuple[tuple[Key, ...], Any]]:
    """Every part of a Dict/Tuple nest with the keys that reach it, in the order gymnasium flattens them."""
    if isinstance(space, gym.spaces.Dict):
        for key, part in space.spaces.items():
            yield from observation_parts(part, (*path, key))
    elif isinstance(space, gym.spaces.Tuple):
        for index, part in enumerate(space.spaces):
            yield from observation_parts(part, (*path, index))
    else:
        yield path, space


def byte_box_part(space: gym.Space[Any]) -> tuple[tuple[Key, ...], gym.spaces.Box] | None:
    """The first Box part of uint8 values (images, as Gymnasium and SB3 take them, or tokens) and its keys; None if
    there is none."""
    return next(((path, part) for path, part in observation_parts(space)
                 if isinstance(part, gym.spaces.Box) and part.dtype == np.uint8), None)


def unsupported_part(space: gym.Space[Any]) -> tuple[tuple[Key, ...], gym.Space[Any]] | None:
    """The first part with no feature form (Text, Graph, Sequence, OneOf...) and its keys; the space if it has none."""
    parts = list(observation_parts(space))
    if not parts:
        return (), space
    return next(((path, part) for path, part in parts if not isinstance(part, FEATURE_PARTS)), None)


def feature_space(space: gym.Space[Any]) -> gym.spaces.Box | None:
    """The float32 Box a policy sees: a Box keeps its shape, anything else is gymnasium's flat form; None if neither."""
    if unsupported_part(space) is not None:
        return None
    flat = space if isinstance(space, gym.spaces.Box) else gym.spaces.flatten_space(space)
    assert isinstance(flat, gym.spaces.Box), f"gymnasium flattened {space} into {flat}"
    low, high = flat.low.astype(np.float32), flat.high.astype(np.float32)
    return gym.spaces.Box(low, high, shape=flat.shape, dtype=np.float32)


@dataclass(frozen=True)
class _Part:
    """One Box, Discrete, MultiDiscrete or MultiBinary of an observation and the feature columns it fills."""

    path: tuple[Key, ...]
    columns: slice
    hot: np.ndarray | None
    """One-hot parts: per entry, the column its value 0 lights minus the space's start; None: values copied."""
    scalar_hot: int | None = None
    """A Discrete part's one `hot` as an int: one agent's value lights its column without building arrays."""

    @property
    def entries(self) -> int:
        """Values per observation: one per one-hot entry, else one per column."""
        return self.columns.stop - self.columns.start if self.hot is None else len(self.hot)

    def value(self, obs: Any) -> Any:
        """This part of an observation (or of a batch of them: vector envs batch Dict/Tuple leaf by leaf)."""
        for key in self.path:
            obs = obs[key]
        return obs

    def write(self, out: np.ndarray, obs: Any, index: np.ndarray | None) -> None:
        """Fill this part's columns of every row of `out`, or of the rows in `index`."""
        values = np.asarray(self.value(obs))
        rows = slice(None) if index is None else index
        if index is not None:
            values = values[index]
        values = values.reshape(len(values), self.entries)
        if self.hot is None:
            out[rows, self.columns] = values
            return
        out[rows, self.columns] = 0.0
        lit = np.arange(len(out)) if index is None else index
        out[lit[:, None], values + self.hot] = 1.0

    def write_row(self, out: np.ndarray, obs: Any) -> None:
        """Fill this part's columns of one row."""
        if self.scalar_hot is not None:
            out[self.columns] = 0.0
            out[int(self.value(obs)) + self.scalar_hot] = 1.0
            return
        values = np.asarray(self.value(obs)).reshape(-1)
        if self.hot is None:
            out[self.columns] = values
            return
        out[self.columns] = 0.0
        out[values + self.hot] = 1.0


def _layout(space: gym.Space[Any]) -> tuple[_Part, ...]:
    """Where each part of a supported non-Box space lands in its flat form, column for column as gymnasium's."""
    parts, column = [], 0
    for path, part in observation_parts(space):
        width = gym.spaces.flatdim(part)
        hot = None
        if isinstance(part, gym.spaces.Discrete | gym.spaces.MultiDiscrete):
            nvec = np.asarray(part.nvec if isinstance(part, gym.spaces.MultiDiscrete) else [part.n]).reshape(-1)
            first = column + np.concatenate([[0], np.cumsum(nvec)[:-1]])
            hot = (first - np.asarray(part.start).reshape(-1)).astype(np.int64)
        scalar_hot = int(hot[0]) if isinstance(part, gym.spaces.Discrete) and hot is not None else None
        parts.append(_Part(path, slice(column, column + width), hot, scalar_hot))
        column += width
    return tuple(parts)


class ObservationWriter:
    """Writes one agent's observations into float32 batch rows: a Box as it is, other spaces flattened."""

    def __init__(self, space: gym.Space[Any], error: type[ValueError], prefix: str, remedy: str) -> None:
        converted = feature_space(space)
        if converted is None:
            raise error(one_line(error(_unsupported(space, prefix, remedy))))  # numpy prints arrays over lines
        self.source = space
        self.space: gym.spaces.Box = converted
        self._parts = None if isinstance(space, gym.spaces.Box) else _layout(space)

    @property
    def extras(self) -> dict[str, Any]:
        """For PolicyEnvInfo.extras: the space before conversion, where it is not a float Box (a flattened space,
        which gymnasium.spaces.unflatten reads features back with, or a Box of integers such as images)."""
        kept = self._parts is None and np.issubdtype(self.source.dtype, np.floating)
        return {} if kept else {"observation_source": self.source}

    def write(self, out: np.ndarray, obs: Any, rows: np.ndarray | None = None) -> None:
        """Copy a batch of observations into `out`: every row, or only where the boolean `rows` is True."""
        if self._parts is None:
            if rows is None:
                np.copyto(out, obs, casting="unsafe")
            else:
                out[rows] = obs[rows]
            return
        index = None if rows is None else np.flatnonzero(rows)
        for part in self._parts:
            part.write(out, obs, index)

    def write_row(self, out: np.ndarray, obs: Any) -> None:
        """Fill one row `out` from a single agent's observation."""
        if self._parts is None:
            np.copyto(out, np.asarray(obs).reshape(out.shape), casting="unsafe")
            return
        for part in self._parts:
            part.write_row(out, obs)


def _unsupported(space: gym.Space[Any], prefix: str, remedy: str) -> str:
    """One line naming the space, the part of it that has no feature form, and the fix."""
    path, part = unsupported_part(space) or ((), space)
    inner = f": its part {''.join(f'[{key!r}]' for key in path)} is {part}" if path else ""
    return f"{prefix}observation space {space} is not supported{inner}; mettle takes {SUPPORTED_OBSERVATIONS}; {remedy}"


class ActionConverter:
    """Checks [rows, heads] integer choices and turns them into the actions of one agent's space."""

    def __init__(self, space: gym.Space[Any], rows: int, error: type[ValueError], prefix: str = "") -> None:
        if isinstance(space, gym.spaces.Discrete):
            self.shape: tuple[int, ...] = ()
            nvec, start = np.asarray([space.n]), np.asarray(space.start).reshape(1)
        elif isinstance(space, gym.spaces.MultiDiscrete):
            self.shape = tuple(space.nvec.shape)
            nvec, start = np.asarray(space.nvec).reshape(-1), np.asarray(space.start).reshape(-1)
        else:
            raise error(f"{prefix}action space {space} is not supported; {UNSUPPORTED_ACTIONS}")
        self.space: gym.spaces.Discrete | gym.spaces.MultiDiscrete = space
        self.dtype = space.dtype
        self.action_dtype = np.dtype(np.int64)
        """What mettle sends and logs: int64 choices."""
        self.rows, self.heads = rows, len(nvec)
        self.nvec, self.start = nvec.astype(np.int64), start
        self._nvec_unsigned = self.nvec.astype(np.uint64)
        self._offset = start.reshape(self.shape) if np.any(start != 0) else None
        self._buffer = np.zeros((rows, *self.shape), dtype=np.int64)

    def check_shape(self, actions: np.ndarray) -> None:
        """Actions must be one [heads] row per agent row."""
        if actions.shape != (self.rows, self.heads):
            raise ValueError(f"expected actions shaped {(self.rows, self.heads)}, got {actions.shape}")

    def check(self, actions: np.ndarray) -> None:
        """Shape and range, for simulators that do not check their actions themselves."""
        self.check_shape(actions)
        if actions.dtype.kind not in "iu" or not self.in_range(actions):
            raise ValueError(f"actions must be integers in [0, {self.nvec.tolist()}) per head, got {actions.dtype} "
                             "values outside it")

    def in_range(self, actions: np.ndarray) -> bool:
        """Whether integer `actions` lie in [0, nvec) per head (int64 in one comparison: negatives wrap high)."""
        if actions.dtype == np.int64:
            return not np.greater_equal(actions.view(np.uint64), self._nvec_unsigned).any()
        return not ((actions < 0).any() or (actions >= self.nvec).any())

    def batched(self, actions: np.ndarray) -> np.ndarray:
        """Every row's action in a vector env's layout: a view, or a reused buffer when the space has a start."""
        self.check_shape(actions)
        batch = actions.reshape(self.rows, *self.shape)
        if self._offset is None:
            return batch
        np.add(batch, self._offset, out=self._buffer)
        return self._buffer

    def single(self, row: np.ndarray) -> Any:
        """One row's action: a Python int for Discrete, an array shaped like `nvec` for MultiDiscrete."""
        if not self.shape:
            return int(row[0] + self.start[0])
        return (row + self.start).astype(self.dtype).reshape(self.shape)


class BoxActionConverter:
    """Takes [rows, dims] float32 values and clips them to a float Box's bounds in the simulator's layout and dtype.

    Values are rounded to float32 first, the dtype episode logs keep, so a replayed episode sends the simulator
    exactly what the live one did.
    """

    def __init__(self, space: gym.spaces.Box, rows: int, error: type[ValueError], prefix: str = "") -> None:
        if not np.issubdtype(space.dtype, np.floating):
            raise error(f"{prefix}action space {space} holds integers, which a Gaussian head cannot draw; "
                        f"{UNSUPPORTED_ACTIONS}")
        self.space = space
        self.shape: tuple[int, ...] = tuple(space.shape)
        self.rows, self.heads = rows, int(np.prod(self.shape, dtype=np.int64))
        self.action_dtype = np.dtype(np.float32)
        """What mettle sends and logs: float32 values, unclipped."""
        self._low, self._high = space.low.reshape(-1), space.high.reshape(-1)

    def check_shape(self, actions: np.ndarray) -> None:
        """Actions must be one [dims] row per agent row."""
        if actions.shape != (self.rows, self.heads):
            raise ValueError(f"expected actions shaped {(self.rows, self.heads)}, got {actions.shape}")

    def check(self, actions: np.ndarray) -> None:
        """Shape and kind: real numbers (any value; they are clipped to the bounds)."""
        self.check_shape(actions)
        if actions.dtype.kind not in "fiu":
            raise ValueError(f"actions for {self.space} must be float32 values, got {actions.dtype}")

    def batched(self, actions: np.ndarray) -> np.ndarray:
        """Every row's action, clipped, in a vector env's layout and the space's dtype: a new array each call, as
        sub-envs get views of it and a simulator may keep its action."""
        self.check_shape(actions)
        values = actions.astype(np.float32, copy=False).astype(self.space.dtype)  # astype copies: never `actions`
        np.clip(values, self._low, self._high, out=values)
        return values.reshape(self.rows, *self.shape)

    def single(self, row: np.ndarray) -> np.ndarray:
        """One row's action, clipped, shaped and typed like the space (a new array the simulator may keep)."""
        value = np.asarray(row).astype(np.float32, copy=False).astype(self.space.dtype)
        clipped: np.ndarray = np.clip(value, self._low, self._high).reshape(self.shape)
        return clipped


def action_converter(
    space: gym.Space[Any], rows: int, error: type[ValueError], prefix: str = ""
) -> ActionConverter | BoxActionConverter:
    """The converter for one agent's action space: Box values clipped, or Discrete/MultiDiscrete choices checked."""
    if isinstance(space, gym.spaces.Box):
        return BoxActionConverter(space, rows, error, prefix)
    return ActionConverter(space, rows, error, prefix)


def scalar_infos(info: Any, prefix: str = "") -> dict[str, float]:
    """The numeric scalars of one agent's info dict as floats (nested dicts flattened as `outer/inner`)."""
    out: dict[str, float] = {}
    if not isinstance(info, dict):
        return out
    for key, value in info.items():
        if isinstance(value, dict):
            out.update(scalar_infos(value, f"{prefix}{key}/"))
        elif isinstance(value, bool | int | float | np.number | np.bool_) or (
            isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf"
        ):
            out[f"{prefix}{key}"] = float(value)
    return out
