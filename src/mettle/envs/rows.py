"""Bookkeeping the environment adapters share: fixed row layout, one set of batch arrays, next-step rules.

`RowBuffers` is the batch an in-process adapter delivers, allocated once, plus the per-row episode
state behind it. Every receive hands out the same arrays (valid until the next `send_actions`), so a
step allocates nothing. An adapter that steps all its rows together drives it as:

* `restart_all()` after resetting every row;
* `begin_step()` at each send: rows that showed a final observation restart, the others take a step;
* `record(rewards, terminals, truncations)` with what its simulator reported for every row;
* `episode_info(row, env_id, agent_id)` for each row that ended, then `clear_totals` for them.

Adapters with their own per-row rules (PettingZoo's agents that come and go) use the arrays,
`episode_info` and `clear_totals` only. `feature_space` is the float32 observation space the
Gymnasium and PettingZoo adapters deliver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from mettle.rl.training.environment import BatchInfo, EnvBatch, PolicyEnvInfo, TrainingEnvironment, check_all_rows

__all__ = ["RowBufferEnvironment", "RowBuffers", "RowLayoutEnvironment", "feature_space"]


@dataclass(eq=False, kw_only=True)
class RowBuffers(EnvBatch):
    """The batch arrays of an adapter, allocated once, and each row's episode state; `infos` wait for `batch()`."""

    done: np.ndarray
    """Rows whose current observation is a final one: they restart on the next send."""
    live: np.ndarray
    """Rows whose action the current send applies (not restarting)."""
    returns: np.ndarray
    """float64 return so far of each row's episode."""
    lengths: np.ndarray
    """Steps taken so far in each row's episode."""
    raw_rewards: np.ndarray = field(init=False, repr=False)
    """Scratch for totalling rewards that float32 would round."""

    def __post_init__(self) -> None:
        """Size the scratch with the rows, so `record` allocates nothing."""
        self.raw_rewards = np.zeros(len(self.rewards), dtype=np.float64)

    @classmethod
    def allocate(
        cls, rows: int, observation_shape: tuple[int, ...], observation_dtype: Any = np.float32, fill: int = 0
    ) -> RowBuffers:
        """Arrays for `rows` rows, observations filled with `fill`; every row starts live."""
        return cls(
            rows=slice(0, rows),
            observations=np.full((rows, *observation_shape), fill, dtype=observation_dtype),
            rewards=np.zeros(rows, dtype=np.float32),
            terminals=np.zeros(rows, dtype=bool),
            truncations=np.zeros(rows, dtype=bool),
            mask=np.ones(rows, dtype=bool),
            starts=np.ones(rows, dtype=bool),
            done=np.zeros(rows, dtype=bool),
            live=np.ones(rows, dtype=bool),
            returns=np.zeros(rows, dtype=np.float64),
            lengths=np.zeros(rows, dtype=np.int64),
        )

    def batch(self) -> EnvBatch:
        """Every row, with the infos queued since the last batch; the arrays are shared, not copied."""
        infos, self.infos = self.infos, []
        return EnvBatch(
            self.rows, self.observations, self.rewards, self.terminals, self.truncations, self.mask, self.starts, infos
        )

    def restart_all(self) -> None:
        """Every row was reset: all live and starting, no flags, rewards, totals or queued infos."""
        for flags in (self.terminals, self.truncations, self.done):
            flags.fill(False)
        for flags in (self.mask, self.starts, self.live):
            flags.fill(True)
        for totals in (self.rewards, self.returns, self.lengths):
            totals.fill(0)
        self.infos = []

    def begin_step(self) -> None:
        """A send: rows that showed a final observation restart, every other row takes a step (counted here)."""
        np.copyto(self.starts, self.done)
        np.logical_not(self.starts, out=self.live)
        self.lengths += self.live

    def record(self, rewards: np.ndarray, terminals: np.ndarray, truncations: np.ndarray) -> None:
        """Deliver a step's outcome for live rows (restarting ones: reward 0, no flags; terminal beats truncation)."""
        live, rewards = self.live, np.asarray(rewards)  # a vector env may hand over a list
        np.logical_and(terminals, live, out=self.terminals)
        np.logical_and(truncations, live, out=self.truncations)
        np.greater(self.truncations, self.terminals, out=self.truncations)
        np.logical_or(self.terminals, self.truncations, out=self.done)
        np.logical_not(self.done, out=self.mask)
        np.copyto(self.rewards, rewards, casting="unsafe")
        np.copyto(self.rewards, 0.0, where=self.starts)  # an exact +0.0, whatever the discarded step paid
        if rewards.dtype == self.rewards.dtype:
            self.returns += self.rewards
        else:  # total the raw (usually float64) rewards, not their float32 copies
            self.returns += np.multiply(rewards, live, out=self.raw_rewards, casting="unsafe")

    def episode_info(self, row: int, env_id: int, agent_id: int | None = None) -> dict[str, Any]:
        """What every finished episode's info carries: the row's return and length, and its ids."""
        info: dict[str, Any] = {
            "episode_return": float(self.returns[row]),
            "episode_length": int(self.lengths[row]),
            "env_id": env_id,
        }
        if agent_id is not None:
            info["agent_id"] = agent_id
        return info

    def clear_totals(self, rows: np.ndarray | slice | int) -> None:
        """Start the return and length of new episodes in `rows` (a mask, slice or row), once reported."""
        self.returns[rows] = 0.0
        self.lengths[rows] = 0


def feature_space(space: gym.Space) -> tuple[gym.spaces.Box, int | None] | None:
    """Box (as is) or Discrete (one-hot) as the float32 Box delivered, with the one-hot's start; else None."""
    if isinstance(space, gym.spaces.Box):
        low, high = space.low.astype(np.float32), space.high.astype(np.float32)
        return gym.spaces.Box(low, high, shape=space.shape, dtype=np.float32), None
    if isinstance(space, gym.spaces.Discrete):
        return gym.spaces.Box(0.0, 1.0, shape=(int(space.n),), dtype=np.float32), int(space.start)
    return None


class RowLayoutEnvironment(TrainingEnvironment):
    """A TrainingEnvironment whose spaces and row layout are fixed when it is built.

    Subclasses set `_info` and `_batch_info`; `_seed` and `_started` serve `_reset_seed`.
    """

    _info: PolicyEnvInfo
    _batch_info: BatchInfo
    _seed: int | None
    _started: bool

    @property
    def policy_env_info(self) -> PolicyEnvInfo:
        """The spaces a policy is built for (one agent's), fixed at construction."""
        return self._info

    @property
    def batch_info(self) -> BatchInfo:
        """The row layout of every batch, fixed at construction."""
        return self._batch_info

    def _reset_seed(self, seed: int | None) -> int | None:
        """The seed a reset uses: the constructor's when the first reset names none, else `seed` (None continues)."""
        return self._seed if seed is None and not self._started else seed


class RowBufferEnvironment(RowLayoutEnvironment):
    """An in-process environment that steps all its rows together and delivers them from one `RowBuffers`."""

    _buffers: RowBuffers

    def get_observations(self) -> EnvBatch:
        """The current batch (reset first if never reset); its arrays are reused after `send_actions`."""
        if not self._started:
            self.reset()
        return self._buffers.batch()

    def _prepare_send(self, rows: slice | None) -> None:
        """Actions must cover every row; an environment never reset starts now, so they apply to its first batch."""
        check_all_rows(rows, self._batch_info.num_rows)
        if not self._started:
            self.reset()
