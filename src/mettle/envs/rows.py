"""Bookkeeping the environment adapters share: fixed row layout, one set of batch arrays, next-step rules.

`RowBuffers` is the batch an in-process adapter delivers, allocated once, plus the per-row episode
state behind it. Every receive hands out the same arrays (valid until the next `send_actions`), so a
step allocates nothing. An adapter that steps all its rows together drives it as:

* `restart_all()` after resetting every row;
* `begin_step()` at each send: rows that showed a final observation restart, the others take a step;
* `record(rewards, terminals, truncations)` with what its simulator reported for every row;
* `episode_info(row, env_id, agent_id)` for each row that ended, then `clear_totals` for them.

Adapters with their own per-row rules (PettingZoo's agents that come and go) use the arrays,
`episode_info` and `clear_totals` only.

Most steps neither end nor restart an episode; `begin_step` and `record` notice that from two flags
and then only count the step and copy the rewards, so the common step costs a handful of numpy calls.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mettle.contracts import (
    BatchInfo,
    EnvBatch,
    EnvStateError,
    PolicyEnvInfo,
    TrainingEnvironment,
    check_all_rows,
)

__all__ = [
    "EnvStateError",
    "EpisodeLog",
    "ReplayEnvironment",
    "RowBufferEnvironment",
    "RowBuffers",
    "RowLayoutEnvironment",
]


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
    any_done: bool = field(init=False, default=False)
    """Whether any row shows a final observation now (`done.any()`, kept by `record`)."""
    settled: bool = field(init=False, default=False)
    """No row restarts in this step and every flag is at rest (terminals, truncations and done False, mask, live
    True, starts False): `begin_step` and `record` then skip the per-row rules."""

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
        self.any_done = self.settled = False

    def resync(self) -> None:
        """Arrays were written from outside (a restored state): the next step re-derives its rows from them."""
        self.any_done, self.settled = bool(self.done.any()), False

    def begin_step(self) -> None:
        """A send: rows that showed a final observation restart, every other row takes a step (counted here)."""
        if self.settled:  # nothing restarts: every row is live already
            self.lengths += 1
            return
        np.copyto(self.starts, self.done)
        np.logical_not(self.starts, out=self.live)
        self.lengths += self.live
        self.settled = not self.any_done

    def record(self, rewards: np.ndarray, terminals: np.ndarray, truncations: np.ndarray) -> None:
        """Deliver a step's outcome for live rows (restarting ones: reward 0, no flags; terminal beats truncation)."""
        rewards = np.asarray(rewards)  # a vector env may hand over a list
        if not self.settled:
            self._record_rows(rewards, terminals, truncations)
            return
        np.logical_or(terminals, truncations, out=self.done)  # every row is live: no per-row rules apply
        if self.done.any():
            self._record_ends(terminals)
        np.copyto(self.rewards, rewards, casting="unsafe")
        self.returns += self.rewards if rewards.dtype == self.rewards.dtype else rewards

    def _record_ends(self, terminals: np.ndarray) -> None:
        """Flags of a step where episodes end and none restarts (`done` is set): terminal beats truncation."""
        np.not_equal(terminals, 0, out=self.terminals)
        np.greater(self.done, self.terminals, out=self.truncations)
        np.logical_not(self.done, out=self.mask)
        self.any_done, self.settled = True, False

    def _record_rows(self, rewards: np.ndarray, terminals: np.ndarray, truncations: np.ndarray) -> None:
        """`record` in a step where rows restart: the per-row rules, then the flags for the next step."""
        live = self.live
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
        self.any_done, self.settled = bool(self.done.any()), False

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
        if rows is not self._buffers.rows:  # the delivered batch's own slice covers every row
            check_all_rows(rows, self._batch_info.num_rows)
        if not self._started:
            self.reset()


# ------------------------------------------------------------------ exact resume by replay
MAX_LOGGED_SENDS = 200_000
"""An episode longer than this many sends stops the log: resume then restarts episodes (and says so)."""

logger = logging.getLogger(__name__)


class EpisodeLog:
    """Per instance: how its current episode began and the actions sent since, so resume can replay it.

    Any environment that is deterministic given its reset (a seed, or the RNG state it reset from) and
    its actions is rebuilt exactly this way; an episode is short next to a run, so the log stays small.
    Call `record` at the start of every send, then `begin` for each instance that (re)starts. Actions are kept in
    the dtype the adapter sends in (int64 choices, float32 Box values as the policy drew them), so a replay sends
    bit for bit what the live episode did.
    """

    def __init__(self, num_instances: int, rows_per_instance: int, dtype: Any = np.int64) -> None:
        self.rows_per_instance = rows_per_instance
        self.dtype = np.dtype(dtype)
        """What every send's actions are kept as: int64 or float32."""
        self.starts: list[dict[str, Any] | None] = [None] * num_instances
        self.first = np.zeros(num_instances, dtype=np.int64)
        """Index of the first send whose actions count in each instance's episode."""
        self._sends: deque[np.ndarray] = deque()
        self._base = 0
        self._count = 0
        self._trim = False
        self.overflowed = False

    def record(self, actions: np.ndarray) -> None:
        """Keep a copy of one send's actions (all rows), dropping sends no live episode needs."""
        if self.overflowed:
            return
        self._sends.append(np.array(actions, dtype=self.dtype, copy=True))
        self._count += 1
        if self._trim:
            self._drop_unneeded()
        if len(self._sends) > MAX_LOGGED_SENDS:
            self.overflowed = True
            self._sends.clear()
            logger.warning("an episode outlasted %d steps: a resume of this run will restart its episodes "
                           "instead of continuing them exactly", MAX_LOGGED_SENDS)

    def _drop_unneeded(self) -> None:
        """Forget the sends older than every instance's current episode (checked only after an episode began)."""
        self._trim = False
        oldest = int(self.first.min())
        for _ in range(oldest - self._base):
            self._sends.popleft()
        self._base = oldest

    def begin(self, instance: int, start: dict[str, Any]) -> None:
        """Instance `instance` started an episode from `start` (plain JSON); later sends' actions belong to it."""
        self.starts[instance] = start
        self.first[instance] = self._count
        self._trim = True

    def episodes(self) -> list[tuple[dict[str, Any], np.ndarray]]:
        """Each instance's start and its actions since, shaped [sends, rows_per_instance, heads]."""
        out, logged = [], list(self._sends)
        for i, start in enumerate(self.starts):
            if start is None:
                raise EnvStateError(f"instance {i} has no recorded episode start")
            rows = slice(i * self.rows_per_instance, (i + 1) * self.rows_per_instance)
            sends = logged[int(self.first[i]) - self._base :]
            heads = sends[0].shape[1] if sends else 0
            actions = np.stack([s[rows] for s in sends]) if sends else np.zeros((0, self.rows_per_instance, heads))
            out.append((start, actions.astype(self.dtype)))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Starts as JSON and each instance's actions as tensors of the log's dtype."""
        return {
            "starts": json.dumps(self.starts),
            "actions": [torch.from_numpy(actions) for _, actions in self.episodes()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the log from `state_dict`, as if every instance's episode began just before its actions."""
        starts, actions = json.loads(state["starts"]), [a.numpy() for a in state["actions"]]
        if len(starts) != len(self.starts) or any(a.ndim != 3 or a.shape[1] != self.rows_per_instance
                                                    for a in actions):
            raise EnvStateError(f"saved episodes are for {len(starts)} instances of another row layout")
        wrong = next((a.dtype for a in actions if a.dtype != self.dtype), None)
        if wrong is not None:
            raise EnvStateError(f"saved episodes hold {wrong} actions, this environment sends {self.dtype}: not a "
                                "log this environment wrote")
        longest = max((len(a) for a in actions), default=0)
        heads = next((a.shape[2] for a in actions if len(a)), 1)
        if longest > MAX_LOGGED_SENDS or any(len(a) and a.shape[2] != heads for a in actions):
            raise EnvStateError(f"saved episodes are {longest:,} steps long (at most {MAX_LOGGED_SENDS:,} are "
                                "logged) or of mixed action heads: not a log this environment wrote")
        sends = np.zeros((longest, len(starts) * self.rows_per_instance, heads), dtype=self.dtype)
        for i, episode in enumerate(actions):  # right-aligned: every episode ends at the last send
            if len(episode):
                sends[longest - len(episode) :, i * self.rows_per_instance : (i + 1) * self.rows_per_instance] = episode
        self._sends, self._base, self._count = deque(sends), 0, longest
        self.starts = starts
        self.first = np.array([longest - len(a) for a in actions], dtype=np.int64)
        self._trim, self.overflowed = False, False


class ReplayEnvironment(RowBufferEnvironment):
    """A RowBufferEnvironment that resumes exactly: it saves its batch arrays and episode log, and replays.

    Subclasses keep `_log` up to date and implement `_replay_instance` (rebuild one instance's simulator
    from its start and actions, writing its observations into the batch) and, where they have more
    state, `_extra_state` / `_load_extra_state`. One whose whole simulator state fits in `_extra_state`
    sets `_log` to None; one that cannot be restored at all returns False from `_resumable`.
    """

    _log: EpisodeLog | None
    name: str

    def _resumable(self) -> bool:
        """Whether this instance's state can be saved and restored exactly."""
        return True

    def state_dict(self) -> dict[str, Any] | None:
        """Batch arrays, queued infos, the episode log and any extra state; None when resume cannot be exact."""
        if not self._started or not self._resumable() or (self._log is not None and self._log.overflowed):
            return None
        buffers = self._buffers
        return {
            "kind": type(self).__name__,
            "arrays": {name: torch.from_numpy(getattr(buffers, name).copy()) for name in _SAVED_BUFFERS},
            "infos": [dict(info) for info in buffers.infos],
            "log": self._log.state_dict() if self._log is not None else None,
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay every instance's episode, then restore the batch exactly; warn if the replay diverged."""
        self._check_state(state)
        replayed = self._replay(state["log"]) if self._log is not None else None
        for name in _SAVED_BUFFERS:
            np.copyto(getattr(self._buffers, name), state["arrays"][name].numpy())
        self._buffers.resync()
        self._buffers.infos = [dict(info) for info in state["infos"]]
        self._load_extra_state(state["extra"])
        self._started = True
        if replayed is not None and not np.array_equal(replayed, self._buffers.observations):
            logger.warning("%s: replaying the saved episodes gave other observations (the environment is not "
                           "deterministic given its seed and actions): the resumed run is not exact",
                           getattr(self, "name", type(self).__name__))

    def _replay(self, log_state: dict[str, Any]) -> np.ndarray:
        """Rebuild every instance from the saved log; the observations the replay ended on."""
        assert self._log is not None
        self._log.load_state_dict(log_state)
        for instance, (start, actions) in enumerate(self._log.episodes()):
            self._replay_instance(instance, start, actions)
        return self._buffers.observations.copy()

    def _check_state(self, state: dict[str, Any]) -> None:
        """Refuse state saved by another kind of environment, for another number of rows or another resume path."""
        kind = state.get("kind") if isinstance(state, dict) else None
        if kind != type(self).__name__:
            raise EnvStateError(f"saved environment state is for {kind!r}, this is {type(self).__name__!r}")
        saved = tuple(state["arrays"]["observations"].shape)
        if saved != self._buffers.observations.shape:
            raise EnvStateError(f"saved observations are shaped {saved}, this env's {self._buffers.observations.shape}")
        if not self._resumable() or (state["log"] is None) != (self._log is None):
            raise EnvStateError(f"{type(self).__name__} was saved with another vectorisation than it has now")

    def _replay_instance(self, instance: int, start: dict[str, Any], actions: np.ndarray) -> None:
        """Rebuild one instance's simulator from its episode start and actions ([sends, rows, heads])."""
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        """Adapter state beyond the batch and the log (RNGs, flags), as plain containers and tensors."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `_extra_state` returned."""


_SAVED_BUFFERS = ("observations", "rewards", "terminals", "truncations", "mask", "starts", "done", "live",
                  "returns", "lengths")


def generator_state(rng: np.random.Generator) -> str:
    """A numpy Generator's state as JSON (its integers exceed 64 bits, so not as tensors)."""
    return json.dumps(rng.bit_generator.state)


def set_generator_state(rng: np.random.Generator, state: str) -> None:
    """Inverse of `generator_state`."""
    rng.bit_generator.state = json.loads(state)
