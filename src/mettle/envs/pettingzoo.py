"""PettingZoo parallel environments seen as rows of agents, under mettle's next-step contract.

`num_envs` instances run in-process (process-level vectorisation is a separate, generic layer).
Row `env_id * A + k` belongs to agent `possible_agents[k]` of instance `env_id`, where A is the
number of possible agents. Every row is in one of four states on each receive:

* live: the agent is present and its next action is used: `mask` True.
* final: the agent's episode ended in the step just taken (terminated, truncated, or it vanished
  from `env.agents` without a flag, which counts as terminated): its final observation is shown
  with the flag set and `mask` False, and one info dict is queued for that agent's episode.
* dormant: the agent has left but its instance goes on without it. The row keeps showing its
  final observation with reward 0, no flags, no start and `mask` False, so its actions are ignored
  and it is kept out of the loss. (PettingZoo rewards for agents no longer present are dropped.)
* start: the first observation of an episode, reward 0, no flags, `starts` True. Every row of an
  instance starts together when the instance resets, which happens on the send after the one that
  left it with no live agent, so the final observations of that last step are shown first. Rows of
  agents absent at reset start dormant (zero observation, `mask` False); an agent that appears
  mid-episode starts live on the receive where it first shows up.

Agents that differ in observation or action spaces share one row layout (`mettle.envs.agent_types`): observations
zero-padded and typed, actions over the union of their spaces with the choices a type lacks masked by the policy;
an action a row's agent lacks is refused when sent.

Agents that end on the same step as their instance therefore behave exactly like the single-agent
case. A dormant row shows `mask` False without an episode end and its next start does not follow a
flag; `check_rollout` from `mettle.envs.testing` assumes single-agent episodes and rejects that, so
check environments with early exits with a multi-agent-aware checker.

Instance i is seeded with `seed + i` on `reset(seed)`; its later resets get seeds drawn from a
generator seeded the same way, so a run is a function of the seed and the actions. That makes resume
exact for any environment that is deterministic given its reset seed: each instance's episode is
replayed from its seed and the actions since. Episode infos carry `episode_return`, `episode_length`
(the agent's own steps), `env_id`, `agent_id` (index in `possible_agents`) and the numeric scalars
of the agent's last PettingZoo info (nested dicts flattened as `outer/inner`). Batches reuse
preallocated arrays: one is valid until the next `send_actions`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from pettingzoo import AECEnv, ParallelEnv
except ImportError as _error:  # an optional dependency: say how to get it
    raise ImportError(f"mettle.envs.pettingzoo needs PettingZoo (pip install pettingzoo): {_error}") from _error

from mettle.contracts import BatchInfo, PolicyEnvInfo
from mettle.envs.agent_types import AgentLayout
from mettle.envs.rows import EpisodeLog, ReplayEnvironment, RowBuffers, generator_state, set_generator_state
from mettle.envs.spaces import ObservationWriter, action_converter, scalar_infos
from mettle.errors import one_line

__all__ = ["PettingZooEnvError", "PettingZooEnvironment", "PettingZooSpec", "parse_pettingzoo_spec"]

ParallelEnvFactory = Callable[..., ParallelEnv]
SPEC_EXAMPLE = "mettle.envs.pettingzoo_testing:parallel_env"
OBSERVATION_REMEDY = "wrap the env so that each agent observes one of them"


class PettingZooEnvError(ValueError):
    """A PettingZoo environment that cannot be used: bad spec, wrong API, or unsupported spaces."""


# ------------------------------------------------------------------------------ construction
@dataclass(frozen=True)
class PettingZooSpec:
    """A `<module>:<callable>` factory that checks it builds a ParallelEnv; plain strings, so it pickles."""

    module: str
    name: str

    @property
    def spec(self) -> str:
        """The string this factory was parsed from."""
        return f"{self.module}:{self.name}"

    def resolve(self) -> Callable[..., Any]:
        """Import the module and fetch the callable, failing in one line that names the problem."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as error:
            reason = one_line(error, first_line=True)
            raise PettingZooEnvError(f"cannot import module {self.module!r} of {self.spec!r}: {reason}") from None
        if not hasattr(module, self.name):
            public = [n for n in dir(module) if not n.startswith("_")]
            matches = difflib.get_close_matches(self.name, public, n=1, cutoff=0.5)
            hint = f"; did you mean {matches[0]!r}?" if matches else ""
            raise PettingZooEnvError(f"module {self.module!r} has no attribute {self.name!r}{hint}")
        factory: Callable[..., Any] = getattr(module, self.name)
        if not callable(factory):
            raise PettingZooEnvError(f"{self.spec!r} is a {type(factory).__name__}, not a callable")
        return factory

    def __call__(self, **kwargs: Any) -> ParallelEnv:
        """Build one environment instance."""
        return _require_parallel(self.resolve()(**kwargs), self.spec)


def parse_pettingzoo_spec(spec: str) -> PettingZooSpec:
    """Turn `<module>:<callable>` into a checked factory, e.g. 'pettingzoo.mpe.simple_spread_v3:parallel_env'."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name or ":" in name:
        raise PettingZooEnvError(
            f"PettingZoo spec {spec!r} must look like '<module>:<callable>', e.g. {SPEC_EXAMPLE!r}"
        )
    factory = PettingZooSpec(module.strip(), name.strip())
    factory.resolve()
    return factory


def _require_parallel(env: object, source: str) -> ParallelEnv:
    """Reject AEC and other objects early, with the conversion hint for AEC environments."""
    if isinstance(env, ParallelEnv):
        return env
    if isinstance(env, AECEnv):
        raise PettingZooEnvError(
            f"{source} returned an AEC environment ({type(env).__name__}), not a ParallelEnv; use the module's "
            "parallel_env or wrap it with pettingzoo.utils.conversions.aec_to_parallel"
        )
    raise PettingZooEnvError(f"{source} returned {type(env).__name__}, not a pettingzoo ParallelEnv")


# ------------------------------------------------------------------------- space conversion
def _agent_layout(env: ParallelEnv, label: str) -> AgentLayout:
    """Every possible agent's (observation, action) spaces, grouped into agent types."""
    spaces = {agent: (env.observation_space(agent), env.action_space(agent)) for agent in env.possible_agents}
    return AgentLayout(spaces, PettingZooEnvError, label, OBSERVATION_REMEDY)


# ---------------------------------------------------------------------------------- adapter
class PettingZooEnvironment(ReplayEnvironment):
    """`num_envs` in-process PettingZoo ParallelEnvs as one row per possible agent per instance.

    `policy_env_info` holds one agent's spaces (observations always a float32 Box) or, where agents differ in spaces,
    the common layout of `mettle.envs.agent_types` (padded observations with a type one-hot; the union of the action
    spaces, the choices each type lacks in `extras["invalid_actions"]`); its extras name the possible agents.
    """

    _log: EpisodeLog
    """Every instance's episodes are always logged (resume replays them)."""

    def __init__(
        self,
        make_env: ParallelEnvFactory,
        num_envs: int = 4,
        seed: int = 0,
        env_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_envs < 1:
            raise PettingZooEnvError(f"num_envs must be at least 1, got {num_envs}")
        self._envs: list[ParallelEnv] = []
        self._closed = False
        try:
            self._make_instances(make_env, num_envs, env_kwargs or {})
            self._setup(seed)
        except Exception:
            self.close()
            raise

    def _make_instances(self, make_env: ParallelEnvFactory, num_envs: int, env_kwargs: dict[str, Any]) -> None:
        """Build the instances, turning bad keyword arguments into one clear line."""
        for _ in range(num_envs):
            try:
                env = make_env(**env_kwargs)
            except TypeError as error:
                reason = one_line(error, first_line=True)
                raise PettingZooEnvError(f"cannot create {_name(make_env)} with {env_kwargs}: {reason}") from None
            self._envs.append(_require_parallel(env, _name(make_env)))

    def _setup(self, seed: int) -> None:
        """Check agents and spaces, then preallocate every per-step buffer."""
        first = self._envs[0]
        self.possible_agents = list(first.possible_agents)
        if not self.possible_agents:
            raise PettingZooEnvError(f"{_name(first)} has no possible_agents")
        for env in self._envs[1:]:
            if list(env.possible_agents) != self.possible_agents:
                raise PettingZooEnvError(
                    f"instances disagree on possible_agents: {self.possible_agents} vs {env.possible_agents}"
                )
        self._index = {agent: k for k, agent in enumerate(self.possible_agents)}
        a, n = len(self.possible_agents), len(self._envs)
        label = getattr(first, "metadata", {}).get("name") or _name(first)
        self._layout = _agent_layout(first, f"{label}: ")
        one = first.possible_agents[0]
        self._obs_writer = ObservationWriter(first.observation_space(one), PettingZooEnvError, f"{label}: ",
                                             OBSERVATION_REMEDY)
        obs_space = self._obs_writer.space if self._layout.shared else self._layout.observation_space
        act_space = first.action_space(one) if self._layout.shared else self._layout.action_space
        self._actions = action_converter(act_space, n * a, PettingZooEnvError)
        extras = {"possible_agents": tuple(self.possible_agents), **self._layout.extras()}
        if self._layout.shared:
            extras.update(self._obs_writer.extras)
        self._info = PolicyEnvInfo(obs_space, self._actions.space, num_agents=a, extras=extras)
        self._batch_info = BatchInfo(num_envs=n, agents_per_env=a)
        self._seed = seed
        self._buffers = RowBuffers.allocate(n * a, obs_space.shape)  # mask: live rows, done/live unused
        self._needs_reset = np.zeros(n, dtype=bool)  # instances left with no live agent
        self._finished: list[set[str]] = [set() for _ in range(n)]  # agents whose episode ended, per instance
        self._rngs: list[np.random.Generator] = []  # per instance: draws the seeds of its later episodes
        self._log = EpisodeLog(n, a, self._actions.action_dtype)
        self._started = False

    # -------------------------------------------------------------------- contract
    @property
    def envs(self) -> list[ParallelEnv]:
        """The underlying PettingZoo instances, in row order."""
        return self._envs

    def reset(self, seed: int | None = None) -> None:
        """Reset every instance, seeding instance i with seed + i (first reset: the constructor seed)."""
        seed = self._reset_seed(seed)
        if seed is not None:
            self._rngs = [np.random.default_rng(seed + i) for i in range(len(self._envs))]
        self._buffers.infos = []
        for i in range(len(self._envs)):
            self._begin_episode(i, None if seed is None else seed + i)
        self._started = True

    def send_actions(self, actions: np.ndarray, rows: slice | None = None) -> None:
        """Step every instance with its live rows' actions; instances with no live agent reset instead."""
        self._prepare_send(rows)
        actions = self._checked(actions)
        self._log.record(actions)
        for i in range(len(self._envs)):
            if self._needs_reset[i]:
                self._begin_episode(i, None)
            else:
                self._step_instance(i, actions[self._block(i)])

    def close(self) -> None:
        """Close every instance once; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for env in self._envs:
            env.close()

    # -------------------------------------------------------------------- internals
    def _checked(self, actions: np.ndarray) -> np.ndarray:
        """Shape and range checks once per send, since PettingZoo envs rarely validate actions (Box: clipped later)."""
        actions = np.asarray(actions)
        self._actions.check(actions)
        return actions

    def _block(self, i: int) -> slice:
        """The rows of instance i."""
        a = self._batch_info.agents_per_env
        return slice(i * a, (i + 1) * a)

    def _row(self, i: int, agent: str) -> int:
        """The row of `agent` in instance i."""
        return i * self._batch_info.agents_per_env + self._index[agent]

    def _begin_episode(self, i: int, seed: int | None) -> None:
        """Reset instance i with `seed`, or the next seed its generator draws, and log the episode's start."""
        if seed is None:
            seed = int(self._rngs[i].integers(2**31))
        self._log.begin(i, {"seed": seed})
        self._reset_instance(i, seed)

    def _replay_instance(self, instance: int, start: dict[str, Any], actions: np.ndarray) -> None:
        """Reset the instance with its episode's seed and step it through the logged actions."""
        self._reset_instance(instance, start["seed"])
        for step in actions:
            self._step_instance(instance, step)

    def _extra_state(self) -> dict[str, Any]:
        """The generators that draw each instance's next episode seed."""
        return {"rngs": [generator_state(rng) for rng in self._rngs]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `_extra_state` returned."""
        self._rngs = [np.random.default_rng() for _ in state["rngs"]]
        for rng, saved in zip(self._rngs, state["rngs"], strict=True):
            set_generator_state(rng, saved)

    def _reset_instance(self, i: int, seed: int | None) -> None:
        """Start a new episode in instance i: every row starts, live where its agent is present."""
        obs, _ = self._envs[i].reset(seed=seed)
        block, buffers = self._block(i), self._buffers
        for array in (buffers.observations, buffers.rewards, buffers.terminals, buffers.truncations, buffers.mask):
            array[block] = 0
        buffers.clear_totals(block)
        buffers.starts[block] = True
        self._finished[i].clear()
        for agent in self._envs[i].agents:
            self._show(i, agent, obs)
        self._needs_reset[i] = not buffers.mask[block].any()

    def _step_instance(self, i: int, actions: np.ndarray) -> None:
        """One PettingZoo step for instance i with its rows' actions; updates rows and queues finished episodes."""
        env, block, buffers = self._envs[i], self._block(i), self._buffers
        acting = [agent for agent in self.possible_agents if buffers.mask[self._row(i, agent)]]
        sent = {agent: self._single(agent, actions[self._index[agent]]) for agent in acting}
        obs, rewards, terminations, truncations, infos = env.step(sent)
        for array in (buffers.rewards, buffers.terminals, buffers.truncations, buffers.starts, buffers.mask):
            array[block] = 0
        present = set(env.agents)
        for agent in acting:
            self._record(i, agent, obs, float(rewards.get(agent, 0.0)))
            terminal, truncated = _outcome(agent, terminations, truncations, present)
            if terminal or truncated:
                self._end_episode(i, agent, terminal, infos.get(agent))
            else:
                buffers.mask[self._row(i, agent)] = True
        for agent in env.agents:
            if agent not in acting and agent not in self._finished[i]:  # joined mid-episode
                buffers.starts[self._row(i, agent)] = True
                self._show(i, agent, obs)
        self._needs_reset[i] = not buffers.mask[block].any()

    def _show(self, i: int, agent: str, obs: dict[str, Any]) -> None:
        """Write a present agent's observation and mark its row live."""
        if agent not in obs:
            raise PettingZooEnvError(f"instance {i} lists {agent!r} in env.agents but gave it no observation")
        row = self._row(i, agent)
        self._write_observation(row, agent, obs[agent])
        self._buffers.mask[row] = True

    def _write_observation(self, row: int, agent: str, obs: Any) -> None:
        """One agent's observation into its row: as it is, or padded and typed when agents differ in spaces."""
        if self._layout.shared:
            self._obs_writer.write_row(self._buffers.observations[row], obs)
        else:
            self._layout.write_row(self._buffers.observations[row], agent, obs)

    def _single(self, agent: str, row: np.ndarray) -> Any:
        """One agent's action in its own space, from its row of the common action layout."""
        if self._layout.shared:
            return self._actions.single(row)
        return self._layout.single(agent, row, PettingZooEnvError)

    def _record(self, i: int, agent: str, obs: dict[str, Any], reward: float) -> None:
        """Reward, length and observation of an agent that acted (its final one if it just ended)."""
        row, buffers = self._row(i, agent), self._buffers
        buffers.rewards[row] = reward
        buffers.returns[row] += reward
        buffers.lengths[row] += 1
        if agent in obs:
            self._write_observation(row, agent, obs[agent])

    def _end_episode(self, i: int, agent: str, terminal: bool, info: Any) -> None:
        """Flag the row (leaving it masked) and queue the agent's episode info."""
        row, buffers = self._row(i, agent), self._buffers
        buffers.terminals[row], buffers.truncations[row] = terminal, not terminal
        self._finished[i].add(agent)
        episode = scalar_infos(info)
        episode.update(buffers.episode_info(row, env_id=i, agent_id=self._index[agent]))
        buffers.infos.append(episode)
        buffers.clear_totals(row)


def _outcome(
    agent: str, terminations: dict[str, Any], truncations: dict[str, Any], present: set[str]
) -> tuple[bool, bool]:
    """(terminal, truncated) for an agent that acted; both set reads as terminal, vanishing unflagged too."""
    terminal = bool(terminations.get(agent, False)) or (agent not in present and not truncations.get(agent, False))
    return terminal, bool(truncations.get(agent, False)) and not terminal


def _name(obj: object) -> str:
    """A readable name for a factory or environment in error messages."""
    if isinstance(obj, PettingZooSpec):
        return repr(obj.spec)
    return getattr(obj, "__qualname__", None) or type(obj).__name__
