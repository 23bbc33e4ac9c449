"""Policy classes by registered name: configs, the CLI and checkpoint specs name a class, never a module.

A checkpoint's `policy.json` is data from disk, so its `class` is only looked up here; nothing it says is
imported. User classes join through `register_policy(name, cls)` or an installed package's entry point in
the `mettle.policies` group (the package's author declared it; the spec only names it). This module is the
only one that names policies: a policy class never imports it, and whoever saves one asks `policy_spec`.
"""

from __future__ import annotations

import itertools
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from mettle.agent.layers import check_size
from mettle.agent.lstm import LSTMPolicy
from mettle.agent.mlp import MLPPolicy
from mettle.agent.normalizer import MAX_FEATURES
from mettle.agent.per_type import PerTypePolicy
from mettle.agent.policy import Policy
from mettle.agent.token import TokenPolicy
from mettle.contracts import INVALID_ACTIONS_KEY

if TYPE_CHECKING:
    from mettle.contracts import PolicyEnvInfo

ENTRY_POINT_GROUP = "mettle.policies"
POLICY_KINDS: dict[str, type[Policy]] = {"mlp": MLPPolicy, "lstm": LSTMPolicy, "token": TokenPolicy,
                                         "per_type": PerTypePolicy}
# Specs written before the registry named built-ins by import path; these exact strings map to names.
LEGACY_CLASS_PATHS = {
    "mettle.agent.mlp:MLPPolicy": "mlp",
    "mettle.agent.lstm:LSTMPolicy": "lstm",
    "mettle.agent.token:TokenPolicy": "token",
}
NORMALIZER_KEY = "observation_normalizer"
MAX_AGENT_TYPES = 1024
"""Most agent types a policy spec's invalid-actions table may describe."""
"""The policy spec's entry for an attached observation normaliser (absent when there is none)."""
REGISTER_HINT = (f"register it with mettle.agent.register_policy(name, cls) before loading, "
                 f"or declare it as a {ENTRY_POINT_GROUP!r} entry point of an installed package")

MAX_PARAMETERS = 1 << 30
"""Most parameters (and buffer elements) a policy built from a spec may have: 4 GiB of float32. The largest a
config can ask for (hidden_size 8192: an LSTM of 0.54e9, plus the input layer) fits; more is a damaged spec."""

_registry: dict[str, type[Policy]] = dict(POLICY_KINDS)


def register_policy(name: str, cls: type[Policy]) -> None:
    """Make `cls` buildable by `name`, so checkpoints that name it load without importing anything."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"policy name {name!r} must be a Python identifier (e.g. 'my_policy')")
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise ValueError(f"register_policy({name!r}, {cls!r}): the class must subclass mettle.agent.Policy")
    if _registry.get(name, cls) is not cls:
        raise ValueError(f"policy name {name!r} is already registered to {_registry[name].__qualname__}; "
                         "choose another name")
    _registry[name] = cls


def policy_class(name: str) -> type[Policy]:
    """The class registered (or declared as an entry point) under `name`."""
    if name not in _registry:
        _load_entry_point(name)
    try:
        return _registry[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; registered: {sorted(_registry)}; {REGISTER_HINT}") from None


def policy_name(cls: type[Policy]) -> str:
    """The name `cls` is registered under (the first, built-ins win): what a saved spec calls it."""
    for name, registered in _registry.items():
        if registered is cls:
            return name
    raise ValueError(f"policy class {cls.__qualname__} is not registered, so checkpoints cannot name it; "
                     f"{REGISTER_HINT}")


def _load_entry_point(name: str) -> None:
    """Register the installed entry point called `name`, if a package declares one."""
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name == name:
            try:
                cls = point.load()
            except Exception as error:  # an installed plugin that fails to import: say which
                raise ValueError(f"{ENTRY_POINT_GROUP} entry point {name!r} ({point.value}) failed to load: "
                                 f"{type(error).__name__}: {error}") from None
            register_policy(name, cls)
            return


def build_policy(kind: str, /, **kwargs: Any) -> Policy:
    """A policy of a named kind, so configs need not spell out class paths."""
    if kind not in _registry:
        _load_entry_point(kind)
    if kind not in _registry:
        raise ValueError(f"unknown policy kind {kind!r}; valid kinds: {sorted(_registry)}; {REGISTER_HINT}")
    return _registry[kind](**kwargs)


def policy_spec(policy: Policy) -> dict[str, Any]:
    """{"class": registered name, "kwargs": constructor arguments}: what a checkpoint stores to rebuild `policy`;
    with an observation normaliser also {"observation_normalizer": {"features": F}} (its statistics are weights)."""
    spec: dict[str, Any] = {"class": policy_name(type(policy)), "kwargs": policy.constructor_kwargs()}
    if policy.observation_normalizer is not None:
        spec[NORMALIZER_KEY] = {"features": policy.observation_normalizer.features}
    if policy.invalid_actions is not None:
        spec[INVALID_ACTIONS_KEY] = (policy.invalid_actions > 0.5).tolist()
    return spec


def policy_from_spec(spec: dict[str, Any]) -> Policy:
    """Rebuild an uninitialised policy from `policy_spec`'s description, by registered name only."""
    name = spec.get("class") if isinstance(spec, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"policy spec needs a 'class' naming a registered policy, got {spec!r}")
    cls = policy_class(LEGACY_CLASS_PATHS.get(name, name))
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"policy spec 'kwargs' must be an object, got {kwargs!r}")
    try:
        policy = cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"policy {name!r} rejects kwargs {kwargs!r}: {error}") from None
    features = normalizer_features(spec)
    if features is not None:
        policy.attach_observation_normalizer(features)
    table = invalid_actions_table(spec)
    if table is not None:
        policy.set_invalid_actions(table)
    return policy


def invalid_actions_table(spec: dict[str, Any]) -> np.ndarray | None:
    """The spec's per-agent-type table of masked choices (None: it has none), checked for shape before use."""
    described = spec.get(INVALID_ACTIONS_KEY) if isinstance(spec, dict) else None
    if described is None:
        return None
    rows = described if isinstance(described, list) and 0 < len(described) <= MAX_AGENT_TYPES else None
    widths = {len(row) if isinstance(row, list) else -1 for row in rows or []}
    if rows is None or len(widths) != 1 or not 0 < min(widths) <= MAX_FEATURES or not all(
            isinstance(value, bool) for row in rows for value in row):
        raise ValueError(f"policy spec {INVALID_ACTIONS_KEY!r} must be equal-length lists of true/false (one per "
                         f"agent type, at most {MAX_AGENT_TYPES}), got {repr(described)[:60]}")
    return np.array(rows, dtype=bool)


def normalizer_features(spec: dict[str, Any]) -> int | None:
    """The feature count of the spec's observation normaliser (None: it has none), bounded before anything is built."""
    described = spec.get(NORMALIZER_KEY) if isinstance(spec, dict) else None
    if described is None:
        return None
    if not isinstance(described, dict) or set(described) != {"features"}:
        raise ValueError(f"policy spec {NORMALIZER_KEY!r} must be {{\"features\": count}}, got {repr(described)[:60]}")
    return check_size(f"{NORMALIZER_KEY} features", described["features"], 1, MAX_FEATURES)


def policy_for_environment(spec: dict[str, Any], env_info: PolicyEnvInfo, device: torch.device | str) -> Policy:
    """A policy rebuilt from a spec (data from disk) and sized to `env_info`; one too large is refused unallocated."""
    features = normalizer_features(spec)
    observed = int(np.prod(env_info.observation_space.shape or (), dtype=np.int64))
    if features is not None and features != observed:
        raise ValueError(f"policy spec's {NORMALIZER_KEY} has {features} features, but its observations have "
                         f"{observed}; the spec is damaged")
    count = parameter_count(spec, env_info)
    if count is not None and count > MAX_PARAMETERS:
        raise ValueError(f"policy spec {spec.get('class')!r} would build {count:,} parameters for these spaces, "
                         f"more than the {MAX_PARAMETERS:,} a policy may have; the spec is damaged")
    policy = policy_from_spec(spec)
    policy.initialize_to_environment(env_info, device)
    return policy


def parameter_count(spec: dict[str, Any], env_info: PolicyEnvInfo) -> int | None:
    """Parameters and buffer elements the spec's policy would have, counted on the meta device (no memory used).

    None when the class cannot be built there (its setup reads tensor values): then only its own checks apply.
    """
    policy = policy_from_spec(spec)
    try:
        with torch.device("meta"), SkipRandomInit():
            policy.initialize_to_environment(env_info, "meta")
    except (RuntimeError, NotImplementedError):  # e.g. Tensor.item() on a meta tensor
        return None
    return sum(tensor.numel() for tensor in itertools.chain(policy.parameters(), policy.buffers()))


RANDOM_INITIALIZERS = frozenset({"normal_", "uniform_", "bernoulli_", "cauchy_", "exponential_", "geometric_",
                                 "log_normal_", "random_", "trunc_normal_"})


class SkipRandomInit(TorchFunctionMode):
    """Random fills of meta tensors do nothing: sizing needs no values, and their meta versions import dynamo (~2 s)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
        if getattr(func, "__name__", None) in RANDOM_INITIALIZERS and getattr(target, "is_meta", False):
            return target
        return func(*args, **kwargs)
