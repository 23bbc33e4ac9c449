"""A tiny seeded PettingZoo ParallelEnv for testing multi-agent adapters and trainers.

Every agent sees its own one-hot target plus the episode's progress `t / episode_length`, and earns
1 for playing the target action. An agent leaves the episode early (terminated) after
`wrong_streak_limit` wrong answers in a row, or at its fixed step in `exit_steps`; the episode
truncates for everyone still present at `episode_length`. So a random policy (which answers wrong
most of the time and soon leaves) scores far below the optimum, and early exits happen constantly,
which exercises the masking of agents that are gone while their environment continues.

Targets are drawn for every possible agent on every step from one generator seeded by
`reset(seed=...)`, so a run is a function of the seed and the actions, whoever has left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces
from pettingzoo import AECEnv, ParallelEnv
from pettingzoo.utils.conversions import parallel_to_aec

__all__ = ["TargetMatchParallelEnv", "env", "parallel_env", "raw_env"]


class TargetMatchParallelEnv(ParallelEnv):  # type: ignore[misc]  # pettingzoo ships no type information
    """Agents copy a shown target action; repeated mistakes or a fixed step make them leave early."""

    metadata: ClassVar[dict[str, Any]] = {
        "name": "mettle_target_match_v0",
        "is_parallelizable": True,
        "render_modes": [],
    }

    def __init__(
        self,
        num_agents: int = 3,
        episode_length: int = 20,
        num_actions: int = 4,
        wrong_streak_limit: int | None = 3,
        exit_steps: Sequence[int | None] | None = None,
        render_mode: str | None = None,
    ) -> None:
        _check_arguments(num_agents, episode_length, num_actions, wrong_streak_limit, exit_steps)
        self.possible_agents = [f"agent_{i}" for i in range(num_agents)]
        self.agents: list[str] = []
        self.episode_length = episode_length
        self.num_actions = num_actions
        self.wrong_streak_limit = wrong_streak_limit
        self.exit_steps = dict(zip(self.possible_agents, exit_steps or [None] * num_agents, strict=True))
        self.render_mode = render_mode
        box = spaces.Box(0.0, 1.0, shape=(num_actions + 1,), dtype=np.float32)
        self.observation_spaces = dict.fromkeys(self.possible_agents, box)
        self.action_spaces = dict.fromkeys(self.possible_agents, spaces.Discrete(num_actions))
        self._rng = np.random.default_rng()
        self._t = 0
        self._targets = np.zeros(num_agents, dtype=np.int64)
        self._streaks = dict.fromkeys(self.possible_agents, 0)
        self._hits = dict.fromkeys(self.possible_agents, 0)

    def observation_space(self, agent: str) -> spaces.Box:
        """The same Box object every call, as the PettingZoo API test demands."""
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Discrete:
        """The same Discrete object every call."""
        return self.action_spaces[agent]

    @property
    def targets(self) -> dict[str, int]:
        """The action each present agent must play now (the optimal policy, for tests)."""
        return {agent: int(self._targets[self.possible_agents.index(agent)]) for agent in self.agents}

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        """Bring every agent back; reseed only when a seed is given so unseeded resets continue the stream."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self._t = 0
        self._streaks = dict.fromkeys(self.possible_agents, 0)
        self._hits = dict.fromkeys(self.possible_agents, 0)
        self._draw_targets()
        return {agent: self._observe(agent) for agent in self.agents}, {agent: {} for agent in self.agents}

    def step(
        self, actions: dict[str, Any]
    ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, bool], dict[str, bool], dict[str, dict[str, Any]]]:
        """Pay the present agents, then drop those whose streak, exit step or the episode ran out."""
        self._t += 1
        rewards = {agent: self._score(agent, actions[agent]) for agent in self.agents}
        terminations = {agent: self._leaves(agent) for agent in self.agents}
        out_of_time = self._t >= self.episode_length
        truncations = {agent: out_of_time and not terminations[agent] for agent in self.agents}
        infos: dict[str, dict[str, Any]] = {agent: {"accuracy": self._hits[agent] / self._t} for agent in self.agents}
        self._draw_targets()
        observations = {agent: self._observe(agent) for agent in self.agents}
        self.agents = [a for a in self.agents if not (terminations[a] or truncations[a])]
        return observations, rewards, terminations, truncations, infos

    def render(self) -> None:
        """Nothing to draw."""

    def close(self) -> None:
        """Nothing to release."""

    # ------------------------------------------------------------------ internals
    def _score(self, agent: str, action: Any) -> float:
        """1 for the target action; also keeps the agent's wrong streak and hit count."""
        hit = int(action) == int(self._targets[self.possible_agents.index(agent)])
        self._streaks[agent] = 0 if hit else self._streaks[agent] + 1
        self._hits[agent] += hit
        return 1.0 if hit else 0.0

    def _leaves(self, agent: str) -> bool:
        """Too many wrong answers in a row, or the agent's fixed exit step has come."""
        limit, exit_step = self.wrong_streak_limit, self.exit_steps[agent]
        return (limit is not None and self._streaks[agent] >= limit) or (exit_step is not None and self._t >= exit_step)

    def _draw_targets(self) -> None:
        """One draw for every possible agent, so departures do not shift the random stream."""
        self._targets = self._rng.integers(self.num_actions, size=len(self.possible_agents))

    def _observe(self, agent: str) -> np.ndarray:
        """One-hot target followed by the episode's progress."""
        obs = np.zeros(self.num_actions + 1, dtype=np.float32)
        obs[self._targets[self.possible_agents.index(agent)]] = 1.0
        obs[-1] = min(self._t / self.episode_length, 1.0)
        return obs


def _check_arguments(
    num_agents: int,
    episode_length: int,
    num_actions: int,
    wrong_streak_limit: int | None,
    exit_steps: Sequence[int | None] | None,
) -> None:
    """Reject settings that would make a degenerate or inconsistent environment."""
    if num_agents < 1 or episode_length < 1 or num_actions < 2:
        raise ValueError(
            f"need num_agents >= 1, episode_length >= 1, num_actions >= 2; got {num_agents}, {episode_length}, "
            f"{num_actions}"
        )
    if wrong_streak_limit is not None and wrong_streak_limit < 1:
        raise ValueError(f"wrong_streak_limit must be >= 1 or None, got {wrong_streak_limit}")
    if exit_steps is not None and (len(exit_steps) != num_agents or any(s is not None and s < 1 for s in exit_steps)):
        raise ValueError(f"exit_steps must hold {num_agents} steps >= 1 (or None), got {list(exit_steps)}")


def parallel_env(**kwargs: Any) -> TargetMatchParallelEnv:
    """The environment itself, in PettingZoo's parallel API."""
    return TargetMatchParallelEnv(**kwargs)


def raw_env(**kwargs: Any) -> AECEnv:
    """The AEC (turn-based) view PettingZoo modules conventionally expose under this name."""
    return parallel_to_aec(parallel_env(**kwargs))


env = raw_env
