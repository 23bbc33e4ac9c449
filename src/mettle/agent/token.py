"""An actor-critic for token observations (MettaGrid's (location, feature, value) byte triples).

Each token is embedded without any per-token matrix product: the packed location byte and the
feature id index two tables whose sum, plus the scaled value times a per-feature direction, passes a
ReLU; that is one hidden layer on the one-hot token, folded into table lookups. A permutation-invariant
masked pooling (max, mean or attention) over the non-padding tokens gives one vector per step (max pooling
embeds each distinct token of a batch once), which a Linear layer, an optional LSTM core (the LSTM policy's
per-row memory) and actor/critic heads read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from mettle.agent.distributions import act
from mettle.agent.layers import (
    ACTOR_GAIN,
    CRITIC_GAIN,
    HIDDEN_GAIN,
    MAX_DEPTH,
    MAX_WIDTH,
    box_shape,
    build_torso,
    check_size,
    init_lstm,
    normalize_rows,
    orthogonal_linear,
)
from mettle.agent.lstm import LSTMPolicy
from mettle.agent.policy import PolicyOutput, TensorSpec

if TYPE_CHECKING:
    from mettle.contracts import PolicyEnvInfo

Core = Literal["lstm", "none"]
Pooling = Literal["max", "mean", "attention"]
CORES: tuple[str, ...] = ("lstm", "none")
POOLINGS: tuple[str, ...] = ("max", "mean", "attention")

NUM_IDS = 256
"""Locations and feature ids are bytes, so 256-entry tables cover every token."""
PADDING = 0xFF
"""MettaGrid fills unused token slots with 0xFF; a 0xFF location or feature marks padding."""
DEFAULT_NORMALIZATION = 255.0
"""Value scale for features without a known normalisation: maps a byte into [0, 1]."""


def token_shape(env_info: PolicyEnvInfo, policy_name: str) -> tuple[int, int]:
    """The (num_tokens, 3) uint8 observation shape, rejecting spaces that are not token lists."""
    shape = box_shape(env_info, policy_name)
    space = env_info.observation_space
    if len(shape) != 2 or shape[1] != 3 or shape[0] < 1:
        raise ValueError(f"{policy_name} needs token observations shaped (num_tokens, 3), got shape {shape}")
    if space.dtype != np.uint8:
        raise ValueError(f"{policy_name} needs uint8 token observations, got dtype {space.dtype}")
    return shape[0], shape[1]


def feature_normalizations(extras: Mapping[str, Any]) -> torch.Tensor:
    """Per-feature-id value divisors from the env's extras; missing or unusable entries fall back to 255."""
    norms = torch.full((NUM_IDS,), DEFAULT_NORMALIZATION)
    for raw_id, raw_norm in _normalization_items(extras):
        feature_id, norm = _number(raw_id), _number(raw_norm)
        if feature_id is not None and norm is not None and 0 <= feature_id < NUM_IDS and norm > 0:
            norms[int(feature_id)] = norm
    return norms


def _normalization_items(extras: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """Raw (feature id, normalisation) pairs from 'feature_normalizations' (list or dict) or feature specs."""
    given = extras.get("feature_normalizations")
    if isinstance(given, Mapping):
        return list(given.items())
    if isinstance(given, Sequence) and not isinstance(given, str):
        return list(enumerate(given))
    specs = extras.get("obs_features", extras.get("features"))
    if not isinstance(specs, Sequence) or isinstance(specs, str):
        return []
    return [_spec_pair(spec) for spec in specs]


def _spec_pair(spec: Any) -> tuple[Any, Any]:
    """(id, normalization) of a feature spec given as an object (MettaGrid's) or a dict."""
    if isinstance(spec, Mapping):
        return spec.get("id"), spec.get("normalization")
    return getattr(spec, "id", None), getattr(spec, "normalization", None)


def _number(raw: Any) -> float | None:
    """`raw` as a finite float, or None when it is not one (bad extras must not break the policy)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def padding_mask(tokens: torch.Tensor) -> torch.Tensor:
    """True for real tokens, False for padding (0xFF location or feature), for any leading shape."""
    return (tokens[..., 0] != PADDING) & (tokens[..., 1] != PADDING)


def trim_padding(tokens: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop token slots that are padding in every row: MettaGrid pads most of its buffer, so this is the big saving."""
    used = valid.any(dim=0).nonzero()
    keep = int(used[-1]) + 1 if used.numel() else 1
    return tokens[:, :keep], valid[:, :keep]


class TokenEncoder(nn.Module):
    """Embed a set of tokens and pool it into one vector; padding never reaches the output."""

    value_scale: torch.Tensor

    def __init__(self, embed_size: int, out_size: int, pooling: Pooling, num_heads: int, token_layers: int) -> None:
        super().__init__()
        self.embed_size = embed_size
        self.pooling = pooling
        self.num_heads = num_heads
        self.location_embed = nn.Embedding(NUM_IDS, embed_size)
        # Per feature id: a bias, and a direction the scaled value moves along (two tables: a split one would
        # concatenate a gradient the size of every token's embedding in backward).
        self.feature_bias = nn.Embedding(NUM_IDS, embed_size)
        self.feature_direction = nn.Embedding(NUM_IDS, embed_size)
        self.register_buffer("value_scale", torch.full((NUM_IDS,), 1.0 / DEFAULT_NORMALIZATION))
        self.token_mlp = build_torso(embed_size, embed_size, token_layers, nn.ReLU)
        self.query = nn.Parameter(torch.zeros(num_heads, embed_size // num_heads)) if pooling == "attention" else None
        self.project = orthogonal_linear(embed_size, out_size, HIDDEN_GAIN)
        self.pool_distinct: Callable[[TokenEncoder, torch.Tensor, torch.Tensor], torch.Tensor] = max_pool_distinct
        self._init_embeddings()

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """torch.compile the dense paths; distinct-token pooling has data-dependent shapes, so it stays eager.

        The eager marker is set here rather than by a decorator: that would import dynamo (~2 s) in every process.
        """
        self.pool_distinct = torch.compiler.disable(max_pool_distinct)  # type: ignore[no-untyped-call]
        super().compile(*args, **kwargs)

    def _init_embeddings(self) -> None:
        """Unit-variance pre-activations: location, bias and value terms each contribute a third."""
        for table in (self.location_embed, self.feature_bias, self.feature_direction):
            nn.init.normal_(table.weight, std=1.0 / math.sqrt(3.0))

    def set_normalizations(self, norms: torch.Tensor) -> None:
        """Divide each feature's values by its normalisation so values land near [0, 1]."""
        if self.value_scale.is_meta:  # built only to be sized (registry.parameter_count): there are no values
            return
        self.value_scale.copy_(1.0 / norms.to(self.value_scale))

    def forward(self, tokens: torch.Tensor, static: bool = False) -> torch.Tensor:
        """[N, num_tokens, 3] tokens (any dtype holding bytes) to [N, out_size] ReLU features.

        `static`: every token slot embedded and pooled, padding included (it pools to nothing), so no shape depends
        on the data (an exported graph); the same features as the default path, which skips padding."""
        valid = padding_mask(tokens)
        if static:
            pooled = self.pool(self.embed(tokens.long(), valid), valid)
        elif self.pooling == "max" and not len(self.token_mlp):
            pooled = self.pool_distinct(self, tokens, valid)
        else:
            tokens, valid = trim_padding(tokens, valid)
            pooled = self.pool(self.embed(tokens.long(), valid), valid)
        return torch.relu(self.project(pooled))

    def embed(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-token ReLU features [N, n, embed], zero on padding so that max and sum pooling ignore it."""
        location, feature = tokens[..., 0].contiguous(), tokens[..., 1].contiguous()  # strided ids gather slowly
        x = self.preactivation(location, feature, tokens[..., 2])
        # In place where autograd allows (no saved tensor is overwritten): fresh large tensors are slow on CPU.
        x = x.mul_(valid.unsqueeze(-1).to(x.dtype)).relu_()
        if len(self.token_mlp):
            x = self.token_mlp(x) * valid.unsqueeze(-1).to(x.dtype)
        return x

    def preactivation(self, location: torch.Tensor, feature: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Location plus feature embedding plus the scaled value along the feature's direction: [..., embed]."""
        scaled = (value * self.value_scale[feature]).unsqueeze(-1)
        bias, direction = self.feature_bias(feature), self.feature_direction(feature)
        x: torch.Tensor = self.location_embed(location).add_(bias).addcmul_(scaled, direction)
        return x

    def pool(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One vector per row over its real tokens; rows with none pool to zeros."""
        if self.pooling == "max":
            return x.amax(dim=1)  # features are >= 0 and padding is 0, so padding never wins
        if self.pooling == "mean":
            return x.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
        return self._attend(x, valid)

    def _attend(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of learned queries over the tokens; padding gets no weight."""
        assert self.query is not None
        n, t, _ = x.shape
        heads = x.view(n, t, self.num_heads, -1)
        scores = torch.einsum("nthd,hd->nth", heads, self.query) / math.sqrt(heads.shape[-1])
        scores = scores.masked_fill(~valid.unsqueeze(-1), torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=1)  # an all-padding row spreads weight over zeros: no NaN
        return torch.einsum("nth,nthd->nhd", weights, heads).reshape(n, -1)


def max_pool_distinct(encoder: TokenEncoder, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Max pooling that embeds each distinct (location, feature, value) token once.

    A MettaGrid minibatch holds about 10x fewer distinct tokens than tokens, so the embeddings (and
    their backward pass) cover only the distinct ones, and `embedding_bag`'s max mode pools each row's
    tokens from that table without building an [N, tokens, embed] tensor. Padding stays out of the
    bags: features are >= 0, so every row pools as it would with padding at zero, and a row with no
    real token pools to zeros. Values equal `amax` over `embed`; gradients go to one winner per channel.
    """
    real = tokens[valid].int()  # [K, 3], row after row; int32 keys sort twice as fast as int64
    keys = (real[:, 0] << 16) | (real[:, 1] << 8) | real[:, 2]
    distinct, which = torch.unique(keys, return_inverse=True)
    location, feature, value = (distinct >> 16).long(), ((distinct >> 8) & 0xFF).long(), distinct & 0xFF
    table = encoder.preactivation(location, feature, value).relu_()
    counts = valid.sum(dim=1)
    pooled: torch.Tensor = nn.functional.embedding_bag(which, table, counts.cumsum(0) - counts, mode="max")
    return pooled


class TokenPolicy(LSTMPolicy):
    """Actor-critic over MettaGrid-style token lists; inherits the LSTM policy's per-row memory handling."""

    observation_normalization = False
    """Tokens are (location, feature, value) triples: each feature's values are scaled by the env's own figures."""
    action_masking = False
    """Token observations carry no agent-type columns to read a mask from."""

    def __init__(
        self,
        hidden_size: int = 128,
        embed_size: int = 32,
        core: Core = "lstm",
        pooling: Pooling = "max",
        num_heads: int = 4,
        token_layers: int = 0,
    ) -> None:
        super().__init__(hidden_size=hidden_size)
        _check_config(embed_size, core, pooling, num_heads, token_layers)
        self.embed_size = embed_size
        self.core = core
        self.pooling = pooling
        self.num_heads = num_heads
        self.token_layers = token_layers

    @property
    def is_recurrent(self) -> bool:
        """Only the LSTM core carries state between steps."""
        return self.core == "lstm"

    def initialize_to_environment(self, env_info: PolicyEnvInfo, device: torch.device | str) -> None:
        """Build encoder, core and heads, read per-feature value scales from the extras, then move to `device`."""
        if env_info.continuous_actions:
            raise ValueError(f"{type(self).__name__} acts with categorical heads, and the action space is "
                             f"{env_info.action_space}; use policy.kind=mlp or lstm, which have a Gaussian head")
        self.obs_shape = token_shape(env_info, type(self).__name__)
        self.nvec = env_info.action_nvec
        encoder = TokenEncoder(self.embed_size, self.hidden_size, self.pooling, self.num_heads, self.token_layers)
        encoder.set_normalizations(feature_normalizations(env_info.extras))
        self.encoder = encoder
        if self.core == "lstm":
            self.lstm = nn.LSTM(self.hidden_size, self.hidden_size, batch_first=True)
            init_lstm(self.lstm)
        self.actor_head = orthogonal_linear(self.hidden_size, sum(self.nvec), ACTOR_GAIN)
        self.critic_head = orthogonal_linear(self.hidden_size, 1, CRITIC_GAIN)
        self.reset_memory()
        self.to(device)

    def get_agent_experience_spec(self) -> dict[str, TensorSpec]:
        """Token observations kept as uint8 (4x smaller than floats), actions, and (h, c) with the LSTM core."""
        self._require_initialized()
        spec = {
            "observations": TensorSpec(self.obs_shape, torch.uint8),
            "actions": TensorSpec((len(self.nvec),), torch.int64),
        }
        if self.core == "lstm":
            state = TensorSpec((self.hidden_size,), torch.float32)
            spec |= {"lstm_h": state, "lstm_c": state}
        return spec

    def forward(
        self,
        observations: torch.Tensor,
        starts: torch.Tensor,
        actions: torch.Tensor | None = None,
        memory: dict[str, torch.Tensor] | None = None,
        rows: slice | None = None,
        deterministic: bool = False,
    ) -> PolicyOutput:
        """Encode [B, T, num_tokens, 3] tokens, then run the core and heads as the LSTM policy does."""
        self._require_initialized()
        b, t = observations.shape[:2]
        if observations.dim() != 4 or observations.shape[-1] != 3:
            raise ValueError(f"observations shaped {tuple(observations.shape)}, expected [B, T, num_tokens, 3]")
        if tuple(starts.shape) != (b, t):
            raise ValueError(f"starts shaped {tuple(starts.shape)}, expected [B, T] = [{b}, {t}]")
        x, _ = self.encode(observations)
        hidden, memory_out = self._recur(x, starts, memory, rows) if self.core == "lstm" else (x, {})
        logits = self.actor_head(hidden)
        values = self.critic_head(hidden).squeeze(-1)
        chosen, log_prob, entropy = act(logits, self.nvec, actions, deterministic)
        return PolicyOutput(chosen, log_prob, entropy, values, memory_out, logits)

    def encode(self, observations: torch.Tensor, static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The core's input [B, T, hidden] from tokens [B, T, num_tokens, 3], and the tokens as rows [B*T, F]."""
        b, t = observations.shape[:2]
        rows = observations.reshape(b * t, *observations.shape[2:])
        return self.encoder(rows, static).view(b, t, -1), rows.reshape(b * t, -1)

    def _recur(
        self, x: torch.Tensor, starts: torch.Tensor, memory: dict[str, torch.Tensor] | None, rows: slice | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Unroll from given memory (training) or the rows' own state (rollout, which advances it)."""
        if memory is not None:
            h0, c0 = self._given_state(memory, x.shape[0])
            hidden, _, _ = self.unroll(x, h0, c0, starts)
        else:
            rows = normalize_rows(rows, x.shape[0])
            h0, c0 = self._row_state(rows, x)
            hidden, h_n, c_n = self.unroll(x, h0, c0, starts)
            self._write_rows(rows, h_n, c_n)
        return hidden, {"lstm_h": h0, "lstm_c": c0}

    def constructor_kwargs(self) -> dict[str, Any]:
        """Constructor arguments (value scales travel in the state dict); the registry names its class."""
        return {
            "hidden_size": self.hidden_size,
            "embed_size": self.embed_size,
            "core": self.core,
            "pooling": self.pooling,
            "num_heads": self.num_heads,
            "token_layers": self.token_layers,
        }


def _check_config(embed_size: int, core: str, pooling: str, num_heads: int, token_layers: int) -> None:
    """Reject settings the layers cannot be built from, naming the bad value."""
    if core not in CORES:
        raise ValueError(f"core must be one of {CORES}, got {core!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    check_size("embed_size", embed_size, 1, MAX_WIDTH)
    check_size("token_layers", token_layers, 0, MAX_DEPTH)
    check_size("num_heads", num_heads, 1, MAX_WIDTH)
    if pooling == "attention" and embed_size % num_heads:
        raise ValueError(f"attention pooling needs embed_size ({embed_size}) divisible by num_heads ({num_heads})")
