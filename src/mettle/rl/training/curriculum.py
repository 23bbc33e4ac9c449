"""Curriculum: which task each episode plays, chosen by learning progress over a bounded pool of task ids.

A task is an int id (a seed that a task family turns into a game config). Two halves, apart because they live
in different places:

- `Curriculum` (learner side, one per rank) keeps statistics of a pool of `pool_size` task ids and, once per
  epoch, turns that epoch's finished episodes into the next `TaskPlan`.
- `TaskSampler` (acting side, wherever the env is stepped, maybe a forked process) draws each episode's task
  from the current plan with its own RNG.

Learning progress. A task's epoch score is its mean episode return. Two moving averages follow it, a fast one
(rate `ema_timescale` per completion) and a slow one (`slow_timescale_ratio` times that); n completions in one
epoch move an average `1 - (1 - rate)**n` of the way. Where they part, the task's score is changing: its
progress is `|fast - slow| + score_bonus * fast`, measured on the pool's running score range [lo, hi] (every
epoch score seen so far), so it does not depend on the scale of the rewards. The averages are kept in return
units and put on that range when progress is read: the map is affine and the averages linear, so this equals
averaging normalised scores, without leaving old averages on a stale scale when the range widens.

Judging. A task is judged once it has `min_completions` completions over at least two scored epochs (one
epoch's score shows no change yet). Until then it counts as the pool's best judged progress: optimism, so a
newcomer is tried at once and soon judged, instead of starving on a first score that cannot show progress.

Sampling weights are `sigmoid(z / temperature)` of the pool's z-scored progress, normalised; a share
`exploration_bonus` of the draws is uniform over the pool, so no task starves.

Eviction. Judged tasks at or below `eviction_percentile` of the judged progress leave the pool, lowest first
(ties by slot), for fresh ids from the curriculum's own seeded RNG. At most max(1, pool_size // 8) tasks are
on trial (not yet judged) at once, and an eviction waits for a free trial place: the pool never churns
wholesale, and each newcomer is judged before the next one comes.

Ranks stay identical: the seed is the same on every rank, and the per-slot totals of an epoch go through
`merge` (an all_reduce sum) before any statistic changes, so every rank applies the same update.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mettle.errors import ConfigError

FRESH_ID_BOUND = 2**31
"""Task ids are drawn from [0, FRESH_ID_BOUND): non-negative, and an int32 holds them."""
TRIAL_SHARE = 8
"""At most max(1, pool_size // TRIAL_SHARE) tasks are on trial (not yet judged) at once."""
MIN_SCORED_EPOCHS = 2
"""Epochs a task is scored in before it is judged: one epoch's score shows no change yet."""
FLAT_STD = 1e-12
"""Progress spread below this is treated as none: every task weighs the same."""

Merge = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over ranks (an all_reduce SUM); every rank gets the same result."""


class CurriculumConfig(BaseModel):
    """How a task family's variants are chosen for episodes."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    algorithm: Literal["uniform", "learning_progress"] = "learning_progress"
    """uniform: a fresh variant every episode; learning_progress: favour the pool's tasks whose score changes."""
    pool_size: int = Field(16, ge=2)
    """Tasks in the active pool (learning_progress); fixed once the curriculum is built."""
    ema_timescale: float = Field(0.1, gt=0, le=1)
    """Rate of the fast score average, per completed episode."""
    slow_timescale_ratio: float = Field(0.2, gt=0, le=1)
    """Rate of the slow score average as a fraction of the fast one."""
    exploration_bonus: float = Field(0.1, ge=0, le=1)
    """Share of draws spread uniformly over the pool, so every task keeps being tried."""
    score_bonus: float = Field(0.01, ge=0)
    """Progress bonus per unit of normalised fast score: keeps tasks already solved in some rotation."""
    temperature: float = Field(0.25, gt=0)
    """Divides progress z-scores before the sigmoid: lower concentrates draws on the top tasks."""
    eviction_percentile: float = Field(40.0, ge=0, le=100)
    """Tasks at or below this percentile of progress (among those seen enough) may be replaced."""
    min_completions: int = Field(20, ge=1)
    """Completed episodes a task needs before it is judged (until then it is tried as if the best; never evicted)."""


@dataclass(frozen=True)
class TaskPlan:
    """Which tasks the next epoch's episodes draw from: the pool and its probabilities, or fresh ids (both None)."""

    task_ids: tuple[int, ...] | None
    probabilities: tuple[float, ...] | None

    def __post_init__(self) -> None:
        """Refuse a plan a sampler could not draw from."""
        if (self.task_ids is None) != (self.probabilities is None):
            raise ValueError("a TaskPlan has both task_ids and probabilities, or neither (fresh ids)")
        if self.task_ids is None or self.probabilities is None:
            return
        if not self.task_ids or len(self.task_ids) != len(self.probabilities):
            raise ValueError(f"a TaskPlan needs one probability per task: {len(self.task_ids)} task ids, "
                             f"{len(self.probabilities)} probabilities")
        if not all(math.isfinite(p) and p >= 0 for p in self.probabilities) or sum(self.probabilities) <= 0:
            raise ValueError("TaskPlan probabilities must be finite, non-negative and not all zero")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form: it crosses to a forked process and lives in checkpoints."""
        return {
            "task_ids": None if self.task_ids is None else list(self.task_ids),
            "probabilities": None if self.probabilities is None else list(self.probabilities),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskPlan:
        """Inverse of `to_dict`."""
        ids, probabilities = data["task_ids"], data["probabilities"]
        return cls(
            None if ids is None else tuple(int(i) for i in ids),
            None if probabilities is None else tuple(float(p) for p in probabilities),
        )


FRESH = TaskPlan(None, None)
"""The plan that draws a fresh task id every episode."""


def generator_state(rng: np.random.Generator) -> str:
    """A numpy Generator's state as a JSON string (its 128-bit integers do not fit a tensor)."""
    return json.dumps(rng.bit_generator.state)


def generator_from_state(text: str) -> np.random.Generator:
    """Inverse of `generator_state`."""
    state = json.loads(text)
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def fresh_task_id(rng: np.random.Generator) -> int:
    """A new task id: any in [0, FRESH_ID_BOUND), equally likely."""
    return int(rng.integers(0, FRESH_ID_BOUND))


class TaskSampler:
    """Acting side: draws each episode's task from the latest plan, with its own RNG (so draws resume exactly)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.plan = FRESH
        self._cumulative: np.ndarray | None = None

    def set_plan(self, plan: TaskPlan) -> None:
        """Draw from `plan` from the next task on (until a plan is set, every task is a fresh id)."""
        self.plan = plan
        self._cumulative = None if plan.probabilities is None else np.cumsum(plan.probabilities)

    def next_task(self) -> int:
        """The task the next episode plays: a fresh id, or one of the plan's by its probability."""
        if self.plan.task_ids is None or self._cumulative is None:
            return fresh_task_id(self.rng)
        target = self.rng.random() * self._cumulative[-1]
        index = min(int(np.searchsorted(self._cumulative, target, side="right")), len(self.plan.task_ids) - 1)
        return self.plan.task_ids[index]

    def state_dict(self) -> dict[str, Any]:
        """RNG and plan as plain containers."""
        return {"rng": generator_state(self.rng), "plan": self.plan.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the draws where `state_dict` left them."""
        self.rng = generator_from_state(state["rng"])
        self.set_plan(TaskPlan.from_dict(state["plan"]))


def ema_step(average: torch.Tensor, score: torch.Tensor, rate: float, count: torch.Tensor) -> torch.Tensor:
    """An average moved toward `score` as if by `count` completions, each moving it `rate` of the way."""
    return average + (1.0 - (1.0 - rate) ** count) * (score - average)


def normalise(values: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """`values` on the score range [lo, hi] (0 for all while the range is empty or a single point)."""
    if not hi > lo:
        return torch.zeros_like(values)
    return (values - lo) / (hi - lo)


def learning_progress(fast: torch.Tensor, slow: torch.Tensor, judged: torch.Tensor, lo: float, hi: float,
                      score_bonus: float) -> torch.Tensor:
    """|fast - slow| + score_bonus * fast on the normalised range; a task not yet judged gets the judged max."""
    fast_n, slow_n = normalise(fast, lo, hi), normalise(slow, lo, hi)
    progress = (fast_n - slow_n).abs() + score_bonus * fast_n
    optimistic = progress[judged].max() if bool(judged.any()) else torch.zeros((), dtype=progress.dtype)
    return torch.where(judged, progress, optimistic)


def sampling_probabilities(progress: torch.Tensor, temperature: float, exploration_bonus: float) -> torch.Tensor:
    """sigmoid(z-scored progress / temperature), normalised, mixed with a uniform floor of `exploration_bonus`."""
    std = progress.std(unbiased=False)
    if float(std) <= FLAT_STD:
        weights = torch.ones_like(progress)
    else:
        weights = torch.sigmoid((progress - progress.mean()) / std / temperature)
    weights = weights / weights.sum()
    return (1.0 - exploration_bonus) * weights + exploration_bonus / len(progress)


def eviction_slots(progress: torch.Tensor, eligible: torch.Tensor, percentile: float, cap: int) -> list[int]:
    """Eligible slots at or below `percentile` of the eligible progress: lowest first, ties by slot, at most `cap`."""
    slots = [int(s) for s in torch.nonzero(eligible).flatten()]
    if len(slots) < 2:  # one task alone is its own percentile: nothing to compare it with yet
        return []
    values = progress[slots].numpy()
    threshold = float(np.percentile(values, percentile))
    below = sorted((float(value), slot) for value, slot in zip(values, slots, strict=True) if value <= threshold)
    return [slot for _, slot in below[:cap]]


def slot_totals(infos: Sequence[dict[str, Any]], slot_of: dict[int, int]) -> torch.Tensor:
    """Per pool slot (sum of episode returns, agent-episodes) of the infos whose task is in the pool."""
    totals = [[0.0, 0.0] for _ in slot_of]
    for info in infos:
        slot = slot_of.get(int(info["task_id"]))
        if slot is not None:
            totals[slot][0] += float(info["episode_return"])
            totals[slot][1] += 1.0
    return torch.tensor(totals, dtype=torch.float64).reshape(len(slot_of), 2)


class Curriculum:
    """Learner side: scores the pool's tasks each epoch and plans the next epoch's draws (identical on every rank)."""

    def __init__(self, config: CurriculumConfig, seed: int, num_agents: int) -> None:
        if seed < 0 or num_agents < 1:
            raise ValueError(f"Curriculum needs seed >= 0 and num_agents >= 1 (got {seed} and {num_agents})")
        self.config = config
        self.num_agents = num_agents
        """Infos per finished episode: agent-episodes / num_agents = completions."""
        self.rng = np.random.default_rng(seed)
        size = config.pool_size if config.algorithm == "learning_progress" else 0
        self.task_ids = torch.full((size,), -1, dtype=torch.int64)
        self.fast = torch.zeros(size, dtype=torch.float64)
        self.slow = torch.zeros(size, dtype=torch.float64)
        self.completions = torch.zeros(size, dtype=torch.float64)
        self.scored_epochs = torch.zeros(size, dtype=torch.int64)
        self.score_lo = math.inf
        self.score_hi = -math.inf
        self.evictions = 0
        """Tasks replaced since the start of the run."""
        self.last: dict[str, float] = {}
        """Figures of the last update from this rank's infos (reporting only; not checkpointed)."""
        for slot in range(size):
            self._refill(slot)

    @property
    def pool_size(self) -> int:
        """Active tasks (0 for uniform, which has no pool)."""
        return len(self.task_ids)

    def plan(self) -> TaskPlan:
        """The draws of the next epoch: the pool by learning progress, or fresh ids (uniform)."""
        if self.pool_size == 0:
            return FRESH
        config = self.config
        probabilities = sampling_probabilities(self.progress(), config.temperature, config.exploration_bonus)
        return TaskPlan(tuple(int(t) for t in self.task_ids), tuple(float(p) for p in probabilities))

    def progress(self) -> torch.Tensor:
        """Each pool slot's learning progress (tasks not yet judged get the best judged one's)."""
        return learning_progress(self.fast, self.slow, self.judged(), self.score_lo, self.score_hi,
                                 self.config.score_bonus)

    def judged(self) -> torch.Tensor:
        """Which slots have been seen enough to be judged by their progress (and so may be evicted)."""
        return (self.completions >= self.config.min_completions) & (self.scored_epochs >= MIN_SCORED_EPOCHS)

    def update(self, infos: list[dict[str, Any]], merge: Merge | None = None) -> TaskPlan:
        """Score this epoch's finished episodes (every rank's, via `merge`), evict stale tasks, plan the next epoch."""
        self._report(infos)
        if self.pool_size == 0:
            return FRESH
        slot_of = {int(task): slot for slot, task in enumerate(self.task_ids)}
        totals = slot_totals(infos, slot_of)
        if merge is not None:
            totals = merge(totals)
        self._score(totals)
        evicted = self._evict()
        self.last["curriculum/evicted"] = float(len(evicted))
        return self.plan()

    def _report(self, infos: list[dict[str, Any]]) -> None:
        """Reporting figures of this rank's infos, stale ones (task no longer in the pool) included."""
        pool = {int(t) for t in self.task_ids}
        tasks = [int(info["task_id"]) for info in infos]
        self.last = {
            "curriculum/agent_episodes": float(len(tasks)),
            "curriculum/tasks_drawn": float(len(set(tasks))),
        }
        if self.pool_size:
            self.last["curriculum/stale_episodes"] = float(sum(task not in pool for task in tasks))

    def _score(self, totals: torch.Tensor) -> None:
        """Fold one epoch's merged per-slot totals into the score range, the averages and the counts."""
        if totals.shape != (self.pool_size, 2):
            raise ValueError(f"merge returned shape {tuple(totals.shape)}, expected {(self.pool_size, 2)}")
        totals = totals.to(torch.float64)
        played = totals[:, 1] > 0
        if not bool(played.any()):
            return
        scores = totals[:, 0] / totals[:, 1].clamp(min=1.0)
        self.score_lo = min(self.score_lo, float(scores[played].min()))
        self.score_hi = max(self.score_hi, float(scores[played].max()))
        count = totals[:, 1] / self.num_agents
        first = played & (self.scored_epochs == 0)
        rate = self.config.ema_timescale
        fast = torch.where(first, scores, ema_step(self.fast, scores, rate, count))
        slow = torch.where(first, scores, ema_step(self.slow, scores, rate * self.config.slow_timescale_ratio, count))
        self.fast = torch.where(played, fast, self.fast)
        self.slow = torch.where(played, slow, self.slow)
        self.completions += count
        self.scored_epochs += played.to(torch.int64)

    def _evict(self) -> list[int]:
        """Replace the lowest-progress judged tasks, as many as there are free trial places; the slots replaced."""
        judged = self.judged()
        free = max(1, self.pool_size // TRIAL_SHARE) - int((~judged).sum())
        slots = eviction_slots(self.progress(), judged, self.config.eviction_percentile, free) if free > 0 else []
        for slot in sorted(slots):
            self._refill(slot)
        self.evictions += len(slots)
        return slots

    def _refill(self, slot: int) -> None:
        """Put a fresh task id, not already in the pool, into `slot`, with no statistics."""
        pool = {int(t) for t in self.task_ids}
        task = fresh_task_id(self.rng)
        while task in pool:
            task = fresh_task_id(self.rng)
        self.task_ids[slot] = task
        self.fast[slot] = self.slow[slot] = self.completions[slot] = 0.0
        self.scored_epochs[slot] = 0

    def stats(self) -> dict[str, float]:
        """Figures for the logs: the pool's progress and score range, evictions, and the last update's infos."""
        figures = dict(self.last)
        if self.pool_size == 0:
            return figures
        progress = self.progress()
        figures["curriculum/pool_evictions"] = float(self.evictions)
        figures["curriculum/progress_max"] = float(progress.max())
        figures["curriculum/progress_mean"] = float(progress.mean())
        figures["curriculum/probability_max"] = max(self.plan().probabilities or (0.0,))
        figures["curriculum/tasks_judged"] = float(self.judged().sum())
        if self.score_hi >= self.score_lo:
            figures["curriculum/score_lo"] = self.score_lo
            figures["curriculum/score_hi"] = self.score_hi
        return figures

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors (loadable with torch.load(weights_only=True)); the same on every rank."""
        return {
            "algorithm": self.config.algorithm,
            "pool_size": self.pool_size,
            "rng": generator_state(self.rng),
            "task_ids": self.task_ids.clone(),
            "fast": self.fast.clone(),
            "slow": self.slow.clone(),
            "completions": self.completions.clone(),
            "scored_epochs": self.scored_epochs.clone(),
            "score_lo": self.score_lo,
            "score_hi": self.score_hi,
            "evictions": self.evictions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`'s output; refuses one from another algorithm or pool size."""
        if state.get("algorithm") != self.config.algorithm or state.get("pool_size") != self.pool_size:
            raise ConfigError(
                f"the saved curriculum is algorithm={state.get('algorithm')!r} with a pool of {state.get('pool_size')}"
                f", this run's is algorithm={self.config.algorithm!r} with {self.pool_size}: resume with the same "
                "curriculum.algorithm and curriculum.pool_size"
            )
        self.rng = generator_from_state(state["rng"])
        self.task_ids = state["task_ids"].to(torch.int64).clone()
        self.fast = state["fast"].to(torch.float64).clone()
        self.slow = state["slow"].to(torch.float64).clone()
        self.completions = state["completions"].to(torch.float64).clone()
        self.scored_epochs = state["scored_epochs"].to(torch.int64).clone()
        self.score_lo = float(state["score_lo"])
        self.score_hi = float(state["score_hi"])
        self.evictions = int(state["evictions"])
