"""Mettle against Stable-Baselines3 PPO, a plain single-file PyTorch PPO and the raw environment, in one command.

    .venv/bin/python bench/compare.py --out DIR [--tasks cartpole8,cartpole64,arena] [--seeds 3] [--sps-steps N]
                                      [--sps-repeats 3] [--overlap off|on|both] [--variant NAME=k=v,...] [--quick]

Throughput: each system trains for the same agent steps with matched settings (envs, steps per env per
rollout, minibatch, update epochs, 64x64 tanh actor and critic, CPU, one torch thread); the raw env is
the bare simulator stepped with random actions, the limit for any trainer. On single-agent Gymnasium tasks
SB3 and bench/plain_ppo.py (the plain-PyTorch PPO a user would write) train beside Mettle. Mettle runs once
per variant: `--overlap` adds `overlap=false` / `overlap=true` variants where TrainerConfig has that switch,
and `--variant NAME=key=value,key=value` adds any other set of Mettle overrides (repeatable). Time to solve: Mettle with
its CartPole recipe against SB3 with rl-zoo's tuned CartPole-v1 settings, until the mean return of the
last 20 finished training episodes reaches 475. Every measurement is its own process, run one after
another; ratios come from the same invocation. Writes results.md and results.json to --out (default: a new
temporary directory, so bench/results changes only when asked).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from compare_report import render_markdown
from compare_tasks import CARTPOLE_THRESHOLD, RETURN_WINDOW, SB3_ZOO_CARTPOLE, TASKS, Task, parse_tasks

WORKER = Path(__file__).with_name("compare_workers.py")
QUICK_STEPS = {"cartpole8": 8192, "cleanrl8": 8192, "cartpole64": 16384, "arena": 12288}
"""Agent steps per throughput run under --quick (a smoke run, not a measurement)."""
RAW_FACTOR = 4
"""Raw-env runs take this many times the training steps: they are fast, and longer runs include resets."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options; --quick shrinks every run to a smoke test."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the time-to-solve runs (median reported)")
    parser.add_argument("--sps-steps", type=int, default=None, help="agent steps per throughput run (task default)")
    parser.add_argument("--sps-repeats", type=int, default=3, help="throughput runs per system (median reported)")
    parser.add_argument("--solve-timeout", type=float, default=300.0, help="seconds before a solve run gives up")
    parser.add_argument("--out", default=None,
                        help="directory for results.md and results.json (default: a new temporary directory)")
    parser.add_argument("--overlap", choices=("off", "on", "both"), default="both",
                        help="Mettle with TrainerConfig.overlap off, on or both (ignored while that field is absent)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=k=v,k=v",
                        help="an extra Mettle variant: a name and its comma-separated overrides (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (about 2 minutes), not a measurement")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.sps_repeats, args.solve_timeout = 1, 1, 10.0
    if min(args.seeds, args.sps_repeats) < 1 or (args.sps_steps is not None and args.sps_steps < 1):
        parser.error("--seeds, --sps-repeats and --sps-steps must be at least 1")
    try:
        args.variants = mettle_variants(args.overlap, args.variant)
    except ValueError as error:
        parser.error(str(error))
    return args


def has_overlap() -> bool:
    """Whether this checkout's TrainerConfig has the `overlap` switch (issue 14)."""
    from mettle.rl.trainer_config import TrainerConfig

    return "overlap" in TrainerConfig.model_fields


def mettle_variants(overlap: str, extra: list[str]) -> dict[str, list[str]]:
    """Mettle's variants, name -> overrides; the first is the one the ratios against SB3 and plain PPO headline."""
    variants: dict[str, list[str]] = {"mettle": []}
    if has_overlap():
        variants = {"mettle": [f"overlap={'true' if overlap == 'on' else 'false'}"]}
        if overlap == "both":
            variants["mettle_overlap"] = ["overlap=true"]
    for text in extra:
        name, _, overrides = text.partition("=")
        if not name or not overrides or name in variants or name in ("sb3", "plain_ppo", "mettle_env"):
            raise ValueError(f"--variant {text!r}: expected NAME=key=value[,key=value] with a new name")
        variants[name] = overrides.split(",")
    return variants


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One measurement in a fresh process; a failure is recorded (with its stderr tail), never raised."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(WORKER), json.dumps(spec), str(out)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if done.returncode or not out.exists():
            return {"error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
        return json.loads(out.read_text())


def log(message: str) -> None:
    """Progress on stderr, so a long run shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raw_kind(task: Task) -> str:
    """The worker that steps the task's bare simulator with random actions."""
    return "raw_gym" if task.env.startswith("gym:") else "raw_mettagrid"


def sps_kinds(task: Task, variants: dict[str, list[str]]) -> list[str]:
    """The systems measured on a task: Mettle's variants, SB3 and plain PPO where they can run, the raw
    simulator, Mettle's adapter."""
    return [*variants, *(["sb3", "plain_ppo"] if task.sb3 else []), raw_kind(task), "mettle_env"]


def measure_throughput(task: Task, steps: int, repeats: int, variants: dict[str, list[str]]) -> dict[str, Any]:
    """Every system `repeats` times, interleaved (A B C, A B C, ...) so a busy spell hits all of them."""
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in sps_kinds(task, variants)}
    for repeat in range(repeats):
        for kind in runs:
            kind_steps = steps * RAW_FACTOR if kind in ("raw_gym", "raw_mettagrid", "mettle_env") else steps
            spec = {"kind": "mettle" if kind in variants else kind, "task": task.as_dict(), "steps": kind_steps,
                    "seed": repeat, "overrides": variants.get(kind, [])}
            result = run_worker(spec, timeout=900)
            runs[kind].append(result)
            log(f"{task.name} {kind} #{repeat}: " + (f"{result['sps']:,.0f} agent-steps/s" if "sps" in result
                                                     else result["error"].splitlines()[-1]))
    medians = {kind: median_of(results, "sps") for kind, results in runs.items()}
    baseline = raw_kind(task)
    raw = medians.get(baseline)
    ratios = {"mettle_over_sb3": divide(medians["mettle"], medians.get("sb3")),
              "mettle_over_plain": divide(medians["mettle"], medians.get("plain_ppo")),
              "mettle_over_raw": divide(medians["mettle"], raw),
              "adapter_over_raw": divide(medians["mettle_env"], raw),
              "variants": {name: {"over_mettle": divide(medians[name], medians["mettle"]),
                                  "over_sb3": divide(medians[name], medians.get("sb3")),
                                  "over_plain": divide(medians[name], medians.get("plain_ppo")),
                                  "over_raw": divide(medians[name], raw),
                                  "paired_over_raw": paired_ratio(runs[name], runs[baseline])} for name in variants}}
    return {"steps": steps, "repeats": repeats, "variants": variants, "median_sps": medians, "ratios": ratios,
            "runs": runs}


def median_of(results: list[dict[str, Any]], key: str, missing: float | None = None) -> float | None:
    """Median of a field over the runs that have it (`missing` stands in for the others, if given)."""
    values = [r[key] if r.get(key) is not None else missing for r in results]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(runs: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> float | None:
    """Median over rounds of a run's agent-steps/s over the baseline run of its own round: steadier than a ratio
    of medians when the machine's speed drifts between rounds."""
    pairs = [divide(run.get("sps"), base.get("sps")) for run, base in zip(runs, baselines, strict=True)]
    values = [value for value in pairs if value is not None]
    return statistics.median(values) if values else None


def divide(numerator: float | None, denominator: float | None) -> float | None:
    """A ratio, or None when either side is missing or infinite."""
    if numerator is None or not denominator or math.isinf(numerator) or math.isinf(denominator):
        return None
    return numerator / denominator


def measure_solve(task: Task, seeds: int, timeout: float, variants: dict[str, list[str]]) -> dict[str, Any]:
    """Mettle's variants (recipe defaults plus the variant's overrides) and SB3 (rl-zoo tuned) to the threshold,
    seed by seed, interleaved: the time ratio against SB3, and each variant's median steps against Mettle's."""
    defaults = {**task.as_dict(), "overrides": []}
    runs: dict[str, list[dict[str, Any]]] = {**{name: [] for name in variants}, "sb3_zoo": []}
    for seed in range(seeds):
        for kind in runs:
            spec = {"kind": "mettle" if kind in variants else kind, "task": defaults, "steps": None, "seed": seed,
                    "threshold": CARTPOLE_THRESHOLD, "max_seconds": timeout, "overrides": variants.get(kind, [])}
            result = run_worker(spec, timeout=timeout + 300)
            runs[kind].append(result)
            log(f"{task.name} solve {kind} seed {seed}: " + solve_text(result))
    medians = {kind: {"solved_s": median_of(results, "solved_s", math.inf),
                      "solved_step": median_of(results, "solved_step", math.inf)} for kind, results in runs.items()}
    ratio = divide(medians["mettle"]["solved_s"], medians["sb3_zoo"]["solved_s"])
    steps_ratios = {name: divide(medians[name]["solved_step"], medians["mettle"]["solved_step"]) for name in variants}
    finite = {kind: {k: None if v is None or math.isinf(v) else v for k, v in m.items()} for kind, m in medians.items()}
    reached = {kind: sum(r.get("solved_s") is not None for r in results) for kind, results in runs.items()}
    return {"threshold": CARTPOLE_THRESHOLD, "window": RETURN_WINDOW, "medians": finite, "reached": reached,
            "mettle_over_sb3_time": ratio, "steps_over_mettle": steps_ratios, "runs": runs}


def solve_text(result: dict[str, Any]) -> str:
    """One line for the progress log."""
    if "error" in result:
        return result["error"].splitlines()[-1]
    if result.get("solved_s") is None:
        return f"not reached after {result['wall_s']:.1f} s ({result['agent_steps']:,} steps)"
    return f"{result['solved_s']:.1f} s ({result['solved_step']:,} steps)"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_report(out: str | None, name: str, data: dict[str, Any], markdown: str) -> None:
    """Print the markdown and write NAME.md and NAME.json to `out` (default: a new temporary directory)."""
    directory = Path(out) if out else Path(tempfile.mkdtemp(prefix=f"mettle-{name.replace('_', '-')}-"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    (directory / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {directory / f'{name}.md'} and {directory / f'{name}.json'}", file=sys.stderr)


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPUs, load (the machine may be shared), library versions."""
    import importlib.metadata

    import torch

    try:
        sb3_version = importlib.metadata.version("stable-baselines3")
    except importlib.metadata.PackageNotFoundError:
        sb3_version = "not installed (pip install -e '.[bench]')"
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "load_avg": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__, "stable_baselines3": sb3_version,
            "platform": platform.platform(), "torch_threads": 1, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: list[str] | None = None) -> int:
    """Run the selected tasks, then write results.json and results.md."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        tasks = parse_tasks(args.tasks)
    except ValueError as error:
        print(f"compare.py: error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "sb3_zoo_cartpole": SB3_ZOO_CARTPOLE,
                              "tasks": {}}
    for task in tasks:
        steps = args.sps_steps or (QUICK_STEPS[task.name] if args.quick else task.sps_steps)
        throughput = measure_throughput(task, steps, args.sps_repeats, args.variants)
        entry: dict[str, Any] = {"task": task.as_dict(), "throughput": throughput}
        if task.solve:
            entry["solve"] = measure_solve(task, args.seeds, args.solve_timeout, args.variants)
        report["tasks"][task.name] = entry
    report["machine"]["load_avg_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mettle-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "results.md").write_text(render_markdown(report))
    log(f"wrote {out / 'results.md'} and {out / 'results.json'} ({report['wall_s']:.0f} s)")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
