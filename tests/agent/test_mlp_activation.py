"""policy.activation: the mlp's hidden layers as tanh (default) or ReLU, kept in the saved spec, refused by name
(the CLI rows are in tests/cli/test_cli_errors.py)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from mettle.agent.mlp import MLPPolicy
from mettle.agent.registry import build_policy, policy_from_spec, policy_spec
from mettle.contracts import PolicyEnvInfo

INFO = PolicyEnvInfo(gym.spaces.Box(-1.0, 1.0, (5,), np.float32), gym.spaces.Box(-1.0, 1.0, (2,), np.float32))


def test_relu_torsos_are_built_and_rebuilt_from_the_saved_spec() -> None:
    policy = build_policy("mlp", activation="relu", hidden_size=8)
    policy.initialize_to_environment(INFO, "cpu")
    assert isinstance(policy, MLPPolicy) and policy.critic_torso is not None
    assert [type(m) for m in policy.actor_torso] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
    rebuilt = policy_from_spec(policy_spec(policy))
    rebuilt.initialize_to_environment(INFO, "cpu")
    rebuilt.load_state_dict(policy.state_dict())
    obs = torch.randn(6, 1, 5)
    starts = torch.ones(6, 1, dtype=torch.bool)
    acted = [p(obs, starts, deterministic=True).actions for p in (policy, rebuilt)]
    assert torch.equal(*acted)
    hidden = policy.actor_torso[:2](obs.view(6, 5))
    assert (hidden == 0).any() and (hidden > 0).any(), "ReLU, not tanh: negative units are cut to zero"
    assert "activation" not in build_policy("mlp").constructor_kwargs(), "specs saved before it stay alike"


def test_per_type_mlp_policies_take_the_activation() -> None:
    policy = build_policy("per_type", kind="mlp", types=2, activation="relu", hidden_size=8)
    assert policy.constructor_kwargs()["activation"] == "relu"


@pytest.mark.parametrize("value", ["sigmoid", "ReLU", 1])
def test_an_unknown_activation_is_refused_naming_the_choices(value: object) -> None:
    with pytest.raises(ValueError, match=r"^activation must be one of \['relu', 'tanh'\]"):
        MLPPolicy(activation=value)  # type: ignore[arg-type]
