"""Where Mettle's training time goes on a compare.py task (default cartpole8): a timer tree, optionally cProfile.

    .venv/bin/python bench/compare_profile.py [--task cartpole8] [--steps 16384] [--cprofile] [--top 25]

Light wrappers time the pieces of the hot path (env, policy forward, sampling, buffer writes, minibatch
gather, losses, backward, grad clip, optimizer) inside Mettle's own rollout/train stopwatch, so the shares
add up; --cprofile then repeats the run under cProfile for the functions with the most own time (cProfile
inflates Python-heavy code, so read its numbers for ranking, the tree for shares). One torch thread.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from compare_tasks import TASKS
from compare_workers import build_mettle, mettle_config


class Timers:
    """Inclusive seconds and call counts per label, filled by wrapped functions."""

    def __init__(self) -> None:
        """Empty totals; `_originals` lets unwrap() undo every wrap."""
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._originals: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, label: str | Callable[[], str]) -> None:
        """Replace owner.name by a timed call; `label` may be chosen at call time (e.g. by phase)."""
        original = getattr(owner, name)
        self._originals.append((owner, name, original))

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            """The original call, timed under its label even when it raises."""
            key = label() if callable(label) else label
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - started
                self.calls[key] += 1

        setattr(owner, name, timed)

    def unwrap(self) -> None:
        """Put every wrapped function back (class-level wraps would otherwise outlive the run)."""
        while self._originals:
            owner, name, original = self._originals.pop()
            setattr(owner, name, original)


def phase(prefix: str) -> Callable[[], str]:
    """A label that says whether the call happened while acting (inference mode) or training."""
    return lambda: ("rollout." if torch.is_inference_mode_enabled() else "train.") + prefix


def instrument(trainer: Any, timers: Timers) -> None:
    """Wrap the hot-path functions of one trainer (class-level wraps affect only this process)."""
    from mettle.agent import distributions
    from mettle.rl.loss import PPOActorLoss, PPOCriticLoss
    from mettle.rl.training.core import CoreTrainingLoop
    from mettle.rl.training.experience import Experience

    policy_cls = type(trainer.context.policy)
    timers.wrap(policy_cls, "forward", phase("policy forward"))
    timers.wrap(distributions, "sample", phase("policy forward.sample"))  # acting: act() draws through it
    timers.wrap(distributions.MultiCategorical, "entropy", phase("policy forward.entropy"))
    timers.wrap(Experience, "store_decision", "rollout.buffer writes")
    timers.wrap(Experience, "store_outcome", "rollout.buffer writes")
    timers.wrap(CoreTrainingLoop, "compute_advantages", "train.advantages")
    timers.wrap(Experience, "_gather", "train.minibatch gather")
    timers.wrap(PPOActorLoss, "__call__", "train.losses")
    timers.wrap(PPOCriticLoss, "__call__", "train.losses")
    timers.wrap(torch.Tensor, "backward", "train.backward")
    timers.wrap(torch.nn.utils, "clip_grad_norm_", "train.grad clip")
    timers.wrap(trainer.context.optimizer, "step", "train.optimizer step")
    timers.wrap(trainer.context.optimizer, "zero_grad", "train.optimizer zero_grad")
    timers.wrap(CoreTrainingLoop, "_update", "train.update (one minibatch)")


def build(task_name: str, steps: int, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """Env and trainer for a compare.py task, as its throughput run builds them (then `overrides`)."""
    spec = {"task": TASKS[task_name].as_dict(), "steps": steps, "seed": 0, "overrides": list(overrides)}
    return build_mettle(mettle_config(spec))


def timed_run(task_name: str, steps: int, overrides: Sequence[str] = ()
              ) -> tuple[dict[str, float], dict[str, int], float, int]:
    """Train `steps` agent steps with the wrappers on; merge them with Mettle's own stopwatch.

    With overlap the env steps and inference run in the actor process: the learner's stopwatch holds their
    totals under actor.*, and the wrapped functions time only what ran in this process (the update)."""
    env, trainer = build(task_name, steps, overrides)
    timers = Timers()
    instrument(trainer, timers)
    started = time.perf_counter()
    try:
        trainer.train()
    finally:
        wall = time.perf_counter() - started
        timers.unwrap()
        env.close()
    stopwatch = trainer.context.stopwatch
    sw = stopwatch.summary()
    actor = "actor." if "actor.rollout.env" in sw else ""
    seconds = {"rollout": sw["rollout"], "rollout.env step (adapter + gymnasium)": sw[f"{actor}rollout.env"],
               "rollout.inference (to tensor + forward + sample)": sw[f"{actor}rollout.inference"],
               "train": sw["train"], **timers.seconds}
    counts = {"rollout.env step (adapter + gymnasium)": stopwatch.count(f"{actor}rollout.env"),
              "rollout.inference (to tensor + forward + sample)": stopwatch.count(f"{actor}rollout.inference"),
              **timers.calls}
    return seconds, counts, wall, trainer.context.state.agent_step


def print_tree(seconds: dict[str, float], counts: dict[str, int], wall: float, steps: int) -> None:
    """Every timer with its share of wall time and its mean cost per call; unlabelled time as 'other'."""
    print(f"{steps:,} agent steps in {wall:.2f} s = {steps / wall:,.0f} agent-steps/s (wall includes everything)\n")
    print(f"{'timer':58s} {'seconds':>8s} {'% wall':>7s} {'calls':>7s} {'ms/call':>8s}")
    for name in sorted(seconds):
        calls = counts.get(name, 0)
        per = f"{1000 * seconds[name] / calls:8.3f}" if calls else " " * 8
        print(f"{name:58s} {seconds[name]:8.3f} {100 * seconds[name] / wall:6.1f}% {calls or '':>7} {per}")
    rollout_known = sum(seconds.get(k, 0.0) for k in ("rollout.env step (adapter + gymnasium)",
                                                       "rollout.inference (to tensor + forward + sample)",
                                                       "rollout.buffer writes"))
    train_known = sum(seconds.get(k, 0.0) for k in ("train.advantages", "train.minibatch gather", "train.losses",
                                                     "train.backward", "train.grad clip", "train.optimizer step",
                                                     "train.optimizer zero_grad", "train.policy forward"))
    print(f"\nrollout other (python in _step/_commit, actions to numpy): {seconds['rollout'] - rollout_known:.3f} s")
    print(f"train other (loop, metrics, log_ratio write, aggregate):     {seconds['train'] - train_known:.3f} s")
    print(f"outside rollout and train (callbacks, epoch bookkeeping):    "
          f"{wall - seconds['rollout'] - seconds['train']:.3f} s")


def print_cprofile(task_name: str, steps: int, top: int, overrides: Sequence[str] = ()) -> None:
    """Top functions by own time under cProfile (a second, uninstrumented run)."""
    env, trainer = build(task_name, steps, overrides)
    profiler = cProfile.Profile()
    profiler.enable()
    trainer.train()
    profiler.disable()
    env.close()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    print("\n" + "\n".join(line for line in out.getvalue().splitlines() if line.strip()))


def main(argv: list[str]) -> int:
    """Warm up one epoch (imports, first allocations), then the timed run, then optionally cProfile."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="cartpole8", choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, default=16384, help="agent steps of the profiled run")
    parser.add_argument("--cprofile", action="store_true", help="also list the top functions under cProfile")
    parser.add_argument("--top", type=int, default=25, help="functions listed by --cprofile")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Mettle override (repeatable), e.g. --set overlap=false to profile one process")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env, trainer = build(args.task, 1, args.set)
    trainer.train()
    env.close()
    print_tree(*timed_run(args.task, args.steps, args.set))
    if args.cprofile:
        print_cprofile(args.task, args.steps, args.top, args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
