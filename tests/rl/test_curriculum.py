"""The curriculum checked by oracle: synthetic tasks whose score at their k-th completion is known, and hand sums.

Kinds of task (the score of the k-th completion, in [0, 1], always a multiple of 1/64 so sums are exact):
constant (0.25), improving (0 rising linearly to 0.75 over RISE completions, flat after), noise (independent
uniform scores in [0.25, 0.75], seeded by task and k) and solved (1.0). A harness plays epochs: the sampler
draws each episode's task from the plan, every agent reports the episode's return, the curriculum updates.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mettle.errors import ConfigError
from mettle.rl.training.curriculum import (
    FRESH_ID_BOUND,
    Curriculum,
    CurriculumConfig,
    TaskPlan,
    TaskSampler,
    learning_progress,
    sampling_probabilities,
)

RISE = 200
"""Completions over which an improving task's score climbs before it plateaus."""
OTHERS = ("constant", "noise", "solved")
Infos = list[dict[str, Any]]


def task_score(kind: str, task: int, k: int) -> float:
    """The score of `task`'s k-th completion (k from 1), rounded to 1/64."""
    if kind == "constant":
        value = 0.25
    elif kind == "improving":
        value = 0.75 * min(k, RISE) / RISE
    elif kind == "noise":
        value = 0.25 + 0.5 * float(np.random.default_rng([task, k]).random())
    else:
        value = 1.0
    return round(value * 64) / 64


@dataclass
class Epoch:
    """What one epoch of the harness saw."""

    plan: TaskPlan
    draws: Counter[int]
    infos: Infos
    evicted: set[int]
    added: set[int]
    completions_before: dict[int, int]
    stats: dict[str, float]


@dataclass
class Harness:
    """Plays epochs of synthetic tasks against a curriculum; a task's kind is fixed when it is first drawn."""

    curriculum: Curriculum
    sampler: TaskSampler
    kind_of: Callable[[int], str]
    episodes: int = 64
    num_agents: int = 2
    kinds: dict[int, str] = field(default_factory=dict)
    completions: Counter[int] = field(default_factory=Counter)
    history: list[Epoch] = field(default_factory=list)

    def play(self, plan: TaskPlan) -> tuple[Counter[int], Infos]:
        """One epoch of episodes drawn from `plan`: the draws and every agent's info."""
        self.sampler.set_plan(plan)
        draws: Counter[int] = Counter()
        infos: Infos = []
        for _ in range(self.episodes):
            task = self.sampler.next_task()
            draws[task] += 1
            self.completions[task] += 1
            kind = self.kinds.setdefault(task, self.kind_of(task))
            score = task_score(kind, task, self.completions[task])
            infos += [{"task_id": task, "episode_return": score, "env_id": 0} for _ in range(self.num_agents)]
        return draws, infos

    def epoch(self) -> Epoch:
        """Play one epoch and update the curriculum with it."""
        plan = self.curriculum.plan()
        before = dict(self.completions)
        draws, infos = self.play(plan)
        new_plan = self.curriculum.update(infos)
        old, new = set(plan.task_ids or ()), set(new_plan.task_ids or ())
        record = Epoch(plan, draws, infos, old - new, new - old, before, self.curriculum.stats())
        self.history.append(record)
        return record

    def run(self, epochs: int) -> Harness:
        """Play `epochs` epochs."""
        for _ in range(epochs):
            self.epoch()
        return self


def pool(curriculum: Curriculum) -> list[int]:
    """The curriculum's pool of task ids, in slot order."""
    ids = curriculum.plan().task_ids
    assert ids is not None
    return list(ids)


def one_improving(curriculum: Curriculum) -> Callable[[int], str]:
    """Kinds: the first pool slot improves, the others cycle through constant/noise/solved, newcomers by id."""
    first = pool(curriculum)
    assigned = {task: ("improving" if slot == 0 else OTHERS[(slot - 1) % 3]) for slot, task in enumerate(first)}
    return lambda task: assigned.get(task, OTHERS[task % 3])


def harness(config: CurriculumConfig, seed: int = 0, kinds: str = "one_improving", **kwargs: Any) -> Harness:
    """A curriculum and a sampler seeded from `seed`, with the named task kinds."""
    curriculum = Curriculum(config, seed=seed, num_agents=kwargs.get("num_agents", 2))
    kind_of = one_improving(curriculum) if kinds == "one_improving" else (lambda task: kinds)
    return Harness(curriculum, TaskSampler(seed + 1), kind_of, **kwargs)


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two state dicts hold the same keys and exactly equal values."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def saved_and_loaded(state: dict[str, Any]) -> dict[str, Any]:
    """`state` after torch.save and torch.load(weights_only=True), as a checkpoint carries it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def sigmoid(x: float) -> float:
    """The logistic function, written out."""
    return 1.0 / (1.0 + math.exp(-x))


# ---- hand-worked numbers -------------------------------------------------------------------------------------


def test_two_epochs_of_averages_by_hand() -> None:
    """Fast rate 0.5, slow 0.25; first score sets both averages, then n completions move them 1-(1-r)^n."""
    config = CurriculumConfig(pool_size=2, ema_timescale=0.5, slow_timescale_ratio=0.5, min_completions=100)
    curriculum = Curriculum(config, seed=3, num_agents=1)
    a, b = pool(curriculum)
    curriculum.update([{"task_id": a, "episode_return": 1.0}, {"task_id": a, "episode_return": 3.0},
                       {"task_id": b, "episode_return": 0.0}, {"task_id": 12345, "episode_return": 99.0}])
    state = curriculum.state_dict()
    assert state["fast"].tolist() == [2.0, 0.0] and state["slow"].tolist() == [2.0, 0.0]
    assert (state["score_lo"], state["score_hi"]) == (0.0, 2.0), "an info outside the pool scores nothing"
    assert curriculum.stats()["curriculum/stale_episodes"] == 1.0
    curriculum.update([{"task_id": a, "episode_return": 4.0}] + [{"task_id": b, "episode_return": 1.0}] * 3)
    state = curriculum.state_dict()
    # a: one completion, fast 2 + 0.5 * (4 - 2) = 3, slow 2 + 0.25 * 2 = 2.5
    # b: three completions at once, fast 1 - 0.5^3 = 0.875, slow 1 - 0.75^3 = 0.578125
    assert state["fast"].tolist() == [3.0, 0.875]
    assert state["slow"].tolist() == [2.5, 0.578125]
    assert state["completions"].tolist() == [3.0, 4.0]
    assert (state["score_lo"], state["score_hi"]) == (0.0, 4.0)
    assert curriculum.plan().probabilities == (0.5, 0.5), "no task is judged yet: all equally optimistic"


def test_progress_and_probabilities_by_hand() -> None:
    fast = torch.tensor([3.0, 0.875], dtype=torch.float64)
    slow = torch.tensor([2.5, 0.578125], dtype=torch.float64)
    both = torch.tensor([True, True])
    progress = learning_progress(fast, slow, both, 0.0, 4.0, score_bonus=0.2)
    # |3 - 2.5| / 4 + 0.2 * 3 / 4 and |0.875 - 0.578125| / 4 + 0.2 * 0.875 / 4
    assert progress.tolist() == pytest.approx([0.275, 0.11796875], abs=1e-15)
    optimistic = learning_progress(fast, slow, torch.tensor([False, True]), 0.0, 4.0, score_bonus=0.2)
    assert optimistic.tolist() == pytest.approx([0.11796875, 0.11796875], abs=1e-15)
    # two values: z-scores -1 and +1; temperature 0.5 doubles them; a floor of 0.2 spread over 2 tasks
    weights = [sigmoid(-2.0), sigmoid(2.0)]
    expected = [0.8 * w / sum(weights) + 0.1 for w in weights]
    got = sampling_probabilities(torch.tensor([0.1, 0.3], dtype=torch.float64), 0.5, 0.2)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    flat = sampling_probabilities(torch.full((4,), 0.3, dtype=torch.float64), 0.5, 0.2)
    assert flat.tolist() == pytest.approx([0.25] * 4, abs=1e-15)


def test_judged_slots_by_hand_and_eviction_of_the_lowest() -> None:
    """Pool of 4, min 2 completions: after two epochs the flat task goes, the moving ones stay."""
    config = CurriculumConfig(pool_size=4, min_completions=2, eviction_percentile=50, score_bonus=0.0)
    curriculum = Curriculum(config, seed=11, num_agents=1)
    first = pool(curriculum)
    returns = {first[0]: (0.0, 1.0), first[1]: (0.5, 0.5), first[2]: (0.0, 0.5), first[3]: (1.0, 0.0)}
    curriculum.update([{"task_id": t, "episode_return": r[0]} for t, r in returns.items()])
    assert curriculum.stats()["curriculum/evicted"] == 0.0, "one scored epoch judges nobody"
    curriculum.update([{"task_id": t, "episode_return": r[1]} for t, r in returns.items()])
    after = pool(curriculum)
    assert [t in after for t in first] == [True, False, True, True], "only the task whose score did not move"
    assert curriculum.stats()["curriculum/pool_evictions"] == 1.0


# ---- oracle runs --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_run() -> Harness:
    """Default config, pool of 16: one improving task among constant, noise and solved ones; 40 epochs."""
    return harness(CurriculumConfig()).run(40)


def test_learning_progress_concentrates_on_the_improving_task(default_run: Harness) -> None:
    """While it climbs (after its first 20 completions), the improving task gets well over twice a uniform share."""
    improving = next(t for t, k in default_run.kinds.items() if k == "improving")
    climbing = [e for e in default_run.history if 20 <= e.completions_before.get(improving, 0) < RISE]
    assert len(climbing) >= 10, "the run covers the climb"
    drawn = sum(e.draws[improving] for e in climbing) / sum(sum(e.draws.values()) for e in climbing)
    uniform = 1 / 16
    assert drawn > 2.0 * uniform, f"improving task share {drawn:.3f}, uniform {uniform:.3f}"
    for task, kind in default_run.kinds.items():
        present = [e for e in climbing if task in (e.plan.task_ids or ())]
        if task != improving and len(present) >= 5:
            share = sum(e.draws[task] for e in present) / sum(sum(e.draws.values()) for e in present)
            assert share < drawn, f"a {kind} task drew {share:.3f}, more than the improving one ({drawn:.3f})"
            if kind == "constant":
                assert share < uniform, f"a constant task drew {share:.3f}, uniform is {uniform:.3f}"


def test_the_plan_is_a_distribution_with_its_floor(default_run: Harness) -> None:
    floor = 0.1 / 16
    for epoch in default_run.history:
        probabilities = epoch.plan.probabilities
        assert probabilities is not None and len(probabilities) == 16
        assert math.isclose(sum(probabilities), 1.0, abs_tol=1e-12)
        assert min(probabilities) >= floor - 1e-15


def test_the_floor_keeps_every_task_drawn() -> None:
    """Nearly hard weights (temperature 0.01, no score bonus): flat tasks live on the floor alone, and are drawn."""
    config = CurriculumConfig(pool_size=8, temperature=0.01, exploration_bonus=0.2, min_completions=10,
                              score_bonus=0.0)
    run = harness(config, episodes=200).run(32)
    floor = 0.2 / 8
    for task in run.kinds:
        epochs = [e for e in run.history[2:] if task in (e.plan.task_ids or ())]
        if len(epochs) < 10:
            continue
        share = sum(e.draws[task] for e in epochs) / sum(sum(e.draws.values()) for e in epochs)
        kind = run.kinds[task]
        assert share >= 0.6 * floor, f"{kind} task drawn {share:.4f} of the time, floor {floor:.4f}"
        if kind in ("constant", "solved"):
            assert share <= 2.0 * floor, f"a flat {kind} task should live on the floor, drew {share:.4f}"


def test_eviction_replaces_flat_tasks_and_keeps_the_improving_one() -> None:
    """Newcomers are noise tasks: the first pool's flat tasks are the lowest and all go; the climber stays while it
    climbs and goes once it has been flat for a while."""
    config = CurriculumConfig(pool_size=8)
    run = harness(config, seed=5)
    initial = pool(run.curriculum)
    first_kinds = run.kind_of
    run.kind_of = lambda task: first_kinds(task) if task in initial else "noise"
    run.run(70)
    improving = next(t for t in initial if run.kinds[t] == "improving")
    seen: set[int] = set(initial)
    evicted_total = 0
    first = next(i for i, e in enumerate(run.history) if e.evicted)
    assert run.history[first].stats["curriculum/tasks_judged"] == 7, "the first newcomer waits for a full verdict"
    for epoch in run.history[first:]:
        assert epoch.stats["curriculum/tasks_judged"] >= 7, "at most max(1, 8 // 8) newcomer on trial at once"
    for epoch in run.history:
        assert len(epoch.evicted) == len(epoch.added) <= 1
        for task in epoch.evicted:
            played = epoch.completions_before.get(task, 0) + epoch.draws[task]
            assert played >= config.min_completions, f"evicted after {played} completions"
            if task == improving:
                assert played >= RISE, f"the improving task was evicted while climbing ({played} completions)"
        assert not epoch.added & seen, "replacements are fresh ids"
        seen |= epoch.added
        evicted_total += len(epoch.evicted)
        assert len(set(epoch.plan.task_ids or ())) == 8
    flat = [t for t in initial if run.kinds[t] in ("constant", "solved")]
    assert flat and all(t not in pool(run.curriculum) for t in flat), "every flat task of the first pool left"
    plateaued = [e for e in run.history if improving in e.evicted]
    assert plateaued, "once flat after its climb, the improving task goes too"
    assert run.curriculum.stats()["curriculum/pool_evictions"] == evicted_total > 0


def test_no_task_is_evicted_before_min_completions() -> None:
    """A higher bar: with min_completions 60, the first eviction waits until a task has had 60 episodes."""
    config = CurriculumConfig(pool_size=8, min_completions=60)
    run = harness(config, seed=2).run(30)
    events = [(e, t) for e in run.history for t in e.evicted]
    assert events, "evictions happen once tasks are judged"
    for epoch, task in events:
        assert epoch.completions_before.get(task, 0) + epoch.draws[task] >= 60


# ---- uniform --------------------------------------------------------------------------------------------------


def test_uniform_draws_a_fresh_task_every_episode() -> None:
    curriculum = Curriculum(CurriculumConfig(algorithm="uniform"), seed=0, num_agents=2)
    assert curriculum.plan() == TaskPlan(None, None)
    sampler = TaskSampler(9)
    sampler.set_plan(curriculum.plan())
    tasks = [sampler.next_task() for _ in range(2000)]
    assert len(set(tasks)) >= 1995 and all(0 <= t < FRESH_ID_BOUND for t in tasks)
    assert max(tasks) > FRESH_ID_BOUND // 2 > min(tasks), "ids spread over the whole range"
    infos = [{"task_id": t, "episode_return": 1.0} for t in tasks[:10] for _ in range(2)]
    assert curriculum.update(infos) == TaskPlan(None, None)
    assert curriculum.stats() == {"curriculum/agent_episodes": 20.0, "curriculum/tasks_drawn": 10.0}


# ---- determinism and resume -----------------------------------------------------------------------------------


def test_same_seed_same_plans_and_draws() -> None:
    runs = [harness(CurriculumConfig(pool_size=8, min_completions=5), seed=7).run(25) for _ in range(2)]
    for a, b in zip(runs[0].history, runs[1].history, strict=True):
        assert a.plan == b.plan and a.draws == b.draws
    assert_same_state(runs[0].curriculum.state_dict(), runs[1].curriculum.state_dict())
    other = harness(CurriculumConfig(pool_size=8), seed=8)
    assert pool(other.curriculum) != pool(runs[0].curriculum)


def test_resume_mid_run_continues_identically() -> None:
    config = CurriculumConfig(pool_size=8, min_completions=5)
    straight = harness(config, seed=4).run(30)
    first = harness(config, seed=4).run(12)
    resumed = harness(config, seed=999)  # other seeds: everything must come from the saved state
    resumed.curriculum.load_state_dict(saved_and_loaded(first.curriculum.state_dict()))
    resumed.sampler.load_state_dict(saved_and_loaded(first.sampler.state_dict()))
    resumed.kind_of, resumed.kinds, resumed.completions = first.kind_of, first.kinds, first.completions
    resumed.run(18)
    assert [e.plan for e in resumed.history] == [e.plan for e in straight.history[12:]]
    assert [e.draws for e in resumed.history] == [e.draws for e in straight.history[12:]]
    assert sum(len(e.evicted) for e in resumed.history) > 0, "the resumed part evicts, so the RNG matters"
    assert_same_state(resumed.curriculum.state_dict(), straight.curriculum.state_dict())
    assert resumed.sampler.state_dict() == straight.sampler.state_dict()


def test_state_is_plain_and_refuses_another_pool() -> None:
    curriculum = Curriculum(CurriculumConfig(pool_size=8), seed=0, num_agents=1)
    state = saved_and_loaded(curriculum.state_dict())
    with pytest.raises(ConfigError, match="pool_size") as error:
        Curriculum(CurriculumConfig(pool_size=9), seed=0, num_agents=1).load_state_dict(state)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="algorithm"):
        Curriculum(CurriculumConfig(algorithm="uniform"), seed=0, num_agents=1).load_state_dict(state)


def test_task_plan_travels_as_json() -> None:
    plan = Curriculum(CurriculumConfig(pool_size=4), seed=1, num_agents=1).plan()
    assert TaskPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert TaskPlan.from_dict(json.loads(json.dumps(TaskPlan(None, None).to_dict()))) == TaskPlan(None, None)
    with pytest.raises(ValueError, match="one probability per task"):
        TaskPlan((1, 2), (1.0,))
    with pytest.raises(ValueError, match="or neither"):
        TaskPlan((1, 2), None)
    with pytest.raises(ValueError, match="non-negative"):
        TaskPlan((1, 2), (1.5, -0.5))


def test_sampler_follows_the_plan_probabilities() -> None:
    sampler = TaskSampler(0)
    sampler.set_plan(TaskPlan((10, 20, 30), (0.2, 0.0, 0.8)))
    counts = Counter(sampler.next_task() for _ in range(20000))
    assert counts[20] == 0
    assert counts[10] / 20000 == pytest.approx(0.2, abs=0.015)
    assert counts[30] / 20000 == pytest.approx(0.8, abs=0.015)


# ---- ranks ----------------------------------------------------------------------------------------------------


class Captured(Exception):
    """Raised by a merge that only records the totals it was given."""


def rank_totals(curriculum: Curriculum, infos: Infos) -> torch.Tensor:
    """The per-slot totals `curriculum` would all_reduce for `infos`, without changing it."""
    seen: list[torch.Tensor] = []

    def capture(totals: torch.Tensor) -> torch.Tensor:
        seen.append(totals.clone())
        raise Captured

    before = curriculum.state_dict()
    with pytest.raises(Captured):
        curriculum.update(infos, merge=capture)
    assert_same_state(curriculum.state_dict(), before)  # nothing changed before the merge
    assert seen[0].dtype == torch.float64 and seen[0].shape == (curriculum.pool_size, 2)
    return seen[0]


def test_merged_ranks_agree_with_one_rank_seeing_everything() -> None:
    config = CurriculumConfig(pool_size=8, min_completions=5)
    ranks = [harness(config, seed=6, episodes=32) for _ in range(2)]
    for rank, sampler_seed in zip(ranks, (100, 200), strict=True):
        rank.sampler = TaskSampler(sampler_seed)  # each rank draws its own episodes
    whole = Curriculum(config, seed=6, num_agents=2)
    for _ in range(30):
        plans = [rank.curriculum.plan() for rank in ranks]
        assert plans[0] == plans[1] == whole.plan()
        played = [rank.play(plan)[1] for rank, plan in zip(ranks, plans, strict=True)]
        totals = [rank_totals(rank.curriculum, infos) for rank, infos in zip(ranks, played, strict=True)]
        assert not torch.equal(totals[0], totals[1]), "the ranks saw different episodes"

        def all_reduce(_mine: torch.Tensor, summed: torch.Tensor = totals[0] + totals[1]) -> torch.Tensor:
            return summed

        for rank, infos in zip(ranks, played, strict=True):
            rank.curriculum.update(infos, merge=all_reduce)
        whole.update(played[0] + played[1])
        assert_same_state(ranks[0].curriculum.state_dict(), ranks[1].curriculum.state_dict())
        assert_same_state(ranks[0].curriculum.state_dict(), whole.state_dict())
    assert whole.stats()["curriculum/pool_evictions"] > 0


# ---- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [
    ("algorithm", "greedy"), ("pool_size", 1), ("ema_timescale", 0.0), ("ema_timescale", 1.5),
    ("slow_timescale_ratio", 0.0), ("slow_timescale_ratio", 2.0), ("exploration_bonus", -0.1),
    ("exploration_bonus", 1.1), ("score_bonus", -1.0), ("temperature", 0.0), ("eviction_percentile", 101.0),
    ("eviction_percentile", -1.0), ("min_completions", 0),
])
def test_bad_config_values_name_the_field(name: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=name):
        CurriculumConfig(**{name: value})
    config = CurriculumConfig()
    with pytest.raises(ValidationError, match=name):
        setattr(config, name, value)


def test_unknown_config_field_is_refused() -> None:
    with pytest.raises(ValidationError, match="pool_sise"):
        CurriculumConfig(pool_sise=8)  # type: ignore[call-arg]
