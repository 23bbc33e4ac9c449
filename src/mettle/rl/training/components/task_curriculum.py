"""TaskCurriculum: trains on a task family, the curriculum choosing which variants the env instances play.

The learner side (`Curriculum`: task scores, the active pool, sampling weights) lives here, one per rank.
Every rank feeds it the same episodes (the infos of every rank, gathered each epoch), so the statistics are
merged across ranks and every rank holds the same curriculum. The acting side is the Collector's
`TaskSampler`, which draws each instance's next task from the plan this component hands the rollouts after
each update; with overlap the plan travels with the next rollout command. The curriculum's state is this
component's checkpointed state; the sampler's (its RNG) is part of the Collector's.

Each epoch it publishes, per family parameter and bucket of values, the share of finished episodes and
their mean return (`curriculum/<parameter>/<bucket>/share|return`), with the curriculum's own figures.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from mettle.rl.training.component import TrainerComponent
from mettle.rl.training.curriculum import Curriculum, TaskSampler

logger = logging.getLogger(__name__)

SAMPLER_SEED_OFFSET = 4_099_817
"""Added to a rank's seed for its task sampler's own stream, apart from the env's and the policy's."""
UNKNOWN_TASK = -1
"""The task id an episode of the family's base task reports (played before the curriculum's first choice)."""

Buckets = Callable[[int], dict[str, str]]
"""Task id -> {parameter: bucket label}: where a variant falls along each parameter of its family."""


class TaskCurriculum(TrainerComponent):
    """Scores finished episodes by task, updates the curriculum and hands the rollouts its next plan."""

    def __init__(self, curriculum: Curriculum, buckets: Buckets, labels: dict[str, list[str]], seed: int,
                 family: str = "a task family") -> None:
        super().__init__()
        self.family = family
        self.curriculum = curriculum
        self.buckets = buckets
        """Where a task falls along each parameter (for the per-bucket figures)."""
        self.labels = labels
        """Every parameter's bucket labels, in order: each gets a share every epoch, 0 when nothing was played."""
        self.seed = seed
        self._bucket_cache: dict[int, dict[str, str]] = {}

    @property
    def state_key(self) -> str:
        """Checkpointed as `curriculum`."""
        return "curriculum"

    def register(self, context: Any) -> None:
        """Give the rollouts a task sampler of this rank and the curriculum's first plan."""
        super().register(context)
        rollouts = context.rollouts
        assert rollouts is not None, "the Trainer sets its rollouts before components register"
        rollouts.use_tasks(TaskSampler(self.seed + context.distributed.seed_offset() + SAMPLER_SEED_OFFSET))
        rollouts.set_task_plan(self.curriculum.plan())
        if context.distributed.is_master():
            logger.info("training %s with curriculum.algorithm=%s; the returns shown average over the variants "
                        "played (their maps and rewards differ): score fixed variants with mettle eval RUN --suite "
                        "NAME", self.family, self.curriculum.config.algorithm)

    def on_step(self, infos: list[dict[str, Any]]) -> None:
        """Update the curriculum with every rank's finished episodes; the next rollouts draw from its new plan."""
        plan = self.curriculum.update(infos)
        rollouts = self.context.rollouts
        assert rollouts is not None
        rollouts.set_task_plan(plan)
        metrics = self.context.stats.metrics
        metrics.update(self.curriculum.stats())
        metrics.update(self.bucket_figures(infos))

    def bucket_figures(self, infos: list[dict[str, Any]]) -> dict[str, float]:
        """Share of finished episodes and mean return per parameter bucket (every bucket gets a share)."""
        counts: dict[str, int] = defaultdict(int)
        returns: dict[str, float] = defaultdict(float)
        played = [info for info in infos if int(info.get("task_id", UNKNOWN_TASK)) != UNKNOWN_TASK]
        for info in played:
            for parameter, bucket in self._buckets_of(int(info["task_id"])).items():
                counts[f"{parameter}/{bucket}"] += 1
                returns[f"{parameter}/{bucket}"] += float(info["episode_return"])
        figures: dict[str, float] = {}
        if not played:
            return figures
        for parameter, labels in self.labels.items():
            for label in labels:
                key = f"{parameter}/{label}"
                figures[f"curriculum/{key}/share"] = counts[key] / len(played)
                if counts[key]:
                    figures[f"curriculum/{key}/return"] = returns[key] / counts[key]
        return figures

    def _buckets_of(self, task: int) -> dict[str, str]:
        """A task's buckets, remembered (tasks repeat while they stay in the pool)."""
        if task not in self._bucket_cache:
            if len(self._bucket_cache) > 4096:
                self._bucket_cache.clear()
            self._bucket_cache[task] = self.buckets(task)
        return self._bucket_cache[task]

    def state_dict(self) -> dict[str, Any]:
        """The curriculum's scores, pool and RNG."""
        return self.curriculum.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved curriculum; the rollouts draw from its plan again."""
        self.curriculum.load_state_dict(state)
        rollouts = self.context.rollouts
        assert rollouts is not None
        rollouts.set_task_plan(self.curriculum.plan())
