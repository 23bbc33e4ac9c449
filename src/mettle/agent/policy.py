"""The policy contract: sample in rollout, evaluate given actions in training."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from mettle.agent.normalizer import ObservationNormalizer
from mettle.contracts import INVALID_ACTIONS_KEY

if TYPE_CHECKING:
    from mettle.contracts import EnvBatch, PolicyEnvInfo


NON_MEMORY_FIELDS = ("observations", "actions")
"""Experience fields every policy stores that are not recurrent memory (the rest of its spec is memory)."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape (without batch dimensions) and dtype of one per-step experience field."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class PolicyOutput:
    """Result of a policy forward over [rows, time] inputs.

    `entropy` may be given as a function returning it, computed on first read: an acting policy passes one, as
    a rollout never reads the entropy and it costs a few tensor operations on every step.
    """

    __slots__ = ("_entropy", "actions", "log_prob", "logits", "memory", "values")

    actions: torch.Tensor
    """Sampled (rollout) or the given actions (training): [B, T, heads] int64 choices, or for a Box action space
    [B, T, dims] float32, the Gaussian's sample as drawn (not clipped: the environment clips what it is sent)."""
    log_prob: torch.Tensor
    """[B, T] log-probability of `actions` under the current policy."""
    values: torch.Tensor
    """[B, T] critic estimate."""
    memory: dict[str, torch.Tensor]
    """Recurrent state each row had before this call ([B, ...] per field); empty if stateless."""
    logits: torch.Tensor | None
    """[B, T, sum(nvec)] unnormalised action logits, all heads side by side (distillation compares them); for a
    Box action space the Gaussian's mean [B, T, dims] instead (its log-std is a policy parameter, so the mean
    alone does not describe the distribution: the kickstarter refuses Box policies). None from a policy that
    does not expose them."""

    def __init__(
        self,
        actions: torch.Tensor,
        log_prob: torch.Tensor,
        entropy: torch.Tensor | Callable[[], torch.Tensor],
        values: torch.Tensor,
        memory: dict[str, torch.Tensor] | None = None,
        logits: torch.Tensor | None = None,
    ) -> None:
        self.actions, self.log_prob, self._entropy, self.values = actions, log_prob, entropy, values
        self.memory = {} if memory is None else memory
        self.logits = logits

    @property
    def entropy(self) -> torch.Tensor:
        """[B, T] entropy of the action distribution."""
        if not isinstance(self._entropy, torch.Tensor):
            self._entropy = self._entropy()
        return self._entropy

    @entropy.setter
    def entropy(self, value: torch.Tensor) -> None:
        self._entropy = value

    def __repr__(self) -> str:
        shapes = {name: tuple(getattr(self, name).shape) for name in ("actions", "log_prob", "values")}
        return f"PolicyOutput({shapes}, memory={sorted(self.memory)}, logits={self.logits is not None})"


class Policy(nn.Module, ABC):
    """An actor-critic over agent rows; recurrent policies keep one memory per row."""

    observation_normalization: ClassVar[bool] = False
    """Whether `forward` passes its input features through `normalize_observations`, so that a normaliser can be
    attached (`env.normalize_observations=true`); a policy that does not is refused rather than left unnormalised."""
    observation_normalizer: ObservationNormalizer | None
    """Running observation statistics applied to the input (None: features as the environment gives them)."""
    action_masking: ClassVar[bool] = False
    """Whether `forward` passes its logits through `mask_invalid_actions`, so agents that differ in action spaces
    (`mettle.envs.agent_types`) can share it; a policy that does not is refused on such an environment."""
    invalid_actions: torch.Tensor | None
    """[types, sum(nvec)] 1.0 where an agent type's space lacks a choice (None: every row may take every choice).
    A buffer rebuilt from the environment, not a weight: it is not saved."""

    def __init__(self) -> None:
        super().__init__()
        self.observation_normalizer = None
        self.register_buffer("invalid_actions", None, persistent=False)

    def attach_observation_normalizer(self, features: int) -> ObservationNormalizer:
        """Standardise the `features` input features by running statistics from now on (the trainer updates them).

        Attach before `initialize_to_environment`, which moves it to the policy's device, or after it."""
        if not self.observation_normalization:
            raise ValueError(f"{type(self).__name__} does not read its observations through normalize_observations, "
                             "so it cannot normalise them; drop env.normalize_observations or use the mlp or lstm "
                             "policy")
        device = next(iter(self.parameters()), torch.zeros(())).device
        self.observation_normalizer = ObservationNormalizer(features).to(device)
        return self.observation_normalizer

    def set_invalid_actions(self, table: np.ndarray) -> None:
        """Mask, from now on, the choices each agent type lacks ([types, sum(nvec)], True: lacked); a table with
        nothing to mask leaves every choice open."""
        if np.any(table):
            self.invalid_actions = torch.as_tensor(np.asarray(table), dtype=torch.float32)

    def fit_invalid_actions(self, env_info: PolicyEnvInfo) -> None:
        """Take the environment's table of choices to mask (`invalid_actions` in its extras), or keep the one the
        policy was saved with, and check that it fits the actions and observations."""
        table = env_info.extras.get(INVALID_ACTIONS_KEY)
        if table is not None:
            self.set_invalid_actions(table)
        if self.invalid_actions is None:
            return
        types, width = self.invalid_actions.shape
        features = int(np.prod(env_info.observation_space.shape or (), dtype=np.int64))
        choices = 0 if env_info.continuous_actions else sum(env_info.action_nvec)
        if width != choices or features < types:
            raise ValueError(f"{INVALID_ACTIONS_KEY} table [{types}, {width}] does not fit {choices} action choices "
                             f"and {features} observation features; rebuild the policy for this environment")

    def mask_invalid_actions(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Logits [..., sum(nvec)] with each row's invalid choices at the dtype's lowest value, so they get no
        probability (in acting and in the loss alike) and no gradient; the row's agent type is read from the last
        `types` columns of its raw features [N, F], a one-hot (all zero on a dormant row: nothing masked)."""
        invalid = self.invalid_actions
        if invalid is None:
            return logits
        types = features[:, features.shape[1] - invalid.shape[0]:]
        hidden = (types @ invalid) > 0.5
        return logits.masked_fill(hidden.view(logits.shape), torch.finfo(logits.dtype).min)

    def normalize_observations(self, features: torch.Tensor) -> torch.Tensor:
        """[N, F] input features as the layers read them: standardised when a normaliser is attached."""
        normalizer = self.observation_normalizer
        return features if normalizer is None else normalizer(features)

    @abstractmethod
    def initialize_to_environment(self, env_info: PolicyEnvInfo, device: torch.device | str) -> None:
        """Build the layers that depend on the environment's spaces and move them to `device`."""

    @abstractmethod
    def get_agent_experience_spec(self) -> dict[str, TensorSpec]:
        """Per-step fields the experience buffer must store for training (observations, actions, memory)."""

    @abstractmethod
    def forward(
        self,
        observations: torch.Tensor,
        starts: torch.Tensor,
        actions: torch.Tensor | None = None,
        memory: dict[str, torch.Tensor] | None = None,
        rows: slice | None = None,
        deterministic: bool = False,
    ) -> PolicyOutput:
        """Run the policy over observations shaped [B, T, ...].

        With `actions` None, actions are sampled (or the mode with `deterministic`: each head's argmax, a
        Gaussian's mean); otherwise the given actions are scored. `starts` [B, T] marks first steps of
        episodes, where memory resets. Recurrent policies start from `memory` when given (training), else
        from their own memory of `rows` (rollout), which they then advance.
        """

    def export_step(self, observations: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One acting step for an exported graph, without sampling and without memory of its own: observations
        [B, ...] and the recurrent state (the memory fields of the experience spec, in its order) in; logits (a
        Box: the Gaussian's means) [B, width], values [B] and the new state out."""
        raise NotImplementedError(f"{type(self).__name__} cannot be exported: it defines no export_step")

    def compile_hot_path(self) -> None:
        """Compile, with torch.compile, the part of the policy that dominates its compute (here: all of it).

        Shapes are marked dynamic, so new batch sizes and token counts do not each trigger a recompile.
        """
        self.compile(dynamic=True)

    def reset_memory(self) -> None:
        """Forget every row's recurrent state (stateless policies have none)."""

    def memory_state(self) -> dict[str, torch.Tensor]:
        """Every row's rollout memory, so that a checkpoint resumes rollouts exactly (empty if stateless)."""
        return {}

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `memory_state` returned."""

    def act(self, batch: EnvBatch, device: torch.device | str, deterministic: bool = False) -> np.ndarray:
        """Actions for every row of an environment batch, as `send_actions` takes them ([rows, heads] int64, or
        [rows, dims] float32 for a Box, where `deterministic` takes the Gaussian's mean).

        For acting outside training (evaluation, watching): no gradients, and recurrent memory advances per row.
        """
        with torch.inference_mode():
            obs = torch.as_tensor(batch.observations).to(device).unsqueeze(1)
            starts = torch.as_tensor(batch.starts, dtype=torch.bool).to(device).unsqueeze(1)
            output = self(obs, starts, rows=batch.rows, deterministic=deterministic)
        actions: np.ndarray = output.actions[:, 0].cpu().numpy()
        return actions

    @property
    def is_recurrent(self) -> bool:
        """Whether outputs depend on earlier steps of the same row."""
        return False

    def constructor_kwargs(self) -> dict[str, Any]:
        """JSON-able constructor arguments that build an identically shaped policy (the registry supplies its name)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to rebuild itself; define "
                                  "constructor_kwargs() returning the keyword arguments its __init__ takes")
