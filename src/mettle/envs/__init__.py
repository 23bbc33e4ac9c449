"""Environments as rows of agents: MettaGrid, Gymnasium and PettingZoo adapters, process vectorisation, test envs.

Exports resolve lazily (module `__getattr__`), so `import mettle.envs` imports none of the simulators
(mettagrid, gymnasium, pettingzoo) until one of their names is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_environment": "mettle.envs.factory",
    "GymnasiumEnvironment": "mettle.envs.gymnasium",
    "GymnasiumEnvError": "mettle.envs.gymnasium",
    "MaskVelocityObservation": "mettle.envs.gymnasium",
    "MettaGridEnvironment": "mettle.envs.mettagrid",
    "MettaGridEnvError": "mettle.envs.mettagrid",
    "load_mettagrid_config": "mettle.envs.mettagrid",
    "make_mettagrid_environment": "mettle.envs.mettagrid",
    "PettingZooEnvironment": "mettle.envs.pettingzoo",
    "PettingZooEnvError": "mettle.envs.pettingzoo",
    "EnvironmentWorkerError": "mettle.envs.vector",
    "VectorEnvironment": "mettle.envs.vector",
    "VectorizedTrainingEnvironment": "mettle.envs.vector",
    "BanditEnvironment": "mettle.envs.testing",
    "ScriptedEnvironment": "mettle.envs.testing",
    "check_environment_contract": "mettle.envs.testing",
    "check_rollout": "mettle.envs.testing",
    "collect_rollout": "mettle.envs.testing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the defining module on first access, so unused simulators are never imported."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """List the lazy exports too, for completion and `help()`."""
    return sorted({*globals(), *_EXPORTS})
