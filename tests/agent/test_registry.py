"""Policy specs name registered classes; nothing a spec says is ever imported."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from mettle.agent import MLPPolicy, register_policy, registry
from mettle.agent.registry import policy_from_spec, policy_spec
from mettle.rl.policy_files import CheckpointError, load_policy, save_policy
from mettle.rl.training.environment import PolicyEnvInfo

INFO = PolicyEnvInfo(gym.spaces.Box(-1.0, 1.0, (4,), np.float32), gym.spaces.Discrete(3))


class WidePolicy(MLPPolicy):
    """A user's policy: an MLP with a fixed wide torso."""

    def __init__(self, width: int = 24) -> None:
        super().__init__(hidden_size=width)
        self.width = width

    def constructor_kwargs(self) -> dict[str, Any]:
        return {"width": self.width}


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test stay in that test."""
    monkeypatch.setattr(registry, "_registry", dict(registry.POLICY_KINDS))


def test_registered_user_policy_round_trips_through_files(tmp_path: Path) -> None:
    register_policy("wide", WidePolicy)
    policy = WidePolicy(width=24)
    policy.initialize_to_environment(INFO, "cpu")
    save_policy(policy, INFO, tmp_path)
    assert json.loads((tmp_path / "policy.json").read_text())["policy"] == {"class": "wide", "kwargs": {"width": 24}}
    loaded, _ = load_policy(tmp_path)
    assert type(loaded) is WidePolicy and loaded.width == 24
    obs, starts = torch.randn(2, 1, 4), torch.zeros(2, 1, dtype=torch.bool)
    torch.testing.assert_close(loaded(obs, starts, deterministic=True).values, policy(obs, starts).values)


def test_unregistered_policy_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not registered.*register_policy"):
        policy_spec(WidePolicy())
    register_policy("wide", WidePolicy)
    policy = WidePolicy()
    policy.initialize_to_environment(INFO, "cpu")
    save_policy(policy, INFO, tmp_path)
    registry._registry.pop("wide")
    with pytest.raises(CheckpointError) as caught:
        load_policy(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "policy.json" in message and "'wide'" in message
    assert "register_policy" in message and "mettle.policies" in message


def test_built_in_names_and_old_class_paths_load_without_imports() -> None:
    for name, cls in [("mlp", "mettle.agent.mlp:MLPPolicy"), ("lstm", "mettle.agent.lstm:LSTMPolicy"),
                      ("token", "mettle.agent.token:TokenPolicy")]:
        assert type(policy_from_spec({"class": name})) is type(policy_from_spec({"class": cls}))
    assert policy_spec(MLPPolicy())["class"] == "mlp"


@pytest.mark.parametrize("name", ["this:Foo", "torch.nn:Linear", "os:system", "mettle.agent.mlp.MLPPolicy"])
def test_spec_names_are_never_imported(name: str) -> None:
    before = set(sys.modules)
    with pytest.raises(ValueError, match="unknown policy"):
        policy_from_spec({"class": name})
    assert set(sys.modules) == before


def test_hostile_spec_in_cwd_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass X: pass\n")
    code = ("import sys\nfrom mettle.agent.registry import policy_from_spec, policy_spec\n"
            "try:\n    policy_from_spec({'class': 'evilmod:X'})\nexcept ValueError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert result.stdout.count("\n") == 1 and "'evilmod:X'" in result.stdout and "register_policy" in result.stdout


def test_entry_point_policies_are_found_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = types.ModuleType("mettle_test_plugin")
    plugin.WidePolicy = WidePolicy  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mettle_test_plugin", plugin)
    point = importlib.metadata.EntryPoint("wide", "mettle_test_plugin:WidePolicy", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [point] if group == registry.ENTRY_POINT_GROUP else [])
    assert type(policy_from_spec({"class": "wide", "kwargs": {"width": 8}})) is WidePolicy
    assert policy_spec(WidePolicy())["class"] == "wide"


def test_register_policy_refuses_clashes_and_non_policies() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_policy("mlp", WidePolicy)
    with pytest.raises(ValueError, match="must subclass"):
        register_policy("linear", torch.nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="identifier"):
        register_policy("my:policy", WidePolicy)
    register_policy("mlp", MLPPolicy)  # the same class again is fine


def test_readme_own_policy_example_round_trips(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (code,) = re.findall(r"```py\n(.*?)```", readme, flags=re.S)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    policy = namespace["WideMLP"](width=12)
    policy.initialize_to_environment(INFO, "cpu")
    save_policy(policy, INFO, tmp_path)
    loaded, _ = load_policy(tmp_path)
    assert type(loaded) is namespace["WideMLP"] and loaded.width == 12
