"""Gymnasium vector environments seen as rows of agents, under mettle's next-step contract.

Gymnasium offers three autoreset modes; all of them are normalised to the `EnvBatch` contract:

* NEXT_STEP (default, exact and cheapest): the vector env already shows the final observation on
  the done step and resets on the following step, ignoring that step's action. It maps 1:1.
* SAME_STEP and DISABLED: a vector env steps every sub-env together, so a row cannot be held still
  for one receive while the others move. On the done step the final observation is delivered
  (from `infos["final_obs"]` in SAME_STEP) with `mask` False; in DISABLED mode the finished
  sub-envs are reset at once so that the next `step` is legal. On the following send every sub-env
  is stepped; the step taken by a finished row (from a reset state, with its ignored action) is
  thrown away, and that row is reset again with `reset(options={"reset_mask": ...})`. The reset
  observation delivered is therefore a genuine fresh start (reward 0, flags False, `starts` True),
  every delivered transition is real, and episode returns/lengths count only the agent's own steps.
  The cost is one discarded step and one extra reset per episode, and the reset draws from the
  sub-env's RNG once more than NEXT_STEP would, so those modes match NEXT_STEP exactly only up to
  each row's first episode end. Prefer NEXT_STEP unless a vector env is handed to you.

A step that gymnasium reports as both terminated and truncated is delivered as terminated only.
Batches reuse preallocated arrays: one is valid until the next `send_actions`.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv

from mettle.contracts import BatchInfo, PolicyEnvInfo
from mettle.envs.rows import (
    EnvStateError,
    EpisodeLog,
    ReplayEnvironment,
    RowBuffers,
    generator_state,
    set_generator_state,
)
from mettle.envs.spaces import ObservationWriter, action_converter, scalar_infos

__all__ = [
    "CARTPOLE_NO_VELOCITY_ID",
    "GymnasiumEnvError",
    "GymnasiumEnvironment",
    "MaskVelocityObservation",
    "has_box_actions",
    "make_cartpole_no_velocity",
]

CARTPOLE_NO_VELOCITY_ID = "mettle/CartPoleNoVel-v1"
AUTORESET_MODES = ("next_step", "same_step", "disabled")
Vectorization = Literal["auto", "native", "sync", "async"]
VECTORIZATIONS: tuple[Vectorization, ...] = ("auto", "native", "sync", "async")
"""native: the id's own vectorised class (e.g. CartPoleVectorEnv); sync/async: Gymnasium's Sync/AsyncVectorEnv
over single envs; auto: native where the id has one, no wrappers are given and the class takes the env kwargs,
else sync."""

Wrapper = Callable[[gym.Env], gym.Env]

NATIVE_STATE = {"CartPoleVectorEnv": ("state", "steps", "prev_done", "low", "high")}
"""Native vector env class -> the attributes that, with its generator, hold all of its state (for resume)."""


class GymnasiumEnvError(ValueError):
    """A Gymnasium environment that cannot be used: unknown id, unsupported spaces or arguments."""


# ------------------------------------------------------------------ CartPole without velocities
class MaskVelocityObservation(gym.ObservationWrapper):
    """Keep only cart position and pole angle of a CartPole observation, making it a POMDP."""

    KEEP = np.array([0, 2])

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or space.shape != (4,):
            raise GymnasiumEnvError(
                f"MaskVelocityObservation needs CartPole's Box(4,) observations, got {space}"
            )
        self.observation_space = gym.spaces.Box(
            space.low[self.KEEP], space.high[self.KEEP], dtype=space.dtype
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        """Drop the cart velocity (1) and the pole angular velocity (3)."""
        kept: np.ndarray = observation[self.KEEP]
        return kept


def make_cartpole_no_velocity(**kwargs: Any) -> gym.Env:
    """Registry entry point for mettle/CartPoleNoVel-v1 (importable by name in worker processes)."""
    from gymnasium.envs.classic_control.cartpole import CartPoleEnv

    return MaskVelocityObservation(CartPoleEnv(**kwargs))


def _register_envs() -> None:
    """Register mettle's Gymnasium ids once, so `gym:mettle/...` resolves like any other id."""
    if CARTPOLE_NO_VELOCITY_ID not in gym.registry:
        gym.register(
            id=CARTPOLE_NO_VELOCITY_ID,
            entry_point=f"{__name__}:make_cartpole_no_velocity",
            max_episode_steps=500,
            reward_threshold=475.0,
        )


_register_envs()


# ------------------------------------------------------------------------------ construction
def _check_env_id(env_id: str) -> None:
    """Fail early, in one line with a close match, instead of deep inside a worker process."""
    module, sep, name = env_id.rpartition(":")
    if sep:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise GymnasiumEnvError(f"cannot import {module!r} to register {env_id!r}: {error}") from None
    if name in gym.registry:
        return
    try:
        namespace, base, version = gym.envs.registration.parse_env_id(name)
    except gym.error.Error:
        namespace, base, version = None, name, 0
    if version is None and gym.envs.registration.find_highest_version(namespace, base) is not None:
        return  # an unversioned id; gymnasium picks the latest version
    matches = difflib.get_close_matches(name, list(gym.registry), n=1, cutoff=0.5)
    hint = f"; did you mean {matches[0]!r}?" if matches else "; see gymnasium.pprint_registry()"
    raise GymnasiumEnvError(f"unknown Gymnasium environment {env_id!r}{hint}")


def has_box_actions(env_id: str) -> bool:
    """Whether a Gymnasium id acts in a Box, for choosing its recipe; False where it cannot be built (the run then
    fails building it, with the reason). A registry spec does not name the action space, so one env is built."""
    try:
        _check_env_id(env_id)
        with warnings.catch_warnings():  # the run builds it again and shows its warnings then
            warnings.simplefilter("ignore")
            env = gym.make(env_id)
    except Exception:  # any third-party env's failure to build (a missing dependency, bad defaults)
        return False
    try:
        return isinstance(env.action_space, gym.spaces.Box)
    finally:
        env.close()


def _make_env(env_id: str, wrappers: Sequence[Wrapper], env_kwargs: dict[str, Any]) -> gym.Env:
    """Create one wrapped sub-env; module-level so async workers can unpickle it by reference."""
    env = gym.make(env_id, **env_kwargs)
    for wrapper in wrappers:
        env = wrapper(env)
    return env


def _build_vector_env(
    env_id: str,
    num_envs: int,
    vectorization: str,
    mode: AutoresetMode,
    wrappers: Sequence[Wrapper],
    env_kwargs: dict[str, Any],
) -> VectorEnv:
    """The env's own vectorised class, or Gymnasium's Sync/AsyncVectorEnv; construction errors in one line."""
    if vectorization == "auto":
        creator = _native_creator(env_id, mode, wrappers)
        vectorization = "native" if creator is not None and _takes_kwargs(creator, env_kwargs) else "sync"
    thunks = [
        functools.partial(_make_env, env_id, tuple(wrappers), dict(env_kwargs)) for _ in range(num_envs)
    ]
    try:
        if vectorization == "native":
            return _build_native(env_id, num_envs, mode, wrappers, env_kwargs)
        if vectorization == "sync":
            return gym.vector.SyncVectorEnv(thunks, copy=False, autoreset_mode=mode)
        return gym.vector.AsyncVectorEnv(thunks, shared_memory=True, copy=False, autoreset_mode=mode)
    except (TypeError, gym.error.Error) as error:
        raise GymnasiumEnvError(f"cannot create {env_id!r} with {env_kwargs}: {error}") from None


def _native_creator(env_id: str, mode: AutoresetMode, wrappers: Sequence[Wrapper]) -> Callable[..., Any] | None:
    """The id's own vectorised class (CartPole has one) where it can stand in for SyncVectorEnv, else None."""
    if wrappers or mode != AutoresetMode.NEXT_STEP:
        return None
    try:
        creator = gym.spec(env_id.rpartition(":")[2]).vector_entry_point
    except gym.error.Error:
        return None
    return gym.envs.registration.load_env_creator(creator) if isinstance(creator, str) else creator


def _takes_kwargs(creator: Callable[..., Any], env_kwargs: dict[str, Any]) -> bool:
    """Whether the native vector class takes every given keyword (a single env may take more, e.g. render options)."""
    parameters = inspect.signature(creator).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return True
    return set(env_kwargs) <= {p.name for p in parameters}


def _build_native(
    env_id: str, num_envs: int, mode: AutoresetMode, wrappers: Sequence[Wrapper], env_kwargs: dict[str, Any]
) -> VectorEnv:
    """One object stepping every sub-env in numpy at once: no per-env Python calls, wrappers or checks."""
    if _native_creator(env_id, mode, wrappers) is None:
        raise GymnasiumEnvError(
            f"{env_id!r} has no native vector env usable here (it needs a registered vector_entry_point, "
            "next_step autoreset and no wrappers); use vectorization='sync'"
        )
    vec_env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **env_kwargs)
    if _parse_mode(vec_env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)) != AutoresetMode.NEXT_STEP:
        vec_env.close()
        raise GymnasiumEnvError(f"{env_id!r}'s native vector env does not autoreset next-step; use 'sync'")
    return vec_env


def _parse_mode(mode: str | AutoresetMode) -> AutoresetMode:
    """Accept the enum or its lower-case value, naming the choices otherwise."""
    if isinstance(mode, AutoresetMode):
        return mode
    by_name = {m.name.lower(): m for m in AutoresetMode} | {m.value: m for m in AutoresetMode}
    try:
        return by_name[mode]
    except KeyError:
        raise GymnasiumEnvError(
            f"autoreset_mode {mode!r} is not one of {', '.join(AUTORESET_MODES)}"
        ) from None


# ------------------------------------------------------------------------- vector infos
def _row_info(info: dict[str, Any], row: int) -> dict[str, Any]:
    """What a vector env's batched info holds for sub-env `row`: its entries of numeric 1-d arrays, nested alike.

    Entries whose `_key` mask leaves `row` out, private `_keys` and the final observation/info are skipped.
    """
    out: dict[str, Any] = {}
    for key, value in info.items():
        if key.startswith("_") or key in ("final_obs", "final_info"):
            continue
        if isinstance(value, dict):
            out[key] = _row_info(value, row)
            continue
        present = info.get(f"_{key}")
        if present is not None and not present[row]:
            continue
        if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "biuf":
            out[key] = value[row]
    return out


# ---------------------------------------------------------------------------------- adapter
class GymnasiumEnvironment(ReplayEnvironment):
    """A Gymnasium vector env (one agent per sub-env, one row each) as a mettle TrainingEnvironment.

    `policy_env_info` holds one agent's spaces, observations always as a float32 Box. Resume is exact
    with a SyncVectorEnv in next-step mode (each sub-env's episode is replayed from the RNG state it
    reset from) and with native vector envs listed in `NATIVE_STATE` (their arrays are saved); other
    vector envs (AsyncVectorEnv, same-step or disabled autoreset) restart their episodes on resume.
    """

    def __init__(
        self,
        env_id: str,
        num_envs: int = 8,
        vectorization: Vectorization = "sync",
        autoreset_mode: str | AutoresetMode = "next_step",
        seed: int = 0,
        wrappers: Sequence[Wrapper] = (),
        env_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_envs < 1:
            raise GymnasiumEnvError(f"num_envs must be at least 1, got {num_envs}")
        if vectorization not in VECTORIZATIONS:
            raise GymnasiumEnvError(f"vectorization {vectorization!r} is not one of {', '.join(VECTORIZATIONS)}")
        mode = _parse_mode(autoreset_mode)
        _check_env_id(env_id)
        vec_env = _build_vector_env(env_id, num_envs, vectorization, mode, wrappers, env_kwargs or {})
        self._setup(vec_env, seed, env_id)

    @classmethod
    def from_vector_env(
        cls, vec_env: VectorEnv, seed: int = 0, name: str | None = None
    ) -> GymnasiumEnvironment:
        """Adopt an existing vector env, honouring its `metadata["autoreset_mode"]`; closes it on close()."""
        self = cls.__new__(cls)
        self._setup(vec_env, seed, name or type(vec_env).__name__)
        return self

    def _setup(self, vec_env: VectorEnv, seed: int, name: str) -> None:
        """Check the spaces and preallocate every per-step buffer."""
        self._vec = vec_env
        self._closed = False
        self.name = name
        self._seed = seed
        self._mode = _parse_mode(vec_env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP))
        n = vec_env.num_envs
        try:
            remedy = "wrap the env in a gymnasium.ObservationWrapper that returns one of them"
            space = vec_env.single_observation_space
            self._obs_writer = ObservationWriter(space, GymnasiumEnvError, f"{name}: ", remedy)
            self._actions = action_converter(vec_env.single_action_space, n, GymnasiumEnvError, f"{name}: ")
        except GymnasiumEnvError:
            self.close()
            raise
        self._info = PolicyEnvInfo(self._obs_writer.space, self._actions.space, num_agents=1,
                                   extras=self._obs_writer.extras)
        self._batch_info = BatchInfo(num_envs=n, agents_per_env=1)
        self._buffers = RowBuffers.allocate(n, self._obs_writer.space.shape)
        self._to_reset = np.zeros(n, dtype=bool)
        self._started = False
        replays = isinstance(vec_env, gym.vector.SyncVectorEnv) and self._mode == AutoresetMode.NEXT_STEP
        self._log = EpisodeLog(n, 1, self._actions.action_dtype) if replays else None
        self._native_fields = NATIVE_STATE.get(type(vec_env).__name__)

    # -------------------------------------------------------------------- contract
    @property
    def autoreset_mode(self) -> AutoresetMode:
        """The vector env's own mode (the delivered batches follow next-step semantics regardless)."""
        return self._mode

    @property
    def vector_env(self) -> VectorEnv:
        """The underlying Gymnasium vector env."""
        return self._vec

    def reset(self, seed: int | None = None) -> None:
        """Reset every sub-env, seeding sub-env i with seed + i (first reset: the constructor seed).

        A native vector env draws every sub-env from one generator, seeded with `seed`.
        """
        seed = self._reset_seed(seed)
        if self._log is not None:
            for i in range(self._vec.num_envs):
                self._log.begin(i, {"seed": seed + i} if seed is not None else self._rng_start(i))
        obs, _ = self._vec.reset(seed=seed)
        self._obs_writer.write(self._buffers.observations, obs)
        self._buffers.restart_all()
        self._started = True

    def send_actions(self, actions: np.ndarray, rows: slice | None = None) -> None:
        """Step every sub-env; rows that showed a final observation restart instead (action ignored)."""
        self._prepare_send(rows)
        actions = np.asarray(actions)
        if self._log is not None:
            self._log_send(actions)
        obs, rewards, terminals, truncations, info = self._vec.step(self._actions.batched(actions))
        buffers = self._buffers
        buffers.begin_step()
        self._obs_writer.write(buffers.observations, obs)
        buffers.record(rewards, terminals, truncations)
        if self._mode != AutoresetMode.NEXT_STEP:
            info = self._autoreset_by_hand(info)
        if buffers.any_done:
            self._finish_episodes(info)

    def close(self) -> None:
        """Close the vector env (and its worker processes); safe to call twice."""
        if not self._closed:
            self._closed = True
            self._vec.close()

    # -------------------------------------------------------------------- exact resume
    def _resumable(self) -> bool:
        """Replayable sub-envs, or a native vector env whose arrays are known."""
        return self._log is not None or self._native_fields is not None

    @property
    def _sync_vec(self) -> gym.vector.SyncVectorEnv:
        """The vector env as the SyncVectorEnv that it is whenever episodes are logged and replayed."""
        assert isinstance(self._vec, gym.vector.SyncVectorEnv), "only a SyncVectorEnv's episodes are replayed"
        return self._vec

    def _log_send(self, actions: np.ndarray) -> None:
        """Log the actions; rows showing a final observation reset in this step, from their RNG's state now."""
        assert self._log is not None
        self._log.record(actions)
        if self._buffers.any_done:
            for row in np.flatnonzero(self._buffers.done):
                self._log.begin(int(row), self._rng_start(int(row)))

    def _rng_start(self, row: int) -> dict[str, Any]:
        """An unseeded reset of sub-env `row` continues its RNG: its state now is the episode's start."""
        return {"rng": self._sync_vec.envs[row].unwrapped.np_random.bit_generator.state}

    def _replay_instance(self, instance: int, start: dict[str, Any], actions: np.ndarray) -> None:
        """Reset sub-env `instance` as it was reset, step it through its actions, and show its observation."""
        vec = self._sync_vec
        env = vec.envs[instance]
        if "seed" in start:
            obs, _ = env.reset(seed=start["seed"])
        else:
            env.unwrapped.np_random.bit_generator.state = start["rng"]
            obs, _ = env.reset()
        full = np.zeros((vec.num_envs, self._actions.heads), dtype=self._actions.action_dtype)
        for step in actions:
            full[instance] = step[0]
            obs, *_ = env.step(self._actions.batched(full)[instance])
        vec._env_obs[instance] = obs
        self._obs_writer.write_row(self._buffers.observations[instance], obs)

    def _extra_state(self) -> dict[str, Any]:
        """A native vector env's arrays and generator; the sync env's flags follow from the batch."""
        if self._native_fields is None:
            return {}
        vec = self._vec
        arrays = {name: torch.from_numpy(np.array(getattr(vec, name))) for name in self._native_fields}
        return {"class": type(vec).__name__, "arrays": arrays, "rng": generator_state(vec.np_random)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Put the native arrays back, or tell the sync env which sub-envs reset on the next step."""
        if self._native_fields is None:
            self._sync_vec._autoreset_envs = self._buffers.done.copy()
            return
        vec = self._vec
        if state.get("class") != type(vec).__name__:
            raise EnvStateError(f"saved native vector env {state.get('class')!r}, this is {type(vec).__name__!r}")
        for name, tensor in state["arrays"].items():
            value = tensor.numpy().copy()
            setattr(vec, name, value.item() if value.ndim == 0 else value)
        set_generator_state(vec.np_random, state["rng"])

    # -------------------------------------------------------------------- internals
    def _autoreset_by_hand(self, info: dict[str, Any]) -> dict[str, Any]:
        """SAME_STEP and DISABLED: show final observations, reset what must restart; the finished episodes' info."""
        buffers = self._buffers
        if self._mode == AutoresetMode.DISABLED:
            self._reset_rows(np.logical_or(buffers.starts, buffers.done, out=self._to_reset))
            return info
        final_info = info
        if buffers.any_done:
            final_info = info.get("final_info", {})
            self._write_final_observations(info)
        self._reset_rows(buffers.starts)
        return final_info

    def _write_final_observations(self, info: dict[str, Any]) -> None:
        """SAME_STEP puts the reset observation in obs; show the final one from infos instead."""
        final_obs, observations = info["final_obs"], self._buffers.observations
        for row in np.flatnonzero(self._buffers.done):
            self._obs_writer.write_row(observations[row], final_obs[row])

    def _reset_rows(self, rows: np.ndarray) -> None:
        """Reset `rows` now; only the restarting rows' reset observations are delivered."""
        if not rows.any():
            return
        obs, _ = self._vec.reset(options={"reset_mask": rows})
        if self._buffers.starts.any():
            self._obs_writer.write(self._buffers.observations, obs, self._buffers.starts)

    def _finish_episodes(self, final_info: dict[str, Any]) -> None:
        """Queue one info per finished episode: the sub-env's numeric scalars, then return, length and env_id."""
        buffers = self._buffers
        for row in buffers.done.nonzero()[0].tolist():
            episode = scalar_infos(_row_info(final_info, row)) if final_info else {}
            episode.update(buffers.episode_info(row, env_id=row))
            buffers.infos.append(episode)
        buffers.clear_totals(buffers.done)
