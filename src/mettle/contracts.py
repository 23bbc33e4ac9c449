"""The environment/policy contract that envs/, agent/ and rl/ all read: spaces, row layout, batches of agent rows.

It sits below every other package and imports nothing from mettle, so any layer can depend on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

INVALID_ACTIONS_KEY = "invalid_actions"
"""PolicyEnvInfo.extras key of an environment whose agents differ in action spaces: a bool array [types, sum(nvec)],
True where a type's space lacks that choice; each row's type is the one-hot in its observation's last `types`
columns (see mettle.envs.agent_types)."""


@dataclass(frozen=True)
class PolicyEnvInfo:
    """What a policy needs to know to fit an environment: one agent's spaces."""

    observation_space: gym.spaces.Space[Any]
    action_space: gym.spaces.Discrete | gym.spaces.MultiDiscrete | gym.spaces.Box
    """Discrete/MultiDiscrete: int64 choices per head; Box: float32 values per dimension (a Gaussian head)."""
    num_agents: int = 1
    """Agents per environment instance (each is one row of the batch)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Environment-specific facts (feature names, map size...) a specialised policy may use."""

    @property
    def continuous_actions(self) -> bool:
        """Whether actions are real vectors (a Box) rather than choices, so policies know which head to build."""
        return isinstance(self.action_space, gym.spaces.Box)

    @property
    def action_nvec(self) -> tuple[int, ...]:
        """Choices per action head; a Discrete space is a single head. A Box has none: read `action_width`."""
        space = self.action_space
        if isinstance(space, gym.spaces.Discrete):
            return (int(space.n),)
        if isinstance(space, gym.spaces.Box):
            raise ValueError(f"action space {space} is continuous and has no choices per head; "
                             "read PolicyEnvInfo.action_width (or check continuous_actions first)")
        return tuple(int(n) for n in np.asarray(space.nvec).reshape(-1))

    @property
    def action_width(self) -> int:
        """Entries in one agent's action row: one per categorical head, or one per Box dimension (flattened)."""
        if isinstance(self.action_space, gym.spaces.Box):
            return int(np.prod(self.action_space.shape, dtype=np.int64))
        return len(self.action_nvec)

    @property
    def action_dtype(self) -> np.dtype[Any]:
        """What `send_actions` takes and episode logs keep: int64 choices, or float32 Box values."""
        return np.dtype(np.float32 if self.continuous_actions else np.int64)

    @property
    def action_layout(self) -> tuple[str, tuple[int, ...]]:
        """("choices", nvec) or ("box", shape): two agents can share a policy's actions when these are equal."""
        if isinstance(self.action_space, gym.spaces.Box):
            return "box", tuple(int(n) for n in self.action_space.shape)
        return "choices", self.action_nvec


@dataclass(frozen=True)
class BatchInfo:
    """How agent rows are laid out: `num_envs` instances of `agents_per_env` agents."""

    num_envs: int
    agents_per_env: int = 1

    @property
    def num_rows(self) -> int:
        """Total agent rows the environment produces per step."""
        return self.num_envs * self.agents_per_env


@dataclass
class EnvBatch:
    """One receive from the environment, for the agent rows in `rows`.

    `rewards`, `terminals` and `truncations` describe the transition caused by the previous
    actions of these rows; `observations` are what the next actions are chosen from. When an
    episode ends, its final observation is delivered with `mask` False (the action chosen for it
    is ignored) and the reset observation follows on the next receive with `starts` True. The
    final observation's value therefore bootstraps a truncated episode.
    """

    rows: slice
    observations: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    truncations: np.ndarray
    mask: np.ndarray
    """True where this row's next action is used by the environment (a live agent)."""
    starts: np.ndarray
    """True where the observation is the first of a new episode."""
    infos: list[dict[str, Any]] = field(default_factory=list)
    """One dict per episode that finished since the last receive (`episode_return`, ...)."""


class EnvStateError(ValueError):
    """Saved environment state that does not fit this environment (another kind, size or layout)."""


class TrainingEnvironment(ABC):
    """A vectorised multi-agent environment seen as rows of agents."""

    @property
    @abstractmethod
    def policy_env_info(self) -> PolicyEnvInfo:
        """The spaces a policy is built for."""

    @property
    @abstractmethod
    def batch_info(self) -> BatchInfo:
        """The row layout of every batch."""

    @abstractmethod
    def reset(self, seed: int | None = None) -> None:
        """Start fresh episodes in every instance; the next `get_observations` returns them."""

    @abstractmethod
    def get_observations(self) -> EnvBatch:
        """Wait for and return the next batch of agent rows."""

    @abstractmethod
    def send_actions(self, actions: np.ndarray, rows: slice | None = None) -> None:
        """Apply actions to `rows` (default: the rows of the last batch received).

        Actions are [rows, heads] int64 choices, or for a Box action space [rows, dims] float32 values as the
        policy drew them: the environment clips them to the space's bounds itself (and logs them unclipped).
        """

    @abstractmethod
    def close(self) -> None:
        """Release worker processes and other resources; safe to call twice."""

    def state_dict(self) -> dict[str, Any] | None:
        """Plain-container state (RNG, episode progress) for exact resume; None when the env cannot save it.

        Called between steps, when every row has been received and none is stepping (the end of a rollout).
        """
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly from `state_dict`'s output; EnvStateError when the state does not fit this env."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore its state")

    def assign_tasks(self, tasks: Mapping[int, int]) -> None:
        """Play task `tasks[i]` in instance i from its next episode start (a curriculum's choice, for task families)."""
        raise NotImplementedError(f"{type(self).__name__} plays one task: it has no task family to draw tasks from")

    def __enter__(self) -> TrainingEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_all_rows(rows: slice | None, num_rows: int) -> None:
    """Environments that always deliver every row accept actions only for all of them."""
    if rows is not None and (rows.start, rows.stop) != (0, num_rows):
        raise ValueError(f"this environment steps all {num_rows} rows together; got actions for rows {rows}")


def random_actions(info: PolicyEnvInfo, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform random actions for `rows` agents, shaped [rows, heads] (Box: within finite bounds, else normal)."""
    space = info.action_space
    if isinstance(space, gym.spaces.Box):
        low, high = space.low.reshape(-1).astype(np.float64), space.high.reshape(-1).astype(np.float64)
        finite = np.isfinite(low) & np.isfinite(high)
        uniform = rng.uniform(np.where(finite, low, 0.0), np.where(finite, high, 1.0), (rows, len(low)))
        values: np.ndarray = np.where(finite, uniform, rng.standard_normal((rows, len(low)))).astype(np.float32)
        return values
    nvec = np.asarray(info.action_nvec)
    actions: np.ndarray = (rng.random((rows, len(nvec))) * nvec).astype(np.int64)
    return actions


@runtime_checkable
class RecordsReplays(Protocol):
    """An environment that can save episodes as replay files (MettaGrid: MettaScope `.json.z`), for the evaluator."""

    def record_replays(self, directory: Path | None, episodes: int | None = None) -> None:
        """Save the next `episodes` episodes to start (None: all) under `directory`; None stops."""

    def finish_replays(self) -> list[Path]:
        """Save the episodes still being recorded; every replay file written since `record_replays`."""
