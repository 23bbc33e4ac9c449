"""Does kickstarting pay? Agent steps a student needs to reach a return, from scratch vs kickstarted from a teacher.

* cartpole: a teacher trained with the CartPole recipe; 5 seeds of the same student from scratch and kickstarted,
  each until the rolling mean of its last 20 training episodes reaches 475. Target: kickstarted median steps at most
  half the scratch median.
* navigation: a token-policy teacher trained on mettagrid:navigation for `--teacher-minutes` of wall clock; its
  reward per agent is the mean return of its last `--window` (1000) training agent-episodes. 5 kickstarted token
  students then train until their own rolling mean over as many episodes reaches that reward, or half the
  teacher's steps (a miss). Target: the median
  steps at most half the teacher's steps.

Runs are in-process and one after another (each student is its own Trainer and environment); only agent steps are
compared, so the machine's speed does not enter the ratios, except through how far the timed teacher gets.

`--size quick` is the CartPole check at a size for a test (about 1 min on a 2-core machine; `pytest -m slow` runs
it with 3 seeds): the teacher trains until its greedy policy plays all 20 evaluation episodes to 500 rather than
for 100k steps, and each student stops at the greedy threshold (budget 50k steps) instead of waiting for its training
window too. The target is the same: kickstarted median greedy steps at most half the scratch median.

    .venv/bin/python bench/kickstart.py --task cartpole --out /tmp/kickstart
    .venv/bin/python bench/kickstart.py --task cartpole --size quick --seeds 3 --out /tmp/kickstart
    .venv/bin/python bench/kickstart.py --task navigation --teacher-minutes 10 --out /tmp/kickstart
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mettle.config import EnvConfig, build_run_config
from mettle.contracts import TrainingEnvironment
from mettle.envs.factory import make_environment
from mettle.recipes import recipe_for
from mettle.rl.evaluate import evaluate_policy, summarize_returns
from mettle.rl.training import TrainerComponent
from mettle.run import build_run

CARTPOLE_TARGET = 475.0
CARTPOLE_CAP = 500.0
"""CartPole-v1's longest episode: a greedy mean of 500 is every evaluation episode played to the end."""
TASKS: dict[str, dict[str, Any]] = {
    "cartpole": {"env": "gym:CartPole-v1", "teacher": [], "student": ["losses.kickstarter.anneal_steps=30000"]},
    "navigation": {"env": "mettagrid:navigation", "teacher": ["overlap=true"],
                   "student": ["overlap=true"]},
}


@dataclass(frozen=True)
class CartPoleSize:
    """How much the CartPole comparison trains."""

    teacher_steps: int
    """The teacher's agent steps (with `teacher_until_solved`: at most)."""
    teacher_until_solved: bool
    """Stop the teacher once its greedy policy plays 500 (CartPole's cap) in all 20 evaluation episodes: a short run
    that still gives a capable teacher (one that only just touches 475 teaches little)."""
    student_budget: int
    """Agent steps a student may take to reach the target; a miss counts as this many."""
    stop_on: tuple[str, ...]
    """The measures (greedy, window) a student must reach before it stops."""


CARTPOLE_SIZES = {
    "full": CartPoleSize(100_000, False, 200_000, ("greedy", "window")),
    "quick": CartPoleSize(100_000, True, 50_000, ("greedy",)),
}


class ReturnProbe(TrainerComponent):
    """Steps at which the rolling mean training return, and (with `evaluate`) the greedy policy's mean return over
    one episode per evaluation row, first reach `threshold`; stops once every measure in `stop_on` (default: all)
    has, or at `max_steps`/`max_seconds`."""

    def __init__(self, window: int, threshold: float | None, max_steps: int | None, max_seconds: float | None,
                 evaluate: Callable[[], TrainingEnvironment] | None = None, stop_on: tuple[str, ...] | None = None,
                 ) -> None:
        super().__init__(epoch_interval=1)
        self.returns: deque[float] = deque(maxlen=window)
        self.threshold, self.max_steps, self.max_seconds = threshold, max_steps, max_seconds
        self.started = time.perf_counter()
        self.evaluation_env = evaluate() if evaluate is not None else None
        self.reached: dict[str, int | None] = {"window": None}
        if self.evaluation_env is not None:
            self.reached["greedy"] = None
        self.stop_on = tuple(self.reached) if stop_on is None else stop_on

    @property
    def mean(self) -> float | None:
        """Mean of the window once it is full."""
        full = len(self.returns) == self.returns.maxlen
        return sum(self.returns) / len(self.returns) if full else None

    def on_step(self, infos: list[dict[str, Any]]) -> None:
        """After each rollout: record finished episodes, and the step if the window's mean reached the threshold."""
        self.returns.extend(float(info["episode_return"]) for info in infos)
        mean = self.mean
        if mean is not None:
            self._mark("window", mean)

    def on_epoch_end(self, epoch: int) -> None:
        """After the update: evaluate the greedy policy (on a copy, so training's RNG and memory are untouched)."""
        if self.evaluation_env is not None:
            policy = copy.deepcopy(self.context.policy)
            rows = self.evaluation_env.batch_info.num_rows
            infos = evaluate_policy(policy, self.evaluation_env, rows, self.context.device, seed=epoch)
            self._mark("greedy", summarize_returns(infos)["mean_return"])
        step = self.context.state.agent_step
        over_steps = self.max_steps is not None and step >= self.max_steps
        over_time = self.max_seconds is not None and time.perf_counter() - self.started > self.max_seconds
        done = self.threshold is not None and all(self.reached[kind] is not None for kind in self.stop_on)
        if over_steps or over_time or done:
            self.context.stop_requested = True

    def on_training_complete(self) -> None:
        """Release the evaluation environment."""
        if self.evaluation_env is not None:
            self.evaluation_env.close()

    def _mark(self, kind: str, mean: float) -> None:
        if self.threshold is not None and mean >= self.threshold and self.reached[kind] is None:
            self.reached[kind] = self.context.state.agent_step


def train(env: str, overrides: list[str], seed: int, probe: ReturnProbe, run_dir: Path | None = None) -> dict[str, Any]:
    """Train one run (recipe, then `overrides`) until the probe stops it; its steps, wall time and return."""
    cfg = build_run_config([*recipe_for(env, None), f"env.name={env}", "progress_interval_s=60", *overrides,
                            f"seed={seed}"])
    with build_run(cfg, run_dir=run_dir, components=[probe]) as run:
        probe.started = time.perf_counter()
        run.trainer.train()
        steps = run.trainer.context.state.agent_step
    return {"seed": seed, "agent_steps": steps, "wall_s": time.perf_counter() - probe.started,
            "reached_step": dict(probe.reached), "final_mean_return": probe.mean}


def median_steps(runs: list[dict[str, Any]], kind: str, missed: float) -> float:
    """Median steps to the threshold by `kind` (window, greedy); a run that missed counts as `missed`."""
    steps = [r["reached_step"][kind] for r in runs]
    return statistics.median(step if step is not None else missed for step in steps)


def cartpole_evaluation() -> TrainingEnvironment:
    """20 CartPole instances for the greedy check: one episode each."""
    return make_environment(EnvConfig(name=TASKS["cartpole"]["env"], num_envs=20), seed=12345)


def cartpole(out: Path, seeds: int, size: CartPoleSize) -> dict[str, Any]:
    """Scratch vs kickstarted CartPole students: steps to a mean return of 475 (training window, and greedy)."""
    task = TASKS["cartpole"]
    if size.teacher_until_solved:
        teacher_probe = ReturnProbe(20, CARTPOLE_CAP, size.teacher_steps, None, evaluate=cartpole_evaluation,
                                    stop_on=("greedy",))
    else:
        teacher_probe = ReturnProbe(20, None, None, None)
    teacher = train(task["env"], [*task["teacher"], f"total_timesteps={size.teacher_steps}"], 100, teacher_probe,
                    out / "cartpole-teacher")
    log(f"cartpole teacher: {teacher}")
    kick = ["losses.kickstarter.enabled=true", f"losses.kickstarter.teacher={out / 'cartpole-teacher'}",
            *task["student"]]
    budget = size.student_budget
    runs: dict[str, list[dict[str, Any]]] = {"scratch": [], "kickstarted": []}
    for seed in range(seeds):
        for kind, extra in (("scratch", []), ("kickstarted", kick)):
            probe = ReturnProbe(20, CARTPOLE_TARGET, budget, None, evaluate=cartpole_evaluation, stop_on=size.stop_on)
            result = train(task["env"], [f"total_timesteps={budget}", *extra], seed, probe)
            runs[kind].append(result)
            log(f"cartpole {kind} seed {seed}: reached 475 at {result['reached_step']} steps")
    medians = {measure: {kind: median_steps(results, measure, budget) for kind, results in runs.items()}
               for measure in size.stop_on}
    ratios = {measure: m["kickstarted"] / m["scratch"] for measure, m in medians.items()}
    return {"teacher": teacher, "runs": runs, "median_steps": medians, "ratio": ratios["greedy"],
            "window_ratio": ratios.get("window"), "met": ratios["greedy"] <= 0.5}


def navigation(out: Path, seeds: int, teacher_minutes: float, window: int, reuse: bool) -> dict[str, Any]:
    """Kickstarted token students on navigation: steps to the timed teacher's reward per agent (training window)."""
    task, teacher_dir = TASKS["navigation"], out / "navigation-teacher"
    summary = out / "navigation-teacher.json"
    if reuse and summary.exists():
        teacher = json.loads(summary.read_text())
    else:
        probe = ReturnProbe(window, None, None, teacher_minutes * 60)
        teacher = train(task["env"], [*task["teacher"], "total_timesteps=1000000000"], 100, probe, teacher_dir)
        teacher["reward"] = final_reward(teacher_dir / "metrics.jsonl", window)
        summary.write_text(json.dumps(teacher, indent=2))
    log(f"navigation teacher: {teacher}")
    target, budget = teacher["reward"], teacher["agent_steps"] // 2
    kick = ["losses.kickstarter.enabled=true", f"losses.kickstarter.teacher={teacher_dir}",
            f"losses.kickstarter.anneal_steps={budget}"]
    runs = []
    for seed in range(seeds):
        probe = ReturnProbe(window, target, budget, None)
        result = train(task["env"], [*task["student"], *kick, f"total_timesteps={budget}"], seed, probe)
        runs.append(result)
        log(f"navigation kickstarted seed {seed}: reached {target:.3f} at {result['reached_step']} steps "
            f"(budget {budget})")
    median = median_steps(runs, "window", budget * 2)
    ratio = median / teacher["agent_steps"]
    return {"teacher": teacher, "target_reward": target, "runs": runs, "median_steps": median, "ratio": ratio,
            "met": ratio <= 0.5}


def final_reward(metrics: Path, episodes: int) -> float:
    """Mean episode return per agent over a run's last `episodes` agent-episodes, from its metrics.jsonl."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    total = weighted = 0.0
    for record in reversed(records):
        count = record.get("environment/episodes") or 0.0
        if count:
            total += count
            weighted += count * record["environment/episode_return"]
        if total >= episodes:
            break
    return weighted / total


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen tasks, write kickstart.json into --out, print the ratios; with --check exit 1 on a miss."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all")
    parser.add_argument("--out", type=Path, required=True, help="directory for the teacher runs and kickstart.json")
    parser.add_argument("--seeds", type=int, default=5, help="student seeds (median reported)")
    parser.add_argument("--size", choices=sorted(CARTPOLE_SIZES), default="full",
                        help="cartpole: full (100k-step teacher, students to both measures) or quick (a test's size)")
    parser.add_argument("--teacher-minutes", type=float, default=10.0, help="navigation teacher's wall clock")
    parser.add_argument("--window", type=int, default=1000, help="navigation: agent-episodes in the rolling mean")
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="navigation: keep the teacher already in --out (its navigation-teacher.json)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a task misses its target")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if args.task in ("cartpole", "all"):
        results["cartpole"] = cartpole(args.out, args.seeds, CARTPOLE_SIZES[args.size])
    if args.task in ("navigation", "all"):
        results["navigation"] = navigation(args.out, args.seeds, args.teacher_minutes, args.window, args.reuse_teacher)
    (args.out / "kickstart.json").write_text(json.dumps(results, indent=2))
    for name, result in results.items():
        print(f"{name}: kickstarted median steps {result['median_steps']} -> ratio {result['ratio']:.2f} "
              f"({'met' if result['met'] else 'NOT met'}, target <= 0.5)")
    return 0 if not args.check or all(r["met"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
