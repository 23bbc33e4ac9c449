"""MettaGrid games as rows of agents: `num_envs` simulations of A agents become N*A rows (row = env * A + agent).

Observations are MettaGrid's tokens, passed through without copies: every simulation writes into its
own slice of one preallocated uint8 array [N*A, num_tokens, 3] (the C++ core accepts numpy views as
its buffers), and that array is what every batch delivers. A token is (location, feature id, value):

* location packs the cell in the agent's egocentric window as `row << 4 | col` (window at most 15x15,
  agent at the centre); 254 marks a global token (episode progress, last action, last reward);
* feature id indexes `extras["feature_names"]` (`extras["num_features"]` ids in all);
* unused tokens are padding, all three bytes 255.

Episodes follow the `EnvBatch` next-step contract. MettaGrid ends all agents of a game together (at
`max_steps`, as terminals, or as truncations when `game.episode_truncates` is set); should a game ever
flag only some agents, the whole game ends and the unflagged agents are reported as truncated. The
finished simulation stays alive while its final observation is shown (mask False), so its episode
stats are read for the infos; the next `send_actions` replaces it with a fresh simulation for that
game only, writing the reset observation into the same slice, while the other games step.

Seeding: `reset(seed)` gives game i the seed `seed + i` for its first episode (for the simulation
and, unless the config fixes one, for the map builder) and a generator seeded the same way draws
the seeds of its later episodes, so a run is a function of the seed and the actions: resume replays
each game's episode from its seed and the actions since, which restores it exactly. Simulations are
built directly rather than through `Simulator.new_simulation`, which shifts map seeds by a counter
that runs across resets.

Task families (`family=`, see mettagrid_families): every game starts on the family's base config (task
-1), and `assign_tasks({game: task id})` switches a game to that task's config at its next episode start (a
reset, or the restart after its final observation). Each episode's log start records its task, so resume
replays the right game; current tasks and assignments not yet applied are saved with the env's state, and
every episode info carries `task_id`. Spaces and `extras` are the base's (a family admits only variants
that keep them; `extras["max_steps"]` is the base's). Without a family none of this runs.

`desync_episodes=True` ends each game's first episode (as a truncation) at a step drawn from
[1, max_steps], so the games stop restarting in lockstep. It is off by default, and the config's own
`desync_episodes` field is not read, because cut episodes would bias an evaluation's returns.

Replays: `record_replays(directory, episodes)` attaches mettagrid's own `ReplayLogWriter` (see
mettagrid_replays) to each game from its next episode start, so the first `episodes` episodes to start are
written as MettaScope `.json.z` files; `finish_replays()` writes any still running and lists the files. Meant
for evaluation and `mettle play` (in-process, serial); a recording game takes the slower `Simulation.step`.

Speed: a step is a loop over games calling the C++ step (directly when the game has no talk and no
stat-triggered ending: `Simulation.step` then only adds stopwatch timers and hooks) plus a few
vectorised numpy operations over all rows. Starting an episode builds a new Simulation (map and C++
config conversion, a few milliseconds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from mettagrid.config.mettagrid_config import MettaGridConfig
from mettagrid.mettagrid_c import PackedCoordinate, dtype_actions, dtype_observations
from mettagrid.policy.policy_env_interface import PolicyEnvInterface
from mettagrid.simulator import Simulation
from mettagrid.simulator.simulator import Buffers

from mettle.contracts import BatchInfo, EnvStateError, PolicyEnvInfo
from mettle.envs.mettagrid_families import BASE_TASK, TaskFamily, load_config_or_family
from mettle.envs.mettagrid_replays import GameReplayWriter, ReplayBudget
from mettle.envs.mettagrid_tasks import CONFIG_SUFFIXES, MettaGridEnvError, load_mettagrid_config
from mettle.envs.rows import EpisodeLog, ReplayEnvironment, RowBuffers, generator_state, set_generator_state
from mettle.envs.spaces import ActionConverter, scalar_infos
from mettle.errors import one_line

__all__ = [
    "CONFIG_SUFFIXES",
    "MettaGridEnvError",
    "MettaGridEnvironment",
    "load_mettagrid_config",
    "make_mettagrid_environment",
]

PADDING = 0xFF
"""Value of every byte of an unused observation token."""
_SEED_LIMIT = 2**31
"""Seeds drawn for later episodes stay below this (map builders want non-negative 32-bit seeds)."""


# ---------------------------------------------------------------------------------- adapter
class MettaGridEnvironment(ReplayEnvironment):
    """`num_envs` MettaGrid simulations stepped in this process, delivered as N*A token-observation rows.

    `policy_env_info` holds one agent's token space and actions; its `extras` describe the tokens.
    """

    _log: EpisodeLog
    """Every game's episodes are always logged (resume replays them)."""

    def __init__(
        self,
        config: MettaGridConfig | None = None,
        num_envs: int = 1,
        seed: int = 0,
        desync_episodes: bool = False,
        name: str | None = None,
        family: TaskFamily | None = None,
    ) -> None:
        if num_envs < 1:
            raise MettaGridEnvError(f"num_envs must be at least 1, got {num_envs}")
        config = _base_config(config, family)
        self.name = name or (family.name if family is not None else config.label)
        self._config = config
        self._family = family
        self._tasks = np.full(num_envs, BASE_TASK, dtype=np.int64)
        """The task each game plays now (BASE_TASK: the base config)."""
        self._pending: dict[int, int] = {}
        """Tasks assigned to games, applied when each next starts an episode."""
        self._interface = PolicyEnvInterface.from_mg_cfg(config)
        self._agents = config.game.num_agents
        self._num_envs = num_envs
        self._batch_info = BatchInfo(num_envs=num_envs, agents_per_env=self._agents)
        self._info = self._policy_env_info()
        self._desync = desync_episodes and config.game.max_steps > 0
        self._cut_pending = False
        self._allocate()
        self._configs = [config.model_copy(deep=True) for _ in range(num_envs)]
        self._reseed_maps = [_reseeds_maps(config)] * num_envs
        """Per game: whether its config leaves the map seed open (then each episode's seed seeds the map too)."""
        self._sims: list[Simulation | None] = [None] * num_envs
        self._steppers: list[Callable[[], None]] = [_not_started] * num_envs
        """Each game's step call, bound once per simulation (the C++ step directly when that is all a step does)."""
        self._rngs: list[np.random.Generator] = []
        self._replays: ReplayBudget | None = None
        self._writers: list[GameReplayWriter | None] = [None] * num_envs
        self._log = EpisodeLog(num_envs, self._agents)
        self._closed = False
        self._started = False
        self.reset(seed)

    def _policy_env_info(self) -> PolicyEnvInfo:
        """Token space, primary actions (plus a vibe head only when the game has vibe actions) and extras."""
        face = self._interface
        space = gym.spaces.Box(0, 255, tuple(face.observation_shape), dtype=np.uint8)
        primary, vibes = len(face.action_names), len(face.vibe_action_names)
        actions = gym.spaces.Discrete(primary) if not vibes else gym.spaces.MultiDiscrete([primary, vibes + 1])
        return PolicyEnvInfo(space, actions, num_agents=self._agents, extras=self._extras())

    def _extras(self) -> dict[str, Any]:
        """Plain (JSON-able) facts a token policy needs: feature ids, window size, token encoding."""
        face = self._interface
        num_features = 1 + max(f.id for f in face.obs_features)
        names, norms = [""] * num_features, [1.0] * num_features
        for feature in face.obs_features:
            names[feature.id], norms[feature.id] = feature.name, float(feature.normalization)
        return {
            "observation_kind": "token",
            "num_tokens": int(face.observation_shape[0]),
            "token_dim": int(face.observation_shape[1]),
            "obs_height": face.obs_height,
            "obs_width": face.obs_width,
            "num_features": num_features,
            "feature_names": names,
            "feature_normalizations": norms,
            "padding_value": PADDING,
            "global_location": int(PackedCoordinate.GLOBAL_LOCATION),
            "location_encoding": "row << 4 | col",
            "tags": list(face.tags),
            "action_names": list(face.action_names),
            "vibe_action_names": list(face.vibe_action_names),
            "max_steps": self._config.game.max_steps,
        }

    def _allocate(self) -> None:
        """Every per-step array, once: the delivered batch and the simulations' buffers (observations: the batch's)."""
        rows, n, a = self._batch_info.num_rows, self._num_envs, self._agents
        space = self._info.observation_space
        assert isinstance(space, gym.spaces.Box), "token observations are a Box"
        self._buffers = RowBuffers.allocate(rows, space.shape, dtype_observations, fill=PADDING)
        self._sim_terminals = np.zeros(rows, dtype=bool)
        self._sim_truncations = np.zeros(rows, dtype=bool)
        self._sim_rewards = np.zeros(rows, dtype=np.float32)
        self._actions = np.zeros(rows, dtype=dtype_actions)
        self._vibe_actions = np.zeros(rows, dtype=dtype_actions)
        self._sim_buffers = [self._env_buffers(slice(e * a, (e + 1) * a)) for e in range(n)]
        self._env_done = np.zeros(n, dtype=bool)
        self._cut_at = np.full(n, -1, dtype=np.int64)  # desync: the step ending a game's first episode
        self._vibe_ids = self._vibe_action_ids()
        self._action_checks = ActionConverter(self._info.action_space, rows, MettaGridEnvError)

    def _env_buffers(self, rows: slice) -> Buffers:
        """Views of one game's rows: the C++ core writes observations, rewards and flags straight into them."""
        unused = np.zeros(self._agents, dtype=dtype_actions)  # teacher actions: no supervisor here
        return Buffers(
            observations=self._buffers.observations[rows],
            terminals=self._sim_terminals[rows],
            truncations=self._sim_truncations[rows],
            rewards=self._sim_rewards[rows],
            masks=np.ones(self._agents, dtype=bool),
            actions=self._actions[rows],
            teacher_actions=unused,
            vibe_actions=self._vibe_actions[rows],
        )

    def _vibe_action_ids(self) -> np.ndarray:
        """Vibe head index -> simulator action id, index 0 meaning "keep the vibe" (id 0, as mettagrid does)."""
        ids = {action.name: i for i, action in enumerate(self._config.game.actions.actions())}
        return np.array([0, *(ids[n] for n in self._interface.vibe_action_names)], dtype=dtype_actions)

    # -------------------------------------------------------------------- contract
    @property
    def config(self) -> MettaGridConfig:
        """The game configuration (each game runs a private copy)."""
        return self._config

    @property
    def task_family(self) -> TaskFamily | None:
        """The family whose tasks `assign_tasks` hands out (None: every game plays `config`)."""
        return self._family

    @property
    def current_tasks(self) -> tuple[int, ...]:
        """The task id each game plays now (BASE_TASK, -1, for the base config)."""
        return tuple(int(task) for task in self._tasks)

    def assign_tasks(self, tasks: Mapping[int, int]) -> None:
        """Play task `tasks[i]` in game i from its next episode start (reset, or the restart after its end).

        Games not named keep their task; a later assignment to a game replaces one not yet applied.
        """
        if self._family is None:
            raise NotImplementedError(f"MettaGrid env {self.name!r} plays one task: it has no task family to draw "
                                      "tasks from (build it from a family: arena-family, navigation-family or a "
                                      "family file)")
        checked = {self._instance_index(env): self._task_index(task) for env, task in tasks.items()}
        self._pending.update(checked)

    def _instance_index(self, env: Any) -> int:
        """A game index given to `assign_tasks`, checked."""
        if isinstance(env, bool) or not isinstance(env, (int, np.integer)) or not 0 <= env < self._num_envs:
            raise MettaGridEnvError(f"assign_tasks: env instance {env!r} is not an index in [0, {self._num_envs}); "
                                    "key tasks by the instance's env_id")
        return int(env)

    @staticmethod
    def _task_index(task: Any) -> int:
        """A task id given to `assign_tasks`, checked."""
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or task < BASE_TASK:
            raise MettaGridEnvError(f"assign_tasks: task id {task!r} is not an integer >= {BASE_TASK}; use a "
                                    f"non-negative id, or {BASE_TASK} for the family's base")
        return int(task)

    @property
    def mettagrid_interface(self) -> PolicyEnvInterface:
        """mettagrid's own description of the game, for mettagrid policies."""
        return self._interface

    @property
    def simulations(self) -> tuple[Simulation | None, ...]:
        """The live simulation of each game (a finished one stays until its game restarts)."""
        return tuple(self._sims)

    def record_replays(self, directory: Path | None, episodes: int | None = None) -> None:
        """Write MettaScope replays (`<uuid>.json.z`) of the next `episodes` episodes to start (None: all) to
        `directory`; None stops recording. Games pick this up at their next episode start (`reset` or a restart).
        """
        self._replays = None if directory is None else ReplayBudget(Path(directory), episodes)

    def finish_replays(self) -> list[Path]:
        """Write the episodes still being recorded as they stand; every replay written since `record_replays`."""
        for writer in self._writers:
            if writer is not None:
                writer.finish()
        return list(self._replays.written) if self._replays is not None else []

    def reset(self, seed: int | None = None) -> None:
        """Start fresh episodes everywhere; game i gets `seed + i`, or its next drawn seed when `seed` is None."""
        self._require_open()
        if seed is not None:
            if seed < 0:
                raise MettaGridEnvError(f"seed must be non-negative, got {seed}")
            self._rngs = [np.random.default_rng(seed + e) for e in range(self._num_envs)]
        for e in range(self._num_envs):
            self._begin_episode(e, seed + e if seed is not None else None)
        self._buffers.restart_all()
        self._env_done.fill(False)
        self._cut_at.fill(-1)
        self._cut_pending = self._desync
        if self._desync:
            tops = [config.game.max_steps + 1 for config in self._configs]
            self._cut_at[:] = [rng.integers(1, top) for rng, top in zip(self._rngs, tops, strict=True)]
            for e, start in enumerate(self._log.starts):
                start["cut_at"] = int(self._cut_at[e])  # type: ignore[index]
        self._started = True

    def send_actions(self, actions: np.ndarray, rows: slice | None = None) -> None:
        """Step every live game; games that showed their final observation restart instead (actions ignored)."""
        self._require_open()
        self._prepare_send(rows)
        actions = np.asarray(actions)
        self._check_actions(actions)
        self._log.record(actions)
        self._copy_actions(actions, slice(None))
        self._buffers.begin_step()  # counts the step in every live row's episode length
        if self._buffers.any_done:  # some game showed its final observation
            self._step_or_restart()
        else:
            for step in self._steppers:
                step()
        if self._cut_pending:
            self._cut_first_episodes()
        self._record_transition()

    def close(self) -> None:
        """Free every simulation; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._steppers = [_not_started] * self._num_envs
        for e, sim in enumerate(self._sims):
            if sim is not None:
                sim.close()
            self._sims[e] = None

    # -------------------------------------------------------------------- internals
    def _require_open(self) -> None:
        """A closed environment has no simulations left to step."""
        if self._closed:
            raise RuntimeError(f"MettaGridEnvironment {self.name!r} is closed")

    def _check_actions(self, actions: np.ndarray) -> None:
        """Actions must be [rows, heads] integers within each head's range."""
        checks = self._action_checks
        if actions.shape != (checks.rows, checks.heads) or actions.dtype.kind not in "iu":
            raise ValueError(
                f"expected integer actions shaped {(checks.rows, checks.heads)}, got {actions.dtype} {actions.shape}"
            )
        if not checks.in_range(actions):
            raise ValueError(f"actions must lie in [0, {list(self._info.action_nvec)}) per head")

    def _copy_actions(self, actions: np.ndarray, rows: slice) -> None:
        """Copy checked actions for `rows` into the simulators' int32 action buffers (vibe ids looked up)."""
        np.copyto(self._actions[rows], actions[:, 0], casting="unsafe")
        if actions.shape[1] == 2:
            np.take(self._vibe_ids, actions[:, 1], out=self._vibe_actions[rows])

    def _step_or_restart(self) -> None:
        """The slow path of a step: some games restart, the others step."""
        for e, step in enumerate(self._steppers):
            if self._env_done[e]:
                self._begin_episode(e, None)
            else:
                step()

    def _begin_episode(self, env: int, seed: int | None) -> None:
        """Replace game `env`'s simulation; the new one writes its first observation into the game's rows."""
        if seed is None:
            seed = int(self._rngs[env].integers(_SEED_LIMIT))
        start: dict[str, Any] = {"seed": seed}
        if self._family is not None:
            start["task"] = self._take_assigned_task(env)
        self._log.begin(env, start)
        self._new_simulation(env, seed)

    def _take_assigned_task(self, env: int) -> int:
        """Switch game `env` to the task assigned to it, if any; the task its next episode plays."""
        task = self._pending.pop(env, int(self._tasks[env]))
        if task != self._tasks[env]:
            self._use_task(env, task)
        return task

    def _use_task(self, env: int, task: int) -> None:
        """Give game `env` its own copy of task `task`'s config (the base's for BASE_TASK)."""
        assert self._family is not None
        config = self._config.model_copy(deep=True) if task == BASE_TASK else self._family.task(task)
        self._configs[env], self._tasks[env] = config, task
        self._reseed_maps[env] = _reseeds_maps(config)

    def _new_simulation(self, env: int, seed: int) -> None:
        """Build game `env`'s simulation for `seed`, closing the one it replaces."""
        config = self._configs[env]
        builder = config.game.map_builder
        if self._reseed_maps[env] and hasattr(builder, "seed"):
            builder.seed = seed
        old, self._sims[env] = self._sims[env], None
        if old is not None:
            old.close()
        writer = self._writers[env] = GameReplayWriter(self._replays) if self._replays is not None else None
        handlers = [writer] if writer is not None else []
        sim = self._sims[env] = Simulation(config, seed=seed, buffers=self._sim_buffers[env], event_handlers=handlers)
        # without talk, stat-based endings or a replay writer, Simulation.step only adds timers around the C++ step
        fast = not config.game.talk.enabled and not config.game.end_episode_on_game_stats and writer is None
        self._steppers[env] = sim._c_sim.step if fast else sim.step

    def _replay_instance(self, instance: int, start: dict[str, Any], actions: np.ndarray) -> None:
        """Rebuild game `instance` from its episode's task and seed, stepping it through the logged actions."""
        task = int(start.get("task", BASE_TASK))
        if task != self._tasks[instance]:
            if self._family is None:
                raise EnvStateError(f"saved episodes play task {task} of a task family; {self.name!r} has no family")
            self._use_task(instance, task)
        self._new_simulation(instance, start["seed"])
        sim, rows = self._sims[instance], slice(instance * self._agents, (instance + 1) * self._agents)
        assert sim is not None
        for step, step_actions in enumerate(actions, start=1):
            self._copy_actions(step_actions, rows)
            self._steppers[instance]()
            if step == start.get("cut_at"):
                sim.end_episode()

    def _extra_state(self) -> dict[str, Any]:
        """Seed generators, finished games, desync cuts still to come and, with a family, tasks and assignments."""
        state = {
            "rngs": [generator_state(rng) for rng in self._rngs],
            "env_done": torch.from_numpy(self._env_done.copy()),
            "cut_at": torch.from_numpy(self._cut_at.copy()),
            "cut_pending": self._cut_pending,
        }
        if self._family is not None:
            state["family"] = self._family_id()
            state["tasks"] = torch.from_numpy(self._tasks.copy())
            state["pending"] = torch.tensor(sorted(self._pending.items()), dtype=torch.int64).reshape(-1, 2)
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `_extra_state` returned."""
        for rng, saved in zip(self._rngs, state["rngs"], strict=True):
            set_generator_state(rng, saved)
        np.copyto(self._env_done, state["env_done"].numpy())
        np.copyto(self._cut_at, state["cut_at"].numpy())
        self._cut_pending = bool(state["cut_pending"])
        if self._family is not None:
            for env, task in enumerate(state["tasks"].tolist()):  # normally a no-op: the replay set them
                if task != self._tasks[env]:
                    self._use_task(env, task)
            self._pending = {int(env): int(task) for env, task in state["pending"].tolist()}

    def _check_state(self, state: dict[str, Any]) -> None:
        """Also refuse state saved with another task family (or none): its episodes would replay other games."""
        super()._check_state(state)
        saved = state["extra"].get("family") if isinstance(state.get("extra"), dict) else None
        mine = self._family_id() if self._family is not None else None
        if saved != mine:
            raise EnvStateError(f"saved environment state plays task family {saved or 'none'}, this environment "
                                f"{mine or 'none'}; resume with the env the run was saved with")

    def _family_id(self) -> str:
        """The family's name and digest: a family changed under the same name is another family."""
        assert self._family is not None
        return f"{self._family.name}@{self._family.digest}"

    def _cut_first_episodes(self) -> None:
        """End each game's first episode at its drawn step, so games do not all restart together."""
        game_lengths = self._buffers.lengths[:: self._agents]  # a game's agents all share its length
        for e in np.flatnonzero(game_lengths == self._cut_at):
            sim = self._sims[e]
            assert sim is not None
            sim.end_episode()
            self._cut_at[e] = -1
        self._cut_pending = bool((self._cut_at >= 0).any())

    def _record_transition(self) -> None:
        """Delivered rewards and flags (restarting rows: 0 and False), episode totals and finished games."""
        self._buffers.record(self._sim_rewards, self._sim_terminals, self._sim_truncations)
        if self._buffers.any_done:
            self._buffers.done.reshape(self._num_envs, self._agents).any(axis=1, out=self._env_done)
            self._finish_episodes()
        else:
            self._env_done.fill(False)

    def _finish_episodes(self) -> None:
        """End every agent of a finished game (unflagged ones as truncated) and queue one info per agent."""
        a, buffers = self._agents, self._buffers
        for e in np.flatnonzero(self._env_done):
            rows = slice(e * a, (e + 1) * a)
            np.logical_not(buffers.terminals[rows], out=buffers.truncations[rows])
            buffers.done[rows], buffers.mask[rows] = True, False
            self._cut_at[e] = -1
            buffers.infos.extend(self._episode_infos(int(e)))
            buffers.clear_totals(rows)

    def _episode_infos(self, env: int) -> list[dict[str, Any]]:
        """One dict per agent: return, length, ids, then the game's `game/*` and the agent's `agent/*` stats."""
        sim = self._sims[env]
        assert sim is not None
        stats = sim.episode_stats
        game = scalar_infos(stats["game"], "game/")
        if self._family is not None:
            game["task_id"] = int(self._tasks[env])
        infos = []
        for agent, agent_stats in enumerate(stats["agent"]):
            info = self._buffers.episode_info(env * self._agents + agent, env_id=env, agent_id=agent)
            info.update(game)
            info.update(scalar_infos(agent_stats, "agent/"))
            infos.append(info)
        return infos


def _not_started() -> None:
    """The step of a game whose simulation is not built (or was closed)."""
    raise RuntimeError("this MettaGrid game has no simulation")


def _reseeds_maps(config: MettaGridConfig) -> bool:
    """Whether the config leaves its map seed open, so each episode's seed also seeds the map."""
    builder = config.game.map_builder
    return hasattr(builder, "seed") and builder.seed is None


def _base_config(config: MettaGridConfig | None, family: TaskFamily | None) -> MettaGridConfig:
    """The config games play until assigned a task: `config`, or the family's base."""
    if family is None and config is not None:
        return config
    if family is not None and config is None:
        return family.base
    raise MettaGridEnvError("MettaGridEnvironment needs a config or a task family (whose base is the config), "
                            f"not {'both' if config is not None else 'neither'}")


# ---------------------------------------------------------------------------------- factory
def make_mettagrid_environment(
    name_or_path: str, num_envs: int = 1, seed: int = 0, desync_episodes: bool = False, **task_kwargs: Any
) -> MettaGridEnvironment:
    """A catalogue task (keyword arguments go to its builder) or family, or a .yaml/.json config or family file."""
    game = load_config_or_family(name_or_path, **task_kwargs)
    config, family = (None, game) if isinstance(game, TaskFamily) else (game, None)
    try:
        return MettaGridEnvironment(
            config, num_envs=num_envs, seed=seed, desync_episodes=desync_episodes, name=name_or_path, family=family
        )
    except MettaGridEnvError:
        raise
    except Exception as error:  # the C++ core rejects some configs only when a game is built
        raise MettaGridEnvError(
            f"MettaGrid config {name_or_path}: cannot build the game: {one_line(error)}"
        ) from error
