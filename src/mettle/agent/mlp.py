"""A feed-forward actor-critic for flat (or flattened) Box observations."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from mettle.agent.distributions import act
from mettle.agent.policy import Policy, PolicyOutput, TensorSpec

if TYPE_CHECKING:
    from mettle.contracts import PolicyEnvInfo

HIDDEN_GAIN = math.sqrt(2.0)
ACTOR_GAIN = 0.01
CRITIC_GAIN = 1.0


def orthogonal_linear(in_features: int, out_features: int, gain: float) -> nn.Linear:
    """A Linear layer with orthogonal weights and zero bias, the init PPO is known to train well from."""
    layer = nn.Linear(in_features, out_features)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def build_torso(
    in_features: int, hidden_size: int, num_layers: int, activation: type[nn.Module]
) -> nn.Sequential:
    """Stack `num_layers` (Linear, activation) pairs; zero layers is the identity."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        width = in_features if i == 0 else hidden_size
        layers += [orthogonal_linear(width, hidden_size, HIDDEN_GAIN), activation()]
    return nn.Sequential(*layers)


def box_shape(env_info: PolicyEnvInfo, policy_name: str) -> tuple[int, ...]:
    """The observation shape, rejecting spaces a dense encoder cannot read."""
    space = env_info.observation_space
    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"{policy_name} needs a Box observation space, got {space!r}")
    return tuple(int(d) for d in space.shape)


def flatten_steps(observations: torch.Tensor, obs_shape: tuple[int, ...]) -> torch.Tensor:
    """[B, T, *obs_shape] in any dtype to float32 [B*T, prod(obs_shape)], the encoders' input."""
    b, t = observations.shape[:2]
    if tuple(observations.shape[2:]) != obs_shape:
        raise ValueError(f"observations shaped {tuple(observations.shape)}, expected [B, T, *{obs_shape}]")
    return observations.reshape(b * t, -1).to(torch.float32)


class MLPPolicy(Policy):
    """Stateless actor-critic; separate actor and critic torsos by default, which suits small control."""

    def __init__(self, hidden_size: int = 64, num_layers: int = 2, shared_torso: bool = False) -> None:
        super().__init__()
        if hidden_size < 1 or num_layers < 0:
            raise ValueError(f"hidden_size must be >= 1 and num_layers >= 0, got {hidden_size}, {num_layers}")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.shared_torso = shared_torso
        self.obs_shape: tuple[int, ...] = ()
        self.nvec: tuple[int, ...] = ()

    def initialize_to_environment(self, env_info: PolicyEnvInfo, device: torch.device | str) -> None:
        """Size the torsos and heads to the spaces, then move to `device`."""
        self.obs_shape = box_shape(env_info, type(self).__name__)
        self.nvec = env_info.action_nvec
        in_features = int(np.prod(self.obs_shape))
        out_features = self.hidden_size if self.num_layers else in_features
        torso_args = (in_features, self.hidden_size, self.num_layers, nn.Tanh)
        self.actor_torso = build_torso(*torso_args)
        self.critic_torso = None if self.shared_torso else build_torso(*torso_args)
        self.actor_head = orthogonal_linear(out_features, sum(self.nvec), ACTOR_GAIN)
        self.critic_head = orthogonal_linear(out_features, 1, CRITIC_GAIN)
        self.to(device)

    def get_agent_experience_spec(self) -> dict[str, TensorSpec]:
        """Only observations and actions: the policy has no memory to store."""
        self._require_initialized()
        return {
            "observations": TensorSpec(self.obs_shape, torch.float32),
            "actions": TensorSpec((len(self.nvec),), torch.int64),
        }

    def forward(
        self,
        observations: torch.Tensor,
        starts: torch.Tensor,
        actions: torch.Tensor | None = None,
        memory: dict[str, torch.Tensor] | None = None,
        rows: slice | None = None,
        deterministic: bool = False,
    ) -> PolicyOutput:
        """Score every step on its own: `starts`, `memory` and `rows` do not matter without memory."""
        self._require_initialized()
        b, t = observations.shape[:2]
        x = flatten_steps(observations, self.obs_shape)
        actor_features = self.actor_torso(x)
        critic_features = actor_features if self.critic_torso is None else self.critic_torso(x)
        logits = self.actor_head(actor_features).view(b, t, -1)
        values = self.critic_head(critic_features).view(b, t)
        chosen, log_prob, entropy = act(logits, self.nvec, actions, deterministic)
        return PolicyOutput(actions=chosen, log_prob=log_prob, entropy=entropy, values=values, memory={})

    def rebuild_spec(self) -> dict[str, Any]:
        """Registered name and constructor arguments, enough to build an identically shaped policy."""
        from mettle.agent.registry import policy_name  # the registry imports this module

        return {
            "class": policy_name(type(self)),
            "kwargs": {
                "hidden_size": self.hidden_size,
                "num_layers": self.num_layers,
                "shared_torso": self.shared_torso,
            },
        }

    def _require_initialized(self) -> None:
        """Fail clearly when used before its layers exist."""
        if not self.nvec:
            raise RuntimeError(f"{type(self).__name__}.initialize_to_environment must be called first")
