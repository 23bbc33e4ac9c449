"""Building blocks every policy reuses: orthogonal init, dense torsos, observation checks, LSTM init, row slices."""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, SupportsIndex

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from mettle.agent.policy import TensorSpec

if TYPE_CHECKING:
    from mettle.contracts import PolicyEnvInfo

HIDDEN_GAIN = math.sqrt(2.0)
ACTOR_GAIN = 0.01
CRITIC_GAIN = 1.0
MAX_WIDTH = 8192
"""Widest layer a built-in policy takes (PolicyConfig.hidden_size allows the same): a wider one is a damaged spec."""
MAX_DEPTH = 64
"""Most stacked layers a built-in policy takes: more is a damaged spec, whose build would run for minutes."""


def check_size(name: str, value: object, low: int, high: int) -> int:
    """`value` as an int in [low, high], else a ValueError naming the argument, so a bad spec never allocates."""
    if isinstance(value, bool) or not isinstance(value, SupportsIndex) or not low <= operator.index(value) <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {repr(value)[:40]}")
    return operator.index(value)


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


Dense = tuple[torch.Tensor, torch.Tensor]
"""A Linear layer's (weight, bias)."""


ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
"""Hidden-layer activations an MLP torso may use, by the name configs give."""
ACTIVATION_NAMES = {cls: name for name, cls in ACTIVATIONS.items()}


def check_activation(value: object) -> str:
    """`value` if it names one of ACTIVATIONS, else a ValueError naming `activation` and the choices."""
    if value not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {value!r}")
    return str(value)


def torso_layers(torso: nn.Sequential) -> tuple[list[Dense], str]:
    """The (weight, bias) of each Linear in a (Linear, activation)* torso, checked to be just that, and the
    activation's name (one for every layer)."""
    modules = list(torso)
    linears = [m for m in modules[0::2] if isinstance(m, nn.Linear)]
    names = [ACTIVATION_NAMES.get(type(m)) for m in modules[1::2]]
    if len(linears) * 2 != len(modules) or None in names or len(set(names)) > 1:
        raise ValueError(f"expected a torso of (Linear, Tanh) or (Linear, ReLU) pairs, one kind, got {torso}")
    return [(m.weight, m.bias) for m in linears], str(names[0]) if names else "tanh"


def dense(layer: Dense, x: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias, as nn.Linear computes it (without a module call: they cost more than the math here)."""
    return torch.addmm(layer[1], x, layer[0].t())


def torso_forward(layers: list[Dense], activation: str, x: torch.Tensor) -> list[torch.Tensor]:
    """The torso's input and each layer's activated output (the hand-written backward needs them all)."""
    acts = [x]
    for layer in layers:
        out = dense(layer, acts[-1])
        acts.append(out.tanh_() if activation == "tanh" else out.relu_())
    return acts


def box_shape(env_info: PolicyEnvInfo, policy_name: str) -> tuple[int, ...]:
    """The observation shape, rejecting spaces a dense encoder cannot read."""
    space = env_info.observation_space
    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"{policy_name} needs a Box observation space, got {space!r}")
    return tuple(int(d) for d in space.shape)


def action_layout(env_info: PolicyEnvInfo) -> tuple[tuple[int, ...], int]:
    """(nvec, Box dims): categorical head sizes and 0, or () and the Box's flat size; the actor layer is as wide
    as sum(nvec) + dims. A Box of integers is refused: a Gaussian head draws real numbers."""
    if not env_info.continuous_actions:
        return env_info.action_nvec, 0
    space = env_info.action_space
    if not np.issubdtype(space.dtype, np.floating):
        raise ValueError(f"action space {space} holds integers; a Gaussian head needs a float Box "
                         "(use Discrete/MultiDiscrete for integer actions)")
    return (), env_info.action_width


MAX_ABS_LOG_STD = 20.0
"""Widest initial log-std a Gaussian head takes (std from 2e-9 to 5e8): beyond it is a damaged spec."""


def check_log_std(value: object) -> float:
    """`value` as a float in [-MAX_ABS_LOG_STD, MAX_ABS_LOG_STD], else a ValueError naming `log_std_init`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= MAX_ABS_LOG_STD:
        raise ValueError(f"log_std_init must be a number in [-{MAX_ABS_LOG_STD:g}, {MAX_ABS_LOG_STD:g}], "
                         f"got {repr(value)[:40]}")
    return float(value)


def gaussian_log_std(dims: int, init: float = 0.0) -> nn.Parameter | None:
    """The state-independent log-std [dims] of a Gaussian head, `init` at first (0: std 1); None without Box
    actions."""
    return nn.Parameter(torch.full((dims,), init)) if dims else None


def log_std_kwargs(init: float) -> dict[str, float]:
    """`log_std_init` for constructor_kwargs when it is not the default 0 (so specs saved before it stay alike)."""
    return {"log_std_init": init} if init else {}


def actions_spec(nvec: tuple[int, ...], dims: int) -> TensorSpec:
    """One stored action: int64 per categorical head, or float32 per Box dimension (the sample, unclipped)."""
    return TensorSpec((dims,), torch.float32) if dims else TensorSpec((len(nvec),), torch.int64)


def flatten_steps(observations: torch.Tensor, obs_shape: tuple[int, ...]) -> torch.Tensor:
    """[B, T, *obs_shape] in any dtype to float32 [B*T, prod(obs_shape)], the encoders' input."""
    b, t = observations.shape[:2]
    if tuple(observations.shape[2:]) != obs_shape:
        raise ValueError(f"observations shaped {tuple(observations.shape)}, expected [B, T, *{obs_shape}]")
    return observations.reshape(b * t, -1).to(torch.float32)


def init_lstm(lstm: nn.LSTM, forget_bias: float = 1.0) -> None:
    """Orthogonal weights per gate and zero biases, with a forget-gate bias so early memories persist."""
    hidden = lstm.hidden_size
    with torch.no_grad():
        for name, param in lstm.named_parameters():
            if name.startswith("weight"):
                for gate in param.chunk(4, dim=0):
                    nn.init.orthogonal_(gate, 1.0)
            else:
                param.zero_()
        # PyTorch orders the gates (input, forget, cell, output).
        lstm.get_parameter("bias_ih_l0")[hidden : 2 * hidden].fill_(forget_bias)


def normalize_rows(rows: slice | None, batch: int) -> slice:
    """Concrete [start, stop) rows for a batch of `batch` rows; None means rows 0..batch."""
    if rows is None:
        return slice(0, batch)
    if rows.step not in (None, 1):
        raise ValueError(f"rows must be a contiguous slice, got {rows}")
    start = rows.start or 0
    stop = start + batch if rows.stop is None else rows.stop
    if stop - start != batch:
        raise ValueError(f"rows {start}:{stop} hold {stop - start} rows but the batch has {batch}")
    return slice(start, stop)
