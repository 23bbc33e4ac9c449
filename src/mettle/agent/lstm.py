"""A recurrent actor-critic: dense encoder, one LSTM layer, actor and critic heads on its output."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mettle.agent.distributions import act_with_head
from mettle.agent.layers import (
    ACTOR_GAIN,
    CRITIC_GAIN,
    MAX_DEPTH,
    MAX_WIDTH,
    action_layout,
    actions_spec,
    box_shape,
    build_torso,
    check_log_std,
    check_size,
    flatten_steps,
    gaussian_log_std,
    init_lstm,
    log_std_kwargs,
    normalize_rows,
    orthogonal_linear,
)
from mettle.agent.policy import Policy, PolicyOutput, TensorSpec

if TYPE_CHECKING:
    from mettle.contracts import PolicyEnvInfo

MEMORY_KEYS = ("lstm_h", "lstm_c")


def chunk_bounds(starts: torch.Tensor, per_step: bool = False) -> list[int]:
    """Time indices splitting [0, T) wherever some row starts an episode; runs between need no resets."""
    t = starts.shape[1]
    if per_step:
        return list(range(t + 1))
    if t == 1:
        return [0, 1]
    inner = (starts[:, 1:].any(dim=0).nonzero().flatten() + 1).tolist()
    return [0, *inner, t]


class LSTMPolicy(Policy):
    """Recurrent actor-critic that keeps each agent row's (h, c) between rollout calls.

    Its action heads are MLPPolicy's: categorical for Discrete/MultiDiscrete, a diagonal Gaussian for a Box.
    """

    observation_normalization = True
    action_masking = True

    def __init__(self, hidden_size: int = 128, encoder_layers: int = 1, log_std_init: float = 0.0) -> None:
        super().__init__()
        self.log_std_init = check_log_std(log_std_init)
        self.hidden_size = check_size("hidden_size", hidden_size, 1, MAX_WIDTH)
        self.encoder_layers = check_size("encoder_layers", encoder_layers, 0, MAX_DEPTH)
        self.obs_shape: tuple[int, ...] = ()
        self.nvec: tuple[int, ...] = ()
        self.action_dims = 0
        """Box dimensions of a Gaussian head (0: categorical heads, `nvec`)."""
        self.log_std: nn.Parameter | None = None
        self._h: torch.Tensor | None = None
        self._c: torch.Tensor | None = None

    @property
    def is_recurrent(self) -> bool:
        """Outputs depend on the row's earlier steps through (h, c)."""
        return True

    def initialize_to_environment(self, env_info: PolicyEnvInfo, device: torch.device | str) -> None:
        """Size encoder, LSTM and heads to the spaces, forget all memory, then move to `device`."""
        self.obs_shape = box_shape(env_info, type(self).__name__)
        self.nvec, self.action_dims = action_layout(env_info)
        in_features = int(np.prod(self.obs_shape))
        self.encoder: nn.Module = build_torso(in_features, self.hidden_size, self.encoder_layers, nn.ReLU)
        lstm_in = self.hidden_size if self.encoder_layers else in_features
        self.lstm = nn.LSTM(lstm_in, self.hidden_size, batch_first=True)
        init_lstm(self.lstm)
        self.actor_head = orthogonal_linear(self.hidden_size, sum(self.nvec) + self.action_dims, ACTOR_GAIN)
        self.critic_head = orthogonal_linear(self.hidden_size, 1, CRITIC_GAIN)
        self.log_std = gaussian_log_std(self.action_dims, self.log_std_init)
        self.fit_invalid_actions(env_info)
        self.reset_memory()
        self.to(device)

    def get_agent_experience_spec(self) -> dict[str, TensorSpec]:
        """Observations, actions and the (h, c) each step began from, so training can replay windows."""
        self._require_initialized()
        state = TensorSpec((self.hidden_size,), torch.float32)
        return {
            "observations": TensorSpec(self.obs_shape, torch.float32),
            "actions": actions_spec(self.nvec, self.action_dims),
            **{key: state for key in MEMORY_KEYS},
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
        """Unroll from `memory` (training, internal state untouched) or from the rows' own state (rollout)."""
        self._require_initialized()
        b, t = observations.shape[:2]
        if tuple(starts.shape) != (b, t):
            raise ValueError(f"starts shaped {tuple(starts.shape)}, expected [B, T] = [{b}, {t}]")
        x, features = self.encode(observations)
        if memory is not None:
            h0, c0 = self._given_state(memory, b)
            hidden, _, _ = self.unroll(x, h0, c0, starts)
        else:
            rows = normalize_rows(rows, b)
            h0, c0 = self._row_state(rows, x)
            hidden, h_n, c_n = self.unroll(x, h0, c0, starts)
            self._write_rows(rows, h_n, c_n)
        logits, values = self.heads(hidden, features)
        chosen, log_prob, entropy = act_with_head(logits, self.nvec, self.log_std, actions, deterministic)
        memory_out = {"lstm_h": h0, "lstm_c": c0}
        return PolicyOutput(chosen, log_prob, entropy, values, memory_out, logits)

    def encode(self, observations: torch.Tensor, static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The core's input [B, T, hidden] and the raw features [B*T, F] that masks are read from.

        `static`: only shapes known before the data is seen (an exported graph); a dense encoder has no other."""
        b, t = observations.shape[:2]
        features = flatten_steps(observations, self.obs_shape)
        return self.encoder(self.normalize_observations(features)).view(b, t, -1), features

    def heads(self, hidden: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked logits (a Box: the Gaussian's means) [B, T, width] and values [B, T] of the core's output."""
        return self.mask_invalid_actions(self.actor_head(hidden), features), self.critic_head(hidden).squeeze(-1)

    def export_step(self, observations: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(logits or means [B, width], values [B], h' [B, hidden], c' [B, hidden]) of one step of observations
        [B, ...] from the state (h, c) given; the caller zeroes the state where an episode starts, as `starts` does."""
        self._require_initialized()
        x, features = self.encode(observations.unsqueeze(1), static=True)
        if not self.is_recurrent:
            logits, values = self.heads(x, features)
            return logits[:, 0], values[:, 0]
        h, c = state
        hidden, (h_n, c_n) = self.lstm(x, (h.unsqueeze(0), c.unsqueeze(0)))
        logits, values = self.heads(hidden, features)
        return logits[:, 0], values[:, 0], h_n[0], c_n[0]

    def compile_hot_path(self) -> None:
        """Compile the encoder only: the unroll's chunking depends on where episodes start in the data."""
        self.encoder.compile(dynamic=True)

    def unroll(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, starts: torch.Tensor, per_step: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the LSTM over [B, T, F], zeroing state before every start; one LSTM call per reset-free run."""
        outputs: list[torch.Tensor] = []
        bounds = chunk_bounds(starts, per_step)
        for lo, hi in itertools.pairwise(bounds):
            keep = (~starts[:, lo]).unsqueeze(-1).to(h.dtype)
            state = ((h * keep).unsqueeze(0).contiguous(), (c * keep).unsqueeze(0).contiguous())
            out, (h_next, c_next) = self.lstm(x[:, lo:hi], state)
            h, c = h_next[0], c_next[0]
            outputs.append(out)
        hidden = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return hidden, h, c

    def reset_memory(self) -> None:
        """Drop every row's state; rows start again from zeros on their next rollout call."""
        self._h = None
        self._c = None

    def memory_state(self) -> dict[str, torch.Tensor]:
        """Every row's (h, c), for checkpoints that resume rollouts exactly."""
        if self._h is None or self._c is None:
            return {}
        return {"lstm_h": self._h.detach().clone(), "lstm_c": self._c.detach().clone()}

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `memory_state` (empty means no row has state yet)."""
        if not state:
            self.reset_memory()
            return
        self._h, self._c = state["lstm_h"].clone(), state["lstm_c"].clone()

    def constructor_kwargs(self) -> dict[str, Any]:
        """Constructor arguments that build an identically shaped policy; the registry names its class."""
        kwargs = {"hidden_size": self.hidden_size, "encoder_layers": self.encoder_layers}
        return kwargs | log_std_kwargs(self.log_std_init)

    def _given_state(self, memory: dict[str, torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate and return the stored (h, c) a training window starts from."""
        missing = [key for key in MEMORY_KEYS if key not in memory]
        if missing:
            raise ValueError(f"memory lacks {missing}; LSTMPolicy needs {list(MEMORY_KEYS)}")
        h, c = memory["lstm_h"], memory["lstm_c"]
        if tuple(h.shape) != (batch, self.hidden_size) or h.shape != c.shape:
            raise ValueError(
                f"memory shaped {tuple(h.shape)}/{tuple(c.shape)}, expected [{batch}, {self.hidden_size}]"
            )
        return h, c

    def _row_state(self, rows: slice, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the rows' current state (copies, because the state is overwritten after the call)."""
        self._ensure_rows(rows.stop, like.device)
        assert self._h is not None and self._c is not None
        return self._h[rows].clone(), self._c[rows].clone()

    def _ensure_rows(self, count: int, device: torch.device) -> None:
        """Grow the state to cover `count` rows, keeping existing rows; new rows start at zero."""
        size = 0 if self._h is None else self._h.shape[0]
        # An inference-mode tensor cannot be written outside inference mode, so rebuild it then.
        stale = self._h is not None and (
            self._h.device != device or (self._h.is_inference() and not torch.is_inference_mode_enabled())
        )
        if size >= count and not stale:
            return
        self._h = _grown(self._h, max(size, count), self.hidden_size, device)
        self._c = _grown(self._c, max(size, count), self.hidden_size, device)

    def _write_rows(self, rows: slice, h: torch.Tensor, c: torch.Tensor) -> None:
        """Store the rows' new state, detached: rollout memory never carries gradients."""
        assert self._h is not None and self._c is not None
        self._h[rows] = h.detach()
        self._c[rows] = c.detach()

    def _require_initialized(self) -> None:
        """Fail clearly when used before its layers exist."""
        if not self.nvec and not self.action_dims:
            raise RuntimeError(f"{type(self).__name__}.initialize_to_environment must be called first")


def _grown(old: torch.Tensor | None, rows: int, hidden: int, device: torch.device) -> torch.Tensor:
    """A zero state for `rows` rows on `device`, with `old`'s rows copied in."""
    new = torch.zeros(rows, hidden, dtype=torch.float32, device=device)
    if old is not None:
        new[: old.shape[0]] = old.to(device)
    return new
