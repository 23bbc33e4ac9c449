"""Environments as rows of agents: Gymnasium adapters and small deterministic testing envs.

Exports resolve lazily, so `import mettle.envs` stays cheap until one is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GymnasiumEnvironment": "mettle.envs.gymnasium",
    "GymnasiumEnvError": "mettle.envs.gymnasium",
    "MaskVelocityObservation": "mettle.envs.gymnasium",
    "BanditEnvironment": "mettle.envs.testing",
    "ScriptedEnvironment": "mettle.envs.testing",
    "check_environment_contract": "mettle.envs.testing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the defining module on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
