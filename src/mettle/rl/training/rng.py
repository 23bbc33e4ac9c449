"""Process-global RNG state (python, numpy, torch) as plain containers, so checkpoints and workers can carry it."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain containers and tensors."""
    numpy_state = np.random.get_state()
    assert isinstance(numpy_state, tuple), "the global numpy generator is the legacy MT19937, whose state is a tuple"
    kind, keys, pos, has_gauss, gauss = numpy_state
    py_version, py_state, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any], throwaway: bool = False) -> None:
    """Inverse of `rng_state`; `throwaway` sets fresh generators instead, to check a state without using it."""
    py_version, py_state, py_gauss = state["python"]
    (random.Random() if throwaway else random).setstate((py_version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    (np.random.RandomState() if throwaway else np.random).set_state(
        (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    (torch.Generator() if throwaway else torch.default_generator).set_state(state["torch"])
