"""Tiny deterministic environments and a contract checker, for testing trainers, policies and envs.

* `BanditEnvironment`: every row sees a one-hot target and is paid for copying it; PPO solves it
  in seconds, which makes it the fast end-to-end learning check.
* `ScriptedEnvironment`: observation `[t]`, reward `f(t)`, fixed episode length; every stored
  reward and flag is known in advance, for exact-index tests.
* `DictTargetEnv` (Gymnasium id `mettle/DictTarget-v0`, registered on import): the bandit as a single
  Gymnasium env whose observation is a Dict of Discrete, Box and MultiBinary parts, for the flattening
  of observations into features.
* `collect_rollout` / `check_rollout`: drive any `TrainingEnvironment` and verify the `EnvBatch`
  next-step contract (final observation with `mask` False, then a start with reward 0, exact
  episode returns and lengths in `infos`).

Both environments run one episode per agent row and reuse their batch arrays: a batch is valid
until the next `send_actions`.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch

from mettle.contracts import BatchInfo, EnvBatch, PolicyEnvInfo, TrainingEnvironment, random_actions
from mettle.envs.rows import RowBufferEnvironment, RowBuffers
from mettle.envs.spaces import ActionConverter

__all__ = [
    "DICT_TARGET_ID",
    "BanditEnvironment",
    "DictTargetEnv",
    "Rollout",
    "ScriptedEnvironment",
    "check_environment_contract",
    "check_rollout",
    "collect_rollout",
]


_SAVED_ROW_ARRAYS = {
    "_obs": "observations",
    "_rewards": "rewards",
    "_terminals": "terminals",
    "_truncations": "truncations",
    "_mask": "mask",
    "_starts": "starts",
    "_done": "done",
    "_returns": "returns",
    "_lengths": "lengths",
}
"""state_dict key -> RowBuffers field: the attribute names these arrays had, kept so checkpoints still load."""


class _RowEpisodeEnvironment(RowBufferEnvironment):
    """Next-step bookkeeping shared by the testing envs, so each only defines its dynamics."""

    _rng: np.random.Generator
    """Set by the environments that draw random numbers (saved and restored with the state); others have none."""

    def __init__(
        self,
        num_envs: int,
        agents_per_env: int,
        observation_space: gym.spaces.Box,
        action_space: gym.spaces.Discrete | gym.spaces.MultiDiscrete,
        seed: int,
    ) -> None:
        if num_envs < 1 or agents_per_env < 1:
            raise ValueError(f"num_envs and agents_per_env must be >= 1, got {num_envs}, {agents_per_env}")
        self._batch_info = BatchInfo(num_envs=num_envs, agents_per_env=agents_per_env)
        self._info = PolicyEnvInfo(observation_space, action_space, num_agents=agents_per_env)
        self._nvec = np.asarray(self._info.action_nvec, dtype=np.int64)
        self._actions = ActionConverter(action_space, self._batch_info.num_rows, ValueError)
        self._seed = seed
        self._buffers = RowBuffers.allocate(self._batch_info.num_rows, observation_space.shape)
        self._started = False
        self.closed = False

    # ------------------------------------------------------------------ dynamics hooks
    @abstractmethod
    def _reset_dynamics(self, seed: int | None) -> None:
        """Start every row's episode (reseeding when `seed` is given) and write all observations."""

    @abstractmethod
    def _advance(self, actions: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Apply the live rows' actions; write their observations; return rewards, terminals, truncations."""

    @abstractmethod
    def _restart(self, rows: np.ndarray) -> None:
        """Begin new episodes for the boolean `rows` and write their first observations."""

    # ------------------------------------------------------------------ contract
    def reset(self, seed: int | None = None) -> None:
        """Restart every row; without a seed the first reset uses the constructor's, later ones continue."""
        self._reset_dynamics(self._reset_seed(seed))
        self._buffers.restart_all()
        self._started = True

    def send_actions(self, actions: np.ndarray, rows: slice | None = None) -> None:
        """Step live rows; rows that showed a final observation restart and their action is ignored."""
        self._prepare_send(rows)
        actions = self._validate(actions)
        buffers = self._buffers
        buffers.begin_step()
        buffers.record(*self._advance(actions, buffers.live))
        self._finish_episodes()
        if buffers.starts.any():
            self._restart(buffers.starts)

    def close(self) -> None:
        """Nothing to release; kept idempotent like real environments."""
        self.closed = True

    def state_dict(self) -> dict[str, Any]:
        """Every array, the pending infos and the RNG, so training resumes bit-for-bit."""
        arrays = {k: torch.from_numpy(v.copy()) for k, v in self._saved_arrays().items()}
        rng = getattr(self, "_rng", None)
        return {
            "arrays": arrays,
            "infos": [dict(info) for info in self._buffers.infos],
            "started": self._started,
            "rng": json.dumps(rng.bit_generator.state) if rng is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`'s output."""
        arrays = self._saved_arrays()
        for name, tensor in state["arrays"].items():
            np.copyto(arrays[name], tensor.numpy())
        self._buffers.resync()
        self._buffers.infos = [dict(info) for info in state["infos"]]
        self._started = bool(state["started"])
        if state["rng"] is not None:
            self._rng.bit_generator.state = json.loads(state["rng"])

    def _saved_arrays(self) -> dict[str, np.ndarray]:
        """Every array attribute, the row arrays under their `_SAVED_ROW_ARRAYS` keys, in attribute order."""
        arrays: dict[str, np.ndarray] = {}
        for name, value in vars(self).items():
            if isinstance(value, RowBuffers):
                arrays.update((key, getattr(value, field)) for key, field in _SAVED_ROW_ARRAYS.items())
            elif isinstance(value, np.ndarray):
                arrays[name] = value
        return arrays

    # ------------------------------------------------------------------ internals
    def _validate(self, actions: np.ndarray) -> np.ndarray:
        """Strict checks, since these environments exist to catch bugs in their callers."""
        actions = np.asarray(actions)
        self._actions.check_shape(actions)
        if actions.dtype.kind not in "iu" or not self._actions.in_range(actions):
            raise ValueError(f"actions must be integers in [0, {self._nvec.tolist()}), got {actions!r}")
        return actions

    def _finish_episodes(self) -> None:
        """Queue one info (return, length, env_id, agent_id) per finished episode."""
        agents, buffers = self._batch_info.agents_per_env, self._buffers
        for row in np.flatnonzero(buffers.done):
            buffers.infos.append(
                buffers.episode_info(int(row), env_id=int(row // agents), agent_id=int(row % agents))
            )
        buffers.clear_totals(buffers.done)


class BanditEnvironment(_RowEpisodeEnvironment):
    """Each row sees one-hot targets (one per action head) and earns the fraction of heads it copies.

    The targets are redrawn after every step, for all rows, from one seeded generator, so a run is a
    function of the seed and the actions. Episodes truncate after `episode_length` steps; with
    `terminate_on_wrong` a step with any wrong head terminates the episode instead. The best return
    is `episode_length`.
    """

    def __init__(
        self,
        num_envs: int = 8,
        agents_per_env: int = 1,
        num_actions: int = 4,
        episode_length: int = 8,
        action_heads: int = 1,
        terminate_on_wrong: bool = False,
        seed: int = 0,
    ) -> None:
        if num_actions < 2 or episode_length < 1 or action_heads < 1:
            raise ValueError("need num_actions >= 2, episode_length >= 1 and action_heads >= 1")
        action_space: gym.spaces.Discrete | gym.spaces.MultiDiscrete = (
            gym.spaces.Discrete(num_actions)
            if action_heads == 1
            else gym.spaces.MultiDiscrete([num_actions] * action_heads)
        )
        obs_space = gym.spaces.Box(0.0, 1.0, shape=(action_heads * num_actions,), dtype=np.float32)
        super().__init__(num_envs, agents_per_env, obs_space, action_space, seed)
        self.num_actions = num_actions
        self.episode_length = episode_length
        self.terminate_on_wrong = terminate_on_wrong
        rows = self._batch_info.num_rows
        self._rng = np.random.default_rng(seed)
        self._targets = np.zeros((rows, action_heads), dtype=np.int64)
        self._t = np.zeros(rows, dtype=np.int64)

    @property
    def targets(self) -> np.ndarray:
        """The action each row must take now, [rows, heads] (the optimal policy, for tests)."""
        return self._targets

    def _reset_dynamics(self, seed: int | None) -> None:
        """Reseed if asked, then draw fresh targets for every row."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._t.fill(0)
        self._draw_targets()

    def _advance(self, actions: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pay for matching heads, count the step, then show new targets everywhere."""
        correct = actions == self._targets
        rewards = correct.mean(axis=1)
        self._t += live
        terminals = ~correct.all(axis=1) if self.terminate_on_wrong else np.zeros_like(live)
        truncations = self._t >= self.episode_length
        self._draw_targets()
        return rewards, terminals, truncations

    def _restart(self, rows: np.ndarray) -> None:
        """Targets were already redrawn; only the step counter restarts."""
        self._t[rows] = 0

    def _draw_targets(self) -> None:
        """New targets for all rows, written as one-hot blocks into the observation buffer."""
        self._targets[:] = self._rng.integers(self.num_actions, size=self._targets.shape)
        observations = self._buffers.observations
        blocks = observations.reshape(len(observations), self._targets.shape[1], self.num_actions)
        blocks.fill(0.0)
        np.put_along_axis(blocks, self._targets[..., None], 1.0, axis=2)


class ScriptedEnvironment(_RowEpisodeEnvironment):
    """Observation `[t]` (steps taken in the episode), reward `rewards(t)` for the step from t.

    Every episode lasts `episode_length` steps and ends as a terminal or a truncation (`end`), so the
    final observation is `[episode_length]`. Actions are ignored (only validated); `row_offsets`
    start row i's first episode at `t = row_offsets[i]` to desynchronise rows. Default reward: t + 1.
    """

    def __init__(
        self,
        num_envs: int = 2,
        episode_length: int = 5,
        end: Literal["terminal", "truncation"] = "terminal",
        rewards: Sequence[float] | Callable[[int], float] | None = None,
        agents_per_env: int = 1,
        num_actions: int = 2,
        row_offsets: Sequence[int] | None = None,
        record_actions: bool = False,
    ) -> None:
        if end not in ("terminal", "truncation"):
            raise ValueError(f"end must be 'terminal' or 'truncation', got {end!r}")
        if episode_length < 1:
            raise ValueError(f"episode_length must be >= 1, got {episode_length}")
        obs_space = gym.spaces.Box(0.0, float(episode_length), shape=(1,), dtype=np.float32)
        super().__init__(num_envs, agents_per_env, obs_space, gym.spaces.Discrete(num_actions), seed=0)
        self.episode_length = episode_length
        self.end = end
        self.reward_table = self._reward_table(rewards, episode_length)
        rows = self._batch_info.num_rows
        offsets = np.zeros(rows, dtype=np.int64) if row_offsets is None else np.asarray(row_offsets, np.int64)
        if offsets.shape != (rows,) or (offsets < 0).any() or (offsets >= episode_length).any():
            raise ValueError(
                f"row_offsets must be {rows} integers in [0, {episode_length}), got {row_offsets}"
            )
        self._offsets = offsets
        self._t = offsets.copy()
        self.actions: list[np.ndarray] | None = [] if record_actions else None
        """Copies of every action array received, when `record_actions` is set."""

    @staticmethod
    def _reward_table(rewards: Sequence[float] | Callable[[int], float] | None, length: int) -> np.ndarray:
        """Rewards for the steps from t = 0 .. length-1, precomputed once."""
        if rewards is None:
            return np.arange(1, length + 1, dtype=np.float64)
        if callable(rewards):
            return np.array([rewards(t) for t in range(length)], dtype=np.float64)
        table = np.asarray(rewards, dtype=np.float64)
        if table.shape != (length,):
            raise ValueError(f"rewards must hold episode_length={length} values, got {len(table)}")
        return table

    def _reset_dynamics(self, seed: int | None) -> None:
        """Back to the configured offsets; the seed is irrelevant to a script."""
        np.copyto(self._t, self._offsets)
        self._buffers.observations[:, 0] = self._t

    def _advance(self, actions: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reward the step from t, count it, and end episodes that reach `episode_length`."""
        if self.actions is not None:
            self.actions.append(actions.copy())
        rewards = self.reward_table[np.minimum(self._t, self.episode_length - 1)]
        self._t += live
        self._buffers.observations[:, 0] = self._t
        return self._split_end(rewards, self._t >= self.episode_length)

    def _split_end(self, rewards: np.ndarray, ended: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Route the episode end to terminals or truncations."""
        never = np.zeros_like(ended)
        if self.end == "terminal":
            return rewards, ended, never
        return rewards, never, ended

    def _restart(self, rows: np.ndarray) -> None:
        """New episodes start at t = 0 (offsets apply to the first episode only)."""
        self._t[rows] = 0
        self._buffers.observations[rows, 0] = 0.0


# ---------------------------------------------------------------------- contract checking
@dataclass
class Rollout:
    """Copies of every batch received and every action sent, stacked over time."""

    observations: np.ndarray
    """[T, rows, *obs_shape]"""
    rewards: np.ndarray
    terminals: np.ndarray
    truncations: np.ndarray
    mask: np.ndarray
    starts: np.ndarray
    actions: np.ndarray
    """[T, rows, heads]: the actions sent after batch t."""
    infos: list[list[dict[str, Any]]]
    """The infos delivered with batch t."""
    agents_per_env: int = 1

    def info_row(self, info: dict[str, Any]) -> int:
        """The agent row an episode info belongs to."""
        return int(info["env_id"]) * self.agents_per_env + int(info.get("agent_id", 0))


ActionFn = Callable[[int, EnvBatch], np.ndarray]
OBSERVATION_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8))
"""Observation dtypes the trainer takes: float32 features, or uint8 (MettaGrid's tokens)."""


def collect_rollout(
    env: TrainingEnvironment, steps: int, seed: int = 0, actions: ActionFn | None = None
) -> Rollout:
    """Reset `env` with `seed`, then receive and send `steps` times (random actions by default)."""
    info, rows = env.policy_env_info, env.batch_info.num_rows
    rng = np.random.default_rng(seed)
    choose = actions or (lambda _t, _batch: random_actions(info, rows, rng))
    env.reset(seed=seed)
    fields: dict[str, list[np.ndarray]] = {
        k: [] for k in ("observations", "rewards", "terminals", "truncations", "mask", "starts", "actions")
    }
    infos: list[list[dict[str, Any]]] = []
    for t in range(steps):
        batch = env.get_observations()
        for name in ("observations", "rewards", "terminals", "truncations", "mask", "starts"):
            fields[name].append(np.array(getattr(batch, name), copy=True))
        infos.append(list(batch.infos))
        sent = np.asarray(choose(t, batch), dtype=info.action_dtype)
        fields["actions"].append(sent.copy())
        env.send_actions(sent)
    stacked = {name: np.stack(values) for name, values in fields.items()}
    return Rollout(**stacked, infos=infos, agents_per_env=env.batch_info.agents_per_env)


def check_rollout(rollout: Rollout, policy_env_info: PolicyEnvInfo | None = None) -> None:
    """Raise AssertionError at the first breach of the EnvBatch next-step contract."""
    _check_layout(rollout, policy_env_info)
    _check_first_batch(rollout)
    _check_flags(rollout)
    _check_episode_infos(rollout)


def check_environment_contract(env: TrainingEnvironment, steps: int = 200, seed: int = 0) -> Rollout:
    """Drive `env` with random actions and check every batch; returns the rollout for further checks."""
    rollout = collect_rollout(env, steps, seed)
    check_rollout(rollout, env.policy_env_info)
    return rollout


def _fail(message: str) -> None:
    """Raise even under `python -O`."""
    raise AssertionError(message)


def _check_layout(r: Rollout, info: PolicyEnvInfo | None) -> None:
    """Shapes and dtypes the trainer relies on."""
    steps, rows = r.rewards.shape
    if r.observations.dtype not in OBSERVATION_DTYPES:
        _fail(f"observations must be float32 (features) or uint8 (e.g. MettaGrid tokens), got {r.observations.dtype}")
    if info is not None:
        space = info.observation_space
        if r.observations.shape[2:] != space.shape:
            _fail(f"observations shaped {r.observations.shape[2:]}, space says {space.shape}")
        if space.dtype is not None and np.dtype(space.dtype) != r.observations.dtype:
            _fail(f"observations are {r.observations.dtype}, space says {space.dtype}")
    for name in ("terminals", "truncations", "mask", "starts"):
        array = getattr(r, name)
        if array.dtype != np.bool_ or array.shape != (steps, rows):
            _fail(f"{name} must be bool [rows], got {array.dtype} {array.shape[1:]}")


def _check_first_batch(r: Rollout) -> None:
    """After reset: all starts, no reward, no flags, every row live."""
    if not (r.starts[0].all() and r.mask[0].all() and not r.rewards[0].any()):
        _fail("the first batch after reset must have starts and mask everywhere and zero rewards")
    if r.terminals[0].any() or r.truncations[0].any() or r.infos[0]:
        _fail("the first batch after reset must have no flags and no infos")


def _check_flags(r: Rollout) -> None:
    """Termination apart from truncation, mask False exactly on final observations, then a clean start."""
    done = r.terminals | r.truncations
    if (r.terminals & r.truncations).any():
        t, row = np.argwhere(r.terminals & r.truncations)[0]
        _fail(f"batch {t} row {row}: terminal and truncation both set")
    if (r.mask == done).any():
        t, row = np.argwhere(r.mask == done)[0]
        _fail(
            f"batch {t} row {row}: mask must be False exactly when the episode ended (mask={r.mask[t, row]})"
        )
    if (r.starts[1:] != done[:-1]).any():
        t, row = np.argwhere(r.starts[1:] != done[:-1])[0]
        _fail(f"batch {t + 1} row {row}: starts must follow a final observation and only then")
    restarted = r.starts[1:]
    if (r.rewards[1:][restarted] != 0).any() or done[1:][restarted].any():
        _fail("a start after a final observation must carry reward 0 and no flags")


def _check_episode_infos(r: Rollout) -> None:
    """Exactly one info per finished episode, with the return and length the batches imply."""
    steps, rows = r.rewards.shape
    returns, lengths = np.zeros(rows), np.zeros(rows, dtype=np.int64)
    for t in range(1, steps):
        live = ~r.starts[t]
        returns[r.starts[t]], lengths[r.starts[t]] = 0.0, 0
        returns[live] += r.rewards[t][live]
        lengths += live
        finished = np.flatnonzero(r.terminals[t] | r.truncations[t])
        reported = {r.info_row(info): info for info in r.infos[t]}
        if sorted(reported) != finished.tolist() or len(reported) != len(r.infos[t]):
            _fail(
                f"batch {t}: infos for rows {sorted(reported)} but episodes ended in rows {finished.tolist()}"
            )
        for row in finished.tolist():
            info = reported[row]
            if info["episode_length"] != lengths[row]:
                _fail(f"batch {t} row {row}: episode_length {info['episode_length']} != {lengths[row]} seen")
            if not np.isclose(info["episode_return"], returns[row], rtol=1e-5, atol=1e-5):
                _fail(f"batch {t} row {row}: episode_return {info['episode_return']} != {returns[row]} seen")


# ------------------------------------------------------------------ a Gymnasium env with Dict observations
DICT_TARGET_ID = "mettle/DictTarget-v0"


class DictTargetEnv(gym.Env[dict[str, Any], np.int64]):
    """Copy the target shown in a Dict observation: {"clock": Box, "flags": MultiBinary, "target": Discrete}.

    The target is Discrete(num_actions, start=1), the flags are noise and the clock is t / episode_length,
    so only the flattened target's one-hot columns matter; playing it pays 1. Episodes truncate after
    `episode_length` steps. With `note=True` a Text part is added, and with `mixed_actions` "tuple" or "dict" the
    action space mixes a Discrete and a Box: mettle refuses both (bad-input fixtures).
    """

    def __init__(self, num_actions: int = 3, episode_length: int = 8, note: bool = False,
                 mixed_actions: str = "") -> None:
        if num_actions < 2 or episode_length < 1:
            raise ValueError(f"need num_actions >= 2 and episode_length >= 1, got {num_actions}, {episode_length}")
        parts: dict[str, gym.Space[Any]] = {
            "clock": gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32),
            "flags": gym.spaces.MultiBinary(2),
            "target": gym.spaces.Discrete(num_actions, start=1),
        }
        if note:
            parts["note"] = gym.spaces.Text(8)
        self.observation_space = gym.spaces.Dict(parts)
        self.action_space = mixed_action_space(num_actions, mixed_actions)
        self.num_actions, self.episode_length, self.note = num_actions, episode_length, note
        self._t = 0
        self._target = 1

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start over at t = 0 with a fresh target."""
        super().reset(seed=seed)
        self._t = 0
        return self._observe(), {}

    def step(self, action: np.int64) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """Pay 1 for the shown target (choice 0 plays target 1), then show the next one."""
        reward = float(int(action) + 1 == self._target)
        self._t += 1
        return self._observe(), reward, False, self._t >= self.episode_length, {}

    def _observe(self) -> dict[str, Any]:
        """Draw the next target and flags; the clock shows the episode's progress."""
        self._target = int(self.np_random.integers(1, self.num_actions + 1))
        observation: dict[str, Any] = {
            "clock": np.array([self._t / self.episode_length], dtype=np.float32),
            "flags": self.np_random.integers(0, 2, size=2, dtype=np.int8),
            "target": self._target,
        }
        if self.note:
            observation["note"] = "a"
        return observation


def mixed_action_space(num_actions: int, mixed: str) -> gym.Space[Any]:
    """Discrete(num_actions), or it beside a Box in a Tuple ("tuple") or Dict ("dict")."""
    choice, amount = gym.spaces.Discrete(num_actions), gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
    if mixed == "tuple":
        return gym.spaces.Tuple([choice, amount])
    if mixed == "dict":
        return gym.spaces.Dict({"choice": choice, "amount": amount})
    if mixed:
        raise ValueError(f"mixed_actions must be '', 'tuple' or 'dict', got {mixed!r}")
    return choice


if DICT_TARGET_ID not in gym.registry:
    gym.register(id=DICT_TARGET_ID, entry_point=f"{__name__}:DictTargetEnv")
