"""Build policies by short name (configs, CLI) or from a saved `rebuild_spec` (checkpoints)."""

from __future__ import annotations

import importlib
from typing import Any

from mettle.agent.lstm import LSTMPolicy
from mettle.agent.mlp import MLPPolicy
from mettle.agent.policy import Policy
from mettle.agent.token import TokenPolicy

POLICY_KINDS: dict[str, type[Policy]] = {"mlp": MLPPolicy, "lstm": LSTMPolicy, "token": TokenPolicy}


def build_policy(kind: str, **kwargs: Any) -> Policy:
    """A policy of a named kind, so configs need not spell out class paths."""
    try:
        cls = POLICY_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown policy kind {kind!r}; valid kinds: {sorted(POLICY_KINDS)}") from None
    return cls(**kwargs)


def policy_from_spec(spec: dict[str, Any]) -> Policy:
    """Rebuild an uninitialised policy from `Policy.rebuild_spec()`; refuse classes that are not Policies."""
    path = spec.get("class") if isinstance(spec, dict) else None
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(f"spec needs a 'class' of the form 'module:Class', got {spec!r}")
    cls = _import_class(path)
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"spec 'kwargs' must be a dict, got {kwargs!r}")
    return cls(**kwargs)


def _import_class(path: str) -> type[Policy]:
    """Resolve 'module:Class' to a Policy subclass, with errors that name the offending path."""
    module_name, class_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} for policy {path!r}: {error}") from error
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise ValueError(f"{path!r} does not name a Policy subclass")
    return cls
