"""What the parent and its workers share: the batch's shared-memory layout and the one-byte messages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mettle.contracts import BatchInfo, PolicyEnvInfo, TrainingEnvironment

EnvFactory = Callable[[int, int], TrainingEnvironment]
"""`make_env(num_envs_for_worker, worker_index)` -> the worker's sub-environment."""

SubEnvInfo = tuple[PolicyEnvInfo, BatchInfo]
"""A sub-env's spaces and row layout, as a worker reports them on start."""

# one-byte message tags (parent -> worker, then worker -> parent)
_STEP, _RESET, _ATTACH, _CLOSE, _SAVE, _LOAD, _TASKS = b"s", b"r", b"a", b"c", b"g", b"l", b"t"
_OK, _INFOS, _READY, _ERROR, _STATE = b"k", b"i", b"y", b"e", b"d"

_ALIGN = 64
_BATCH_FIELDS = ("observations", "rewards", "terminals", "truncations", "mask", "starts")


@dataclass(frozen=True)
class _Layout:
    """Shapes of the shared arrays; picklable so workers can map the same segment."""

    rows: int
    obs_shape: tuple[int, ...]
    obs_dtype: str
    heads: int
    action_dtype: str = "<i8"
    """int64 choices, or float32 Box values (`PolicyEnvInfo.action_dtype`)."""

    def fields(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """Name, shape and dtype of every array, in segment order."""
        flag = np.dtype(np.bool_)
        return [
            ("observations", (self.rows, *self.obs_shape), np.dtype(self.obs_dtype)),
            ("rewards", (self.rows,), np.dtype(np.float32)),
            ("terminals", (self.rows,), flag),
            ("truncations", (self.rows,), flag),
            ("mask", (self.rows,), flag),
            ("starts", (self.rows,), flag),
            ("actions", (self.rows, self.heads), np.dtype(self.action_dtype)),
        ]

    def offsets(self) -> tuple[list[int], int]:
        """Cache-line aligned byte offsets of the fields and the total size."""
        offsets, end = [], 0
        for _name, shape, dtype in self.fields():
            start = -(-end // _ALIGN) * _ALIGN
            offsets.append(start)
            end = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return offsets, max(end, 1)

    def arrays(self, buffer: Any) -> dict[str, np.ndarray]:
        """Numpy views of every field over `buffer` (shared memory or a bytearray)."""
        offsets, _ = self.offsets()
        return {
            name: np.ndarray(shape, dtype=dtype, buffer=buffer, offset=offset)
            for (name, shape, dtype), offset in zip(self.fields(), offsets, strict=True)
        }


def _layout_for(info: PolicyEnvInfo, rows: int) -> _Layout:
    """Shared arrays sized from the observation space (its dtype is the batch's dtype)."""
    space = info.observation_space
    if space.shape is None:
        raise ValueError(f"VectorEnvironment needs an observation space with a fixed shape, got {space}")
    dtype = np.dtype(space.dtype) if space.dtype is not None else np.dtype(np.float32)
    return _Layout(rows, tuple(int(n) for n in space.shape), dtype.str, info.action_width, info.action_dtype.str)


def _row_views(arrays: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    """Every field restricted to `rows`."""
    return {name: array[rows] for name, array in arrays.items()}
