"""A feed-forward actor-critic for flat (or flattened) Box observations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mettle.agent.distributions import act_with_head
from mettle.agent.layers import (
    ACTIVATIONS,
    ACTOR_GAIN,
    CRITIC_GAIN,
    MAX_DEPTH,
    MAX_WIDTH,
    action_layout,
    actions_spec,
    box_shape,
    build_torso,
    check_activation,
    check_log_std,
    check_size,
    dense,
    flatten_steps,
    gaussian_log_std,
    log_std_kwargs,
    orthogonal_linear,
    torso_forward,
    torso_layers,
)
from mettle.agent.policy import Policy, PolicyOutput, TensorSpec

if TYPE_CHECKING:
    from mettle.contracts import PolicyEnvInfo


class MLPPolicy(Policy):
    """Stateless actor-critic; separate actor and critic torsos by default, which suits small control.

    Discrete actions get categorical heads; a Box gets a diagonal Gaussian whose mean is the actor layer's output
    and whose log-std is one parameter per dimension (`log_std`), the same in every state.
    """

    observation_normalization = True
    action_masking = True

    def __init__(self, hidden_size: int = 64, num_layers: int = 2, shared_torso: bool = False,
                 log_std_init: float = 0.0, activation: str = "tanh") -> None:
        super().__init__()
        self.log_std_init = check_log_std(log_std_init)
        self.activation = check_activation(activation)
        self.hidden_size = check_size("hidden_size", hidden_size, 1, MAX_WIDTH)
        self.num_layers = check_size("num_layers", num_layers, 0, MAX_DEPTH)
        self.shared_torso = shared_torso
        self.obs_shape: tuple[int, ...] = ()
        self.nvec: tuple[int, ...] = ()
        self.action_dims = 0
        """Box dimensions of a Gaussian head (0: categorical heads, `nvec`)."""
        self.log_std: nn.Parameter | None = None

    def initialize_to_environment(self, env_info: PolicyEnvInfo, device: torch.device | str) -> None:
        """Size the torsos and heads to the spaces, then move to `device`."""
        self.obs_shape = box_shape(env_info, type(self).__name__)
        self.nvec, self.action_dims = action_layout(env_info)
        in_features = int(np.prod(self.obs_shape))
        out_features = self.hidden_size if self.num_layers else in_features
        torso_args = (in_features, self.hidden_size, self.num_layers, ACTIVATIONS[self.activation])
        self.actor_torso = build_torso(*torso_args)
        self.critic_torso = None if self.shared_torso else build_torso(*torso_args)
        self.actor_head = orthogonal_linear(out_features, sum(self.nvec) + self.action_dims, ACTOR_GAIN)
        self.critic_head = orthogonal_linear(out_features, 1, CRITIC_GAIN)
        self.log_std = gaussian_log_std(self.action_dims, self.log_std_init)
        self.fit_invalid_actions(env_info)
        self.to(device)

    def get_agent_experience_spec(self) -> dict[str, TensorSpec]:
        """Only observations and actions: the policy has no memory to store."""
        self._require_initialized()
        return {
            "observations": TensorSpec(self.obs_shape, torch.float32),
            "actions": actions_spec(self.nvec, self.action_dims),
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
        logits, values = self.heads(flatten_steps(observations, self.obs_shape))
        logits, values = logits.view(b, t, -1), values.view(b, t)
        chosen, log_prob, entropy = act_with_head(logits, self.nvec, self.log_std, actions, deterministic)
        return PolicyOutput(chosen, log_prob, entropy, values, memory={}, logits=logits)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked logits (a Box: the Gaussian's means) [N, width] and values [N, 1] of raw features [N, F]: the
        arithmetic that forward and an exported graph (`export_step`) share."""
        x = self.normalize_observations(features)
        actor_features = torso_features(self.actor_torso, x)
        critic_features = actor_features if self.critic_torso is None else torso_features(self.critic_torso, x)
        logits = dense((self.actor_head.weight, self.actor_head.bias), actor_features)
        logits = self.mask_invalid_actions(logits, features)
        return logits, dense((self.critic_head.weight, self.critic_head.bias), critic_features)

    def export_step(self, observations: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(logits or means [B, width], values [B]) of one step of observations [B, *obs_shape], without sampling."""
        self._require_initialized()
        logits, values = self.heads(flatten_steps(observations.unsqueeze(1), self.obs_shape))
        return logits, values.squeeze(-1)

    def constructor_kwargs(self) -> dict[str, Any]:
        """Constructor arguments that build an identically shaped policy; the registry names its class."""
        kwargs = {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "shared_torso": self.shared_torso}
        activation = {"activation": self.activation} if self.activation != "tanh" else {}  # older specs stay alike
        return kwargs | log_std_kwargs(self.log_std_init) | activation

    def _require_initialized(self) -> None:
        """Fail clearly when used before its layers exist."""
        if not self.nvec and not self.action_dims:
            raise RuntimeError(f"{type(self).__name__}.initialize_to_environment must be called first")


def torso_features(torso: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The torso's output, its layers run as functions (a module call per layer costs more than a 64-wide layer)."""
    return torso_forward(*torso_layers(torso), x)[-1]
