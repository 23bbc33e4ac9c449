"""Agents that differ in spaces, seen by one shared policy: a common observation row and a common action layout.

An agent's *type* is its role, the PettingZoo name before the last `_` (`adversary_2` -> `adversary`; a name with
no `_` is its own role), split further where agents of one role differ in spaces; types are numbered in the order
of `possible_agents`. Names carry roles that spaces alone miss (simple_crypto's `alice_0` and `bob_0` observe
and act alike but play opposite parts), and the split keeps every type's spaces, hence its action mask, fixed.

When every agent shares both spaces nothing changes (`AgentLayout.shared`). Otherwise:

* observations: each agent's features flattened, zero-padded to the widest, then one column per type holding the
  agent's type one-hot (so the policy can tell roles apart and find its action mask);
* actions: the union of the agents' Discrete/MultiDiscrete spaces: as many heads as the agent with most, each as
  wide as its widest; `invalid` marks, per type, the logits of choices its space lacks (a head it does not have
  keeps only choice 0, which is ignored). Policies mask those logits when acting and when scoring, so no agent
  samples a choice it lacks and PPO's log-probabilities and entropy are those of the masked distribution.

Box action spaces that differ are refused: there is no masking of a Gaussian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from mettle.contracts import INVALID_ACTIONS_KEY
from mettle.envs.spaces import ActionConverter, ObservationWriter

__all__ = ["AgentLayout", "agent_role"]


def agent_role(agent: str) -> str:
    """The PettingZoo name without its trailing `_<index>`: `adversary_2` -> `adversary`."""
    return agent.rpartition("_")[0] or agent


@dataclass(frozen=True)
class AgentType:
    """One group of agents sharing a role and both spaces."""

    name: str
    observation_space: gym.Space[Any]
    action_space: gym.Space[Any]


def _nvec(space: gym.Space[Any]) -> tuple[int, ...]:
    """Choices per head of a Discrete (one head) or MultiDiscrete space."""
    if isinstance(space, gym.spaces.Discrete):
        return (int(space.n),)
    assert isinstance(space, gym.spaces.MultiDiscrete), f"{space} has no choices per head"
    return tuple(int(n) for n in np.asarray(space.nvec).reshape(-1))


class AgentLayout:
    """How the rows of agents with different spaces are written and read; `shared` when they do not differ."""

    def __init__(self, spaces: dict[str, tuple[gym.Space[Any], gym.Space[Any]]], error: type[ValueError],
                 prefix: str, remedy: str) -> None:
        pairs = list(spaces.values())
        self.shared = all(pair[0] == pairs[0][0] and pair[1] == pairs[0][1] for pair in pairs)
        self.types: list[AgentType] = []
        self.type_of: dict[str, int] = {}
        for agent, (obs_space, act_space) in spaces.items():
            self.type_of[agent] = self._type_index(AgentType(agent_role(agent), obs_space, act_space))
        if self.shared:
            return
        _refuse_boxes(spaces, error, prefix)
        self.writers = [ObservationWriter(t.observation_space, error, f"{prefix}{t.name}: ", remedy)
                        for t in self.types]
        self.widths = [int(np.prod(w.space.shape, dtype=np.int64)) for w in self.writers]
        self.padded = max(self.widths)
        self.observation_space = self._observation_space()
        self.action_space, self.invalid = self._union_actions()
        self.converters = [ActionConverter(t.action_space, 1, error, f"{prefix}{t.name}: ") for t in self.types]

    def _type_index(self, candidate: AgentType) -> int:
        """The index of the type with the same role and spaces, or a new one (named `role`, or `role#k` when the
        role is split by spaces)."""
        key = (candidate.name, candidate.observation_space, candidate.action_space)
        for index, known in enumerate(self.types):
            if (known.name.partition("#")[0], known.observation_space, known.action_space) == key:
                return index
        taken = sum(t.name.partition("#")[0] == candidate.name for t in self.types)
        name = candidate.name if not taken else f"{candidate.name}#{taken}"
        self.types.append(AgentType(name, candidate.observation_space, candidate.action_space))
        return len(self.types) - 1

    def _observation_space(self) -> gym.spaces.Box:
        """Padded features (bounds widened to cover every type, padding 0) then the type one-hot in [0, 1]."""
        low = np.zeros(self.padded + len(self.types), dtype=np.float32)
        high = np.zeros_like(low)
        high[self.padded:] = 1.0
        for writer, width in zip(self.writers, self.widths, strict=True):
            low[:width] = np.minimum(low[:width], writer.space.low.reshape(-1))
            high[:width] = np.maximum(high[:width], writer.space.high.reshape(-1))
        return gym.spaces.Box(low, high, dtype=np.float32)

    def _union_actions(self) -> tuple[gym.spaces.Discrete | gym.spaces.MultiDiscrete, np.ndarray]:
        """The common action space and, per type, which of its logits are choices that type lacks."""
        layouts = [_nvec(t.action_space) for t in self.types]
        heads = max(len(nvec) for nvec in layouts)
        union = [max(nvec[j] for nvec in layouts if j < len(nvec)) for j in range(heads)]
        invalid = np.zeros((len(self.types), sum(union)), dtype=bool)
        starts = np.concatenate([[0], np.cumsum(union)[:-1]]).astype(int)
        for index, nvec in enumerate(layouts):
            for j, width in enumerate(union):
                kept = nvec[j] if j < len(nvec) else 1
                invalid[index, starts[j] + kept:starts[j] + width] = True
        space: gym.spaces.Discrete | gym.spaces.MultiDiscrete = (
            gym.spaces.Discrete(union[0]) if heads == 1 else gym.spaces.MultiDiscrete(union))
        return space, invalid

    def extras(self) -> dict[str, Any]:
        """For PolicyEnvInfo.extras: type names, each possible agent's type, and the invalid-choice table."""
        if self.shared:
            return {}
        return {"agent_types": tuple(t.name for t in self.types), "agent_type_of": dict(self.type_of),
                INVALID_ACTIONS_KEY: self.invalid}

    def write_row(self, out: np.ndarray, agent: str, obs: Any) -> None:
        """One agent's observation, padded with zeros, then its type's one-hot."""
        index = self.type_of[agent]
        width = self.widths[index]
        self.writers[index].write_row(out[:width], obs)
        out[width:] = 0.0
        out[self.padded + index] = 1.0

    def single(self, agent: str, row: np.ndarray, error: type[ValueError]) -> Any:
        """The agent's own action from a row of the common layout; a choice its space lacks fails in one line."""
        index = self.type_of[agent]
        converter = self.converters[index]
        mine = row[:converter.heads]
        if not converter.in_range(mine.reshape(1, -1)) or np.any(row[converter.heads:] != 0):
            raise error(f"action {row.tolist()} for {agent!r} is outside its space {converter.space} (extra heads "
                        "must be 0); a policy masks those choices, so check actions sent by hand")
        return converter.single(mine)


def _refuse_boxes(spaces: dict[str, tuple[gym.Space[Any], gym.Space[Any]]], error: type[ValueError],
                  prefix: str) -> None:
    """Agents that differ in spaces must act by Discrete/MultiDiscrete choices, the only kind that can be masked."""
    for agent, (_, act_space) in spaces.items():
        if not isinstance(act_space, gym.spaces.Discrete | gym.spaces.MultiDiscrete):
            listed = ", ".join(f"{name}: {pair[1]}" for name, pair in spaces.items())
            raise error(f"{prefix}agents differ in spaces and {agent!r} acts in {act_space}; mettle pads only "
                        f"Discrete/MultiDiscrete action spaces (got {listed}); give every agent one action space or "
                        "use discrete actions (e.g. continuous_actions=False)")
