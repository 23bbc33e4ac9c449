"""TaskCurriculum: per-bucket figures computed by hand, and the plan it hands the rollouts after each update."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from mettle.rl.training.components.task_curriculum import TaskCurriculum
from mettle.rl.training.context import EpochStats
from mettle.rl.training.curriculum import Curriculum, CurriculumConfig, TaskPlan

BUCKETS = {11: {"size": "small", "steps": "128"}, 22: {"size": "large", "steps": "128"},
           33: {"size": "large", "steps": "256"}}
LABELS = {"size": ["small", "large"], "steps": ["128", "256"]}


class Rollouts:
    """Records what the component hands the rollout side."""

    def __init__(self) -> None:
        self.sampler: Any = None
        self.plans: list[TaskPlan] = []

    def use_tasks(self, sampler: Any) -> None:
        self.sampler = sampler

    def set_task_plan(self, plan: TaskPlan) -> None:
        self.plans.append(plan)


def component(algorithm: str = "uniform") -> tuple[TaskCurriculum, Rollouts, EpochStats]:
    curriculum = Curriculum(CurriculumConfig(algorithm=algorithm, pool_size=4), seed=3, num_agents=1)  # type: ignore[arg-type]
    part = TaskCurriculum(curriculum, BUCKETS.__getitem__, LABELS, seed=3)
    rollouts, stats = Rollouts(), EpochStats()
    distributed = SimpleNamespace(seed_offset=lambda: 0, is_master=lambda: True)
    part.register(SimpleNamespace(rollouts=rollouts, stats=stats, distributed=distributed))
    return part, rollouts, stats


def test_bucket_figures_are_shares_of_episodes_and_mean_returns() -> None:
    part, _, _ = component()
    infos = [{"task_id": 11, "episode_return": 1.0}, {"task_id": 22, "episode_return": 3.0},
             {"task_id": 33, "episode_return": 5.0}, {"task_id": 33, "episode_return": 7.0},
             {"task_id": -1, "episode_return": 100.0}]  # the base task, before the first choice: not counted
    figures = part.bucket_figures(infos)
    assert figures == {
        "curriculum/size/small/share": 0.25, "curriculum/size/small/return": 1.0,
        "curriculum/size/large/share": 0.75, "curriculum/size/large/return": 5.0,
        "curriculum/steps/128/share": 0.5, "curriculum/steps/128/return": 2.0,
        "curriculum/steps/256/share": 0.5, "curriculum/steps/256/return": 6.0,
    }


def test_a_bucket_nothing_was_played_in_gets_a_zero_share_and_no_return() -> None:
    part, _, _ = component()
    figures = part.bucket_figures([{"task_id": 11, "episode_return": 2.0}])
    assert figures["curriculum/size/large/share"] == 0.0 and "curriculum/size/large/return" not in figures
    assert part.bucket_figures([]) == {}


def test_each_update_hands_the_rollouts_the_new_plan_and_publishes_figures() -> None:
    part, rollouts, stats = component("learning_progress")
    assert rollouts.sampler is not None and len(rollouts.plans) == 1, "registered: a sampler and the first plan"
    pool = rollouts.plans[0].task_ids
    assert pool is not None and len(pool) == 4
    part.buckets = lambda task: {"size": "small", "steps": "128"}
    part.on_step([{"task_id": task, "episode_return": float(i)} for i, task in enumerate(pool)])
    assert len(rollouts.plans) == 2 and rollouts.plans[-1] == part.curriculum.plan()
    assert stats.metrics["curriculum/size/small/share"] == 1.0
    assert stats.metrics["curriculum/size/small/return"] == pytest.approx(1.5)
    assert stats.metrics["curriculum/agent_episodes"] == 4.0


def test_restored_state_is_the_plan_the_rollouts_draw_from() -> None:
    part, rollouts, _ = component("learning_progress")
    saved = part.state_dict()
    other, other_rollouts, _ = component("learning_progress")
    other.curriculum = Curriculum(CurriculumConfig(pool_size=4), seed=99, num_agents=1)
    assert other.curriculum.plan() != part.curriculum.plan()
    other.load_state_dict(saved)
    assert other_rollouts.plans[-1] == rollouts.plans[0]
