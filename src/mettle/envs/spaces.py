"""One agent's spaces as mettle delivers them: float32 feature rows in, [rows, heads] integer choices out.

The Gymnasium and PettingZoo adapters convert through these, and the MettaGrid adapter checks its actions
with the same range test:

* `ObservationWriter` writes Box observations as they are and Discrete ones one-hot, into float32 rows;
* `ActionConverter` checks [rows, heads] int64 choices and turns them into what a simulator takes,
  batched (a vector env) or one row at a time (a PettingZoo agent);
* `scalar_infos` keeps the numeric scalars of an info dict, nested dicts flattened as `outer/inner`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["ActionConverter", "ObservationWriter", "feature_space", "scalar_infos"]

UNSUPPORTED_ACTIONS = "mettle policies need Discrete or MultiDiscrete actions"


def feature_space(space: gym.Space[Any]) -> tuple[gym.spaces.Box, int | None] | None:
    """Box (as is) or Discrete (one-hot) as the float32 Box delivered, with the one-hot's start; else None."""
    if isinstance(space, gym.spaces.Box):
        low, high = space.low.astype(np.float32), space.high.astype(np.float32)
        return gym.spaces.Box(low, high, shape=space.shape, dtype=np.float32), None
    if isinstance(space, gym.spaces.Discrete):
        return gym.spaces.Box(0.0, 1.0, shape=(int(space.n),), dtype=np.float32), int(space.start)
    return None


class ObservationWriter:
    """Writes observations of one agent's space into float32 batch rows (Box as is, Discrete one-hot)."""

    def __init__(self, space: gym.Space[Any], error: type[ValueError], prefix: str, remedy: str) -> None:
        converted = feature_space(space)
        if converted is None:
            raise error(f"{prefix}observation space {space} is not supported (Box or Discrete only); {remedy}")
        self.space, self.one_hot_start = converted

    def write(self, out: np.ndarray, obs: Any, rows: np.ndarray | None = None) -> None:
        """Copy a batch of observations into `out`: every row, or only where the boolean `rows` is True."""
        if self.one_hot_start is None:
            if rows is None:
                np.copyto(out, obs, casting="unsafe")
            else:
                out[rows] = obs[rows]
            return
        index = np.arange(len(out)) if rows is None else np.flatnonzero(rows)
        out[index] = 0.0
        out[index, np.asarray(obs)[index] - self.one_hot_start] = 1.0

    def write_row(self, out: np.ndarray, obs: Any) -> None:
        """Fill one row `out` from a single agent's observation."""
        if self.one_hot_start is None:
            np.copyto(out, np.asarray(obs).reshape(out.shape), casting="unsafe")
        else:
            out.fill(0.0)
            out[int(obs) - self.one_hot_start] = 1.0


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
        self.rows, self.heads = rows, len(nvec)
        self.nvec, self.start = nvec.astype(np.int64), start
        self._nvec_unsigned = self.nvec.astype(np.uint64)
        self._offset = start.reshape(self.shape) if np.any(start != 0) else None
        self._buffer = np.zeros((rows, *self.shape), dtype=np.int64)

    def check_shape(self, actions: np.ndarray) -> None:
        """Actions must be one [heads] row per agent row."""
        if actions.shape != (self.rows, self.heads):
            raise ValueError(f"expected actions shaped {(self.rows, self.heads)}, got {actions.shape}")

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
