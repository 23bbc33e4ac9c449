"""Does PPO learn the MettaGrid tasks? Trained vs uniformly random mean episode reward per agent.

For each task: run a uniformly random policy for some episodes, train with `mettle train` for a fixed wall
clock (SIGTERM at the deadline: the CLI finishes its epoch, checkpoints and exits 143), then evaluate the
final policy with `mettle eval` (greedy and sampled actions). Prints a table and writes JSON; with
`--check`, exits 1 when a task's best trained/random ratio is below `--target` (default 5).

    .venv/bin/python bench/mettagrid_learning.py --minutes 10 --check
    .venv/bin/python bench/mettagrid_learning.py --task navigation --minutes 2 --set env.num_envs=8
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mettle.config import RunConfig, build_run_config
from mettle.envs.factory import make_environment
from mettle.recipes import recipe_for
from mettle.rl.training.environment import random_actions

TASKS = ("navigation", "arena")
SHUTDOWN_GRACE_S = 180.0
"""After SIGTERM the CLI finishes its epoch and writes a checkpoint; allow this long before killing it."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all", help="task to run (default: all)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall clock per task (default 10)")
    parser.add_argument("--episodes", type=int, default=256, help="agent-episodes per evaluation (default 256)")
    parser.add_argument("--random-episodes", type=int, default=512, help="agent-episodes of the random policy")
    parser.add_argument("--run-dir", type=Path, default=None, help="where runs go (default: a new temporary directory)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `mettle train` override (repeatable), e.g. --set env.num_envs=8")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline and of training")
    parser.add_argument("--target", type=float, default=5.0, help="trained/random ratio that passes (default 5)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio is below --target")
    parser.add_argument("--json", type=Path, default=None, help="output file (default RUN_DIR/mettagrid_learning.json)")
    return parser.parse_args(argv)


def run_config(task: str, overrides: list[str]) -> RunConfig:
    """The config `mettle train --env mettagrid:<task>` resolves: the recipe, then the overrides."""
    env_name = f"mettagrid:{task}"
    return build_run_config([*recipe_for(env_name, None), f"env.name={env_name}", *overrides])


def random_baseline(cfg: RunConfig, episodes: int, seed: int) -> dict[str, float]:
    """Mean and spread of per-agent episode returns under uniformly random actions, on the training env."""
    env = make_environment(cfg.env, seed=seed)
    rng = np.random.default_rng(seed)
    returns: list[float] = []
    try:
        while len(returns) < episodes:
            batch = env.get_observations()
            returns.extend(float(info["episode_return"]) for info in batch.infos)
            rows = batch.rows.stop - batch.rows.start  # a vectorised env may hand over a group of rows at a time
            env.send_actions(random_actions(env.policy_env_info, rows, rng), batch.rows)
    finally:
        env.close()
    values = np.array(returns[:episodes])
    return {"episodes": len(values), "mean_return": float(values.mean()), "std_return": float(values.std())}


def train(task: str, run_dir: Path, name: str, minutes: float, overrides: list[str], seed: int) -> dict[str, Any]:
    """Run `mettle train` as a subprocess, SIGTERM it after `minutes`, and read what it trained."""
    command = [sys.executable, "-m", "mettle", "train", "--env", f"mettagrid:{task}", "--run", name,
               "--run-dir", str(run_dir), "--fresh", f"seed={seed}", "progress_interval_s=30", *overrides]
    log_path = run_dir / f"{name}.log"
    start = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        stopped = False
        try:
            process.wait(timeout=minutes * 60)
        except subprocess.TimeoutExpired:
            stopped = True
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=SHUTDOWN_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    wall = time.monotonic() - start
    if process.returncode not in ((0, 128 + signal.SIGTERM) if stopped else (0,)):  # 143: stopped after a checkpoint
        tail = log_path.read_text().splitlines()[-5:]
        raise RuntimeError(f"mettle train exited {process.returncode} (log {log_path}):\n" + "\n".join(tail))
    return {"wall_s": wall, "log": str(log_path), **training_summary(run_dir / name)}


def training_summary(run: Path) -> dict[str, Any]:
    """Agent steps from the final policy, and mean SPS and time split from the run's metrics.jsonl."""
    spec = json.loads((run / "policy.json").read_text())
    summary: dict[str, Any] = {"agent_steps": int(spec.get("agent_step", 0)), "epochs": int(spec.get("epoch", 0))}
    metrics_path = run / "metrics.jsonl"
    if metrics_path.exists():
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        wall = sum(row.get("timing/wall", 0.0) for row in rows)
        if wall > 0:
            summary["sps"] = summary["agent_steps"] / wall
            for part in ("rollout.env", "rollout.inference", "train"):
                summary[f"{part}_frac"] = sum(row.get(f"timing/{part}", 0.0) for row in rows) / wall
    return summary


def evaluate(run: Path, episodes: int, sample: bool) -> dict[str, float]:
    """`mettle eval RUN --json` (greedy, or sampled with `sample`), parsed."""
    command = [sys.executable, "-m", "mettle", "eval", str(run), "--episodes", str(episodes), "--json"]
    result = subprocess.run([*command, *(["--sample"] if sample else [])], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"mettle eval failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_task(task: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Random baseline, training and both evaluations of one task, with the ratios to the baseline."""
    overrides = list(args.set)
    baseline = random_baseline(run_config(task, overrides), args.random_episodes, args.seed)
    print(f"{task}: random policy {baseline['mean_return']:.3f} per agent-episode; training {args.minutes:g} min",
          flush=True)
    name = f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    trained = train(task, run_dir, name, args.minutes, overrides, args.seed)
    greedy = evaluate(run_dir / name, args.episodes, sample=False)
    sampled = evaluate(run_dir / name, args.episodes, sample=True)
    random_mean = max(baseline["mean_return"], 1e-9)
    best = max(greedy["mean_return"], sampled["mean_return"])
    return {
        "task": task,
        "random_mean": baseline["mean_return"],
        "random": baseline,
        "greedy_mean": greedy["mean_return"],
        "sampled_mean": sampled["mean_return"],
        "trained_mean": best,
        "ratio": best / random_mean,
        "greedy_ratio": greedy["mean_return"] / random_mean,
        "sampled_ratio": sampled["mean_return"] / random_mean,
        "greedy": greedy,
        "sampled": sampled,
        "minutes": args.minutes,
        "overrides": overrides,
        "run": str(run_dir / name),
        **trained,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    """One line per task: baseline, both evaluations, the best ratio, steps trained and speed."""
    header = f"{'task':<11} {'random':>7} {'greedy':>8} {'sampled':>8} {'ratio':>6} {'agent steps':>12} {'SPS':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['task']:<11} {r['random_mean']:>7.3f} {r['greedy_mean']:>8.3f} {r['sampled_mean']:>8.3f} "
              f"{r['ratio']:>6.1f} {r['agent_steps']:>12,} {r.get('sps', float('nan')):>7,.0f}")


def main(argv: list[str] | None = None) -> int:
    """Bench every requested task, report, and under --check fail when a ratio misses the target."""
    args = parse_args(argv)
    tasks = TASKS if args.task == "all" else (args.task,)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="mettagrid-learning-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    results = [bench_task(task, args, run_dir) for task in tasks]
    out = args.json or run_dir / "mettagrid_learning.json"
    out.write_text(json.dumps({"target": args.target, "results": results}, indent=2))
    print_table(results)
    print(f"runs in {run_dir}; results in {out}")
    failed = [r["task"] for r in results if r["ratio"] < args.target]
    if failed:
        print(f"below the {args.target:g}x target: {', '.join(failed)}")
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
