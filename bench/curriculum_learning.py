"""Does a learning-progress curriculum beat uniform variants and the fixed task on held-out MettaGrid variants?

For each family (arena, navigation) three ways of training, for the same wall clock each:
  * `learning_progress`: `--env mettagrid:<family>-family` (learning progress over a pool of variants);
  * `uniform`: the same family with `curriculum.algorithm=uniform` (a fresh variant every episode);
  * `fixed`: `--env mettagrid:<task>`, the default map only.
Each trained policy is then scored with `mettle eval --suite <task>-heldout` (sampled actions, MettaGrid's
default): fixed variants, harder than the default map, that the family never draws. Runs are interleaved
(seed 0 of every method, then seed 1...), so a slower stretch of the machine does not fall on one method.
Prints and writes a table of the suite's mean per method (mean and spread over seeds) and every variant.

    .venv/bin/python bench/curriculum_learning.py --out bench/results/curriculum            # ~2 h on 2 cores
    .venv/bin/python bench/curriculum_learning.py --family arena --seeds 1 --minutes 2      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mettagrid_learning import train

FAMILIES = {"arena": 3, "navigation": 1}
"""Family -> default number of seeds (the issue's budget: 3 seeds on arena, one on navigation)."""
METHODS = ("learning_progress", "uniform", "fixed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall clock per run (default 10)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default: 3 arena, 1 navigation)")
    parser.add_argument("--episodes", type=int, default=24, help="episodes per held-out variant (default 24)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra train override")
    parser.add_argument("--out", type=Path, required=True, help="directory for runs, results.json and results.md")
    return parser.parse_args(argv)


def train_args(method: str, task: str) -> tuple[str, list[str]]:
    """The env name and overrides a method trains with."""
    if method == "fixed":
        return task, []
    return f"{task}-family", [f"curriculum.algorithm={method}"]


def held_out_score(run: Path, task: str, episodes: int) -> dict[str, Any]:
    """`mettle eval RUN --suite <task>-heldout --json`, parsed (sampled actions: MettaGrid's default)."""
    command = [sys.executable, "-m", "mettle", "eval", str(run), "--suite", f"{task}-heldout",
               "--episodes", str(episodes), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"mettle eval --suite failed ({result.returncode}): {result.stderr.strip()[-800:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_run(task: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one method for the wall clock, then score it on the held-out suite."""
    env, overrides = train_args(method, task)
    name = f"{task}-{method}-s{seed}"
    print(f"{time.strftime('%H:%M:%S')} training {name} ({args.minutes:g} min)", flush=True)
    trained = train(env, args.out, name, args.minutes, [*overrides, *args.set], seed)
    score = held_out_score(args.out / name, task, args.episodes)
    print(f"  held-out mean {score['mean_return']:.3f} after {trained['agent_steps']:,} agent steps", flush=True)
    return {"task": task, "method": method, "seed": seed, "held_out": score, **trained}


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per family and method, the held-out suite mean (mean ± spread over seeds) and each variant."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        variants = list(rows[0]["held_out"]["variants"])
        lines += [f"### {task}", "", "| method | seeds | held-out mean | " + " | ".join(variants) + " | agent steps |",
                  "|---|---|---|" + "---|" * len(variants) + "---|"]
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                continue
            means = [r["held_out"]["mean_return"] for r in mine]
            spread = f" ± {statistics.stdev(means):.2f}" if len(means) > 1 else ""
            per_variant = [statistics.mean(r["held_out"]["variants"][v]["mean_return"] for r in mine) for v in variants]
            steps = statistics.mean(r["agent_steps"] for r in mine)
            lines.append(f"| {method} | {len(mine)} | {statistics.mean(means):.2f}{spread} | "
                         + " | ".join(f"{v:.2f}" for v in per_variant) + f" | {steps:,.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Every family's runs, interleaved by seed; results.json after each run, so a stopped bench keeps them."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    families = list(FAMILIES) if args.family == "all" else [args.family]
    results: list[dict[str, Any]] = []
    for task in families:
        for seed in range(args.seeds or FAMILIES[task]):
            for method in METHODS:
                results.append(bench_run(task, method, seed, args))
                (args.out / "results.json").write_text(json.dumps({"minutes": args.minutes, "results": results},
                                                                  indent=2))
                (args.out / "results.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
