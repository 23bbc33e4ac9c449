"""Does PPO with a Gaussian head learn continuous control? Pendulum-v1 to a mean return within a time budget.

Trains `gym:Pendulum-v1` in this process with the config `mettle train --env gym:Pendulum-v1` resolves (the
continuous-control recipe in `src/mettle/recipes.py`, then `--set` overrides) until the mean return of the
last 20 training episodes reaches `--threshold` (default -400; a random policy scores about -1,200, a solved
one about -150) or `--minutes` (default 5) of wall clock pass, whichever comes first. Then evaluates the policy greedily
(the Gaussian's mean) and sampled, on fresh episodes. Prints a summary and writes JSON; with `--check`, exits 1
when the threshold was not reached in time or the greedy evaluation misses it.

    .venv/bin/python bench/continuous_learning.py --check
    .venv/bin/python bench/continuous_learning.py --minutes 1 --set env.num_envs=4    # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from deadline import WINDOW, Deadline, run_config
from mettle.config import RunConfig
from mettle.envs.factory import make_environment
from mettle.rl.evaluate import evaluate_policy, summarize_returns
from mettle.run import build_run

ENV = "gym:Pendulum-v1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default=ENV, help=f"a gym id with Box actions (default {ENV})")
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget (default 5)")
    parser.add_argument("--threshold", type=float, default=-400.0, help="mean return that passes (default -400)")
    parser.add_argument("--episodes", type=int, default=32, help="episodes per evaluation (default 32)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `mettle train` override (repeatable), e.g. --set env.num_envs=4")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--check", action="store_true", help="exit 1 when the threshold is missed")
    parser.add_argument("--json", type=Path, default=None, help="output file (default: a temporary directory)")
    return parser.parse_args(argv)


def evaluate(cfg: RunConfig, policy: Any, episodes: int, greedy: bool) -> dict[str, float]:
    """Fresh episodes (another seed than training's) with the mean action or sampled ones."""
    env = make_environment(cfg.env.model_copy(update={"vectorization": "serial"}), seed=cfg.trainer.seed + 777)
    try:
        return summarize_returns(evaluate_policy(policy, env, episodes, "cpu", greedy, seed=cfg.trainer.seed + 777))
    finally:
        env.close()


def main(argv: list[str] | None = None) -> int:
    """Train to the threshold or the deadline, evaluate, report."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    cfg = run_config(args.env, args.set, args.seed)
    deadline = Deadline(args.threshold, args.minutes * 60)
    print(f"{args.env}: training up to {args.minutes:g} min toward a {WINDOW}-episode mean return of "
          f"{args.threshold:g}", flush=True)
    with build_run(cfg, components=[deadline]) as run:
        run.trainer.train()
        greedy = evaluate(cfg, run.policy, args.episodes, greedy=True)
        sampled = evaluate(cfg, run.policy, args.episodes, greedy=False)
    passed = deadline.reached is not None and greedy["mean_return"] >= args.threshold
    result = {"env": args.env, "threshold": args.threshold, "minutes": args.minutes, "overrides": args.set,
              "seed": args.seed, "reached": deadline.reached, "curve": deadline.curve, "greedy": greedy,
              "sampled": sampled, "passed": passed}
    out = args.json or Path(tempfile.mkdtemp(prefix="continuous-learning-")) / "continuous_learning.json"
    out.write_text(json.dumps(result, indent=2))
    last, when = deadline.outcome(1)
    print(f"threshold {args.threshold:g}: {when} | greedy {greedy['mean_return']:.1f} ± {greedy['std_return']:.1f} | "
          f"sampled {sampled['mean_return']:.1f} | {last['agent_steps']:,.0f} steps in {last['seconds']:.0f} s")
    print(f"results in {out}")
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
