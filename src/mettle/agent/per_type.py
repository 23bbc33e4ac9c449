"""One policy per agent type (`policy.share=false`): each type's rows are acted and scored by their own network.

Agents that differ in spaces (`mettle.envs.agent_types`) see a common observation row ending in their type's
one-hot; this wrapper reads that one-hot to pick, per row, the outputs of the type's own sub-policy. Every
sub-policy runs over all rows, so recurrent rollout memory keyed by `rows` works unchanged and all types train in
one update; gradients reach a sub-policy only through its own type's rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mettle.agent.layers import box_shape, check_size, flatten_steps
from mettle.agent.lstm import LSTMPolicy
from mettle.agent.mlp import MLPPolicy
from mettle.agent.policy import NON_MEMORY_FIELDS, Policy, PolicyOutput, TensorSpec

if TYPE_CHECKING:
    from mettle.contracts import PolicyEnvInfo

SUB_KINDS: dict[str, type[Policy]] = {"mlp": MLPPolicy, "lstm": LSTMPolicy}
"""The kinds a per-type policy may hold: those that read a normaliser's output and mask each type's choices."""
MAX_TYPES = 1024
"""Most agent types (sub-policies) a spec may ask for; more is a damaged spec."""


def memory_key(index: int, key: str) -> str:
    """The wrapper's name for sub-policy `index`'s memory field `key`: `type0.lstm_h`."""
    return f"type{index}.{key}"


def by_type(kinds: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """Per row, `values[k]` where the row's type `kinds` [B, T] is k (trailing dimensions broadcast)."""
    chosen = values[0]
    for index, value in enumerate(values[1:], start=1):
        mine = (kinds == index).view(*kinds.shape, *[1] * (value.dim() - kinds.dim()))
        chosen = torch.where(mine, value, chosen)
    return chosen


class PerTypePolicy(Policy):
    """`types` sub-policies of one kind (mlp or lstm), the outputs of each row taken from its type's own.

    Each sub-policy runs over every row (the others' outputs are discarded), so compute grows with the number of
    types. A normaliser, when attached, is the wrapper's (one set of statistics, saved once); the sub-policies read
    its output with the type one-hot left raw, so each still finds its rows' action masks.
    """

    observation_normalization = True
    action_masking = True

    def __init__(self, kind: str = "mlp", types: int = 2, **options: Any) -> None:
        super().__init__()
        if kind not in SUB_KINDS:
            raise ValueError(f"per-type policy kind must be one of {sorted(SUB_KINDS)}, got {repr(kind)[:40]}")
        self.kind = kind
        self.types = check_size("types", types, 1, MAX_TYPES)
        self.policies = nn.ModuleList(SUB_KINDS[kind](**options) for _ in range(self.types))
        self.obs_shape: tuple[int, ...] = ()

    @property
    def subpolicies(self) -> list[Policy]:
        """The sub-policies, type 0 first."""
        return [policy for policy in self.policies if isinstance(policy, Policy)]

    @property
    def is_recurrent(self) -> bool:
        """Recurrent when its sub-policies are."""
        return self.subpolicies[0].is_recurrent

    def initialize_to_environment(self, env_info: PolicyEnvInfo, device: torch.device | str) -> None:
        """Size every sub-policy to the spaces and check that the environment has as many types."""
        self.obs_shape = box_shape(env_info, type(self).__name__)
        named = env_info.extras.get("agent_types")
        features = int(np.prod(self.obs_shape))
        if (named is not None and len(named) != self.types) or features <= self.types:
            found = f"{len(named)} agent types" if named is not None else f"{features} observation features"
            raise ValueError(f"{type(self).__name__} holds {self.types} sub-policies, and the environment has "
                             f"{found}; rebuild the policy for this environment")
        self.fit_invalid_actions(env_info)
        for policy in self.subpolicies:
            policy.initialize_to_environment(env_info, device)
        self.to(device)

    def set_invalid_actions(self, table: np.ndarray) -> None:
        """Mask each type's lacked choices in the wrapper (saved in its spec) and in every sub-policy."""
        super().set_invalid_actions(table)
        for policy in self.subpolicies:
            policy.set_invalid_actions(table)

    def get_agent_experience_spec(self) -> dict[str, TensorSpec]:
        """The sub-policies' observations and actions (alike), and each one's memory under its `typeK.` prefix."""
        specs = [policy.get_agent_experience_spec() for policy in self.subpolicies]
        memory = {memory_key(index, key): value for index, spec in enumerate(specs)
                  for key, value in spec.items() if key not in NON_MEMORY_FIELDS}
        return {key: specs[0][key] for key in NON_MEMORY_FIELDS} | memory

    def forward(
        self,
        observations: torch.Tensor,
        starts: torch.Tensor,
        actions: torch.Tensor | None = None,
        memory: dict[str, torch.Tensor] | None = None,
        rows: slice | None = None,
        deterministic: bool = False,
    ) -> PolicyOutput:
        """Run every sub-policy over all rows, then keep per row its type's actions, scores, values and logits."""
        if not self.obs_shape:
            raise RuntimeError(f"{type(self).__name__}.initialize_to_environment must be called first")
        b, t = observations.shape[:2]
        features = flatten_steps(observations, self.obs_shape)
        one_hot = features[:, features.shape[1] - self.types:]
        kinds = one_hot.argmax(dim=1).view(b, t)  # a dormant all-zero row takes type 0; its outputs go unused
        if self.observation_normalizer is not None:
            scaled = self.normalize_observations(features)[:, :features.shape[1] - self.types]
            observations = torch.cat([scaled, one_hot], dim=1).view(b, t, *self.obs_shape)
        outputs = [policy(observations, starts, actions, self._memory_of(index, memory), rows, deterministic)
                   for index, policy in enumerate(self.subpolicies)]
        logits = [output.logits for output in outputs]
        return PolicyOutput(
            by_type(kinds, [output.actions for output in outputs]),
            by_type(kinds, [output.log_prob for output in outputs]),
            lambda: by_type(kinds, [output.entropy for output in outputs]),
            by_type(kinds, [output.values for output in outputs]),
            {memory_key(index, key): value for index, output in enumerate(outputs)
             for key, value in output.memory.items()},
            None if any(x is None for x in logits) else by_type(kinds, [x for x in logits if x is not None]),
        )

    def export_step(self, observations: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each row's logits and values from its type's sub-policy, as forward picks them; the state is every
        sub-policy's in turn (type 0's fields first), and each sub-policy advances its own over all rows."""
        features = flatten_steps(observations.unsqueeze(1), self.obs_shape)
        one_hot = features[:, features.shape[1] - self.types:]
        kinds = one_hot.argmax(dim=1)
        if self.observation_normalizer is not None:
            scaled = self.normalize_observations(features)[:, :features.shape[1] - self.types]
            observations = torch.cat([scaled, one_hot], dim=1).view(observations.shape)
        share = len(state) // self.types
        outputs = [policy.export_step(observations, *state[index * share:(index + 1) * share])
                   for index, policy in enumerate(self.subpolicies)]
        logits = by_type(kinds, [output[0] for output in outputs])
        values = by_type(kinds, [output[1] for output in outputs])
        return logits, values, *(tensor for output in outputs for tensor in output[2:])

    def _memory_of(self, index: int, memory: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """Sub-policy `index`'s fields of a training window's memory, unprefixed (None: rollout, its own state)."""
        if memory is None:
            return None
        prefix = memory_key(index, "")
        return {key.removeprefix(prefix): value for key, value in memory.items() if key.startswith(prefix)}

    def compile_hot_path(self) -> None:
        """Compile each sub-policy's own hot path."""
        for policy in self.subpolicies:
            policy.compile_hot_path()

    def reset_memory(self) -> None:
        """Forget every sub-policy's rollout memory."""
        for policy in self.subpolicies:
            policy.reset_memory()

    def memory_state(self) -> dict[str, torch.Tensor]:
        """Every sub-policy's rollout memory, each under its `typeK.` prefix."""
        return {memory_key(index, key): value for index, policy in enumerate(self.subpolicies)
                for key, value in policy.memory_state().items()}

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `memory_state` returned, each sub-policy its own fields."""
        for index, policy in enumerate(self.subpolicies):
            policy.load_memory_state(self._memory_of(index, state) or {})

    def constructor_kwargs(self) -> dict[str, Any]:
        """The kind, the number of types and the sub-policies' own arguments, e.g. {"kind": "mlp", "types": 2,
        "hidden_size": 64, ...}."""
        return {"kind": self.kind, "types": self.types, **self.subpolicies[0].constructor_kwargs()}
