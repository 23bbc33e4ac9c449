"""Each of Mettle's speed switches against the same run without it, side by side, on this machine.

    .venv/bin/python bench/speedups.py [--tasks cartpole8,arena] [--switches keep_freed_memory,torch_compile]
                                       [--steps N] [--repeats 3] [--out bench/results]

A switch is a TrainerConfig boolean. For every task and switch, runs with it off and on alternate (off, on,
off, on, ...), each in its own process, so a busy spell hits both. Reports agent-steps/s over the whole
run and after the first epochs (`warm`, which leaves out one-off costs such as compiling), each as the
ratio on ÷ off. Writes speedups.md and speedups.json to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from compare import divide, log, machine_info, median_of, run_worker
from compare_tasks import parse_tasks

SWITCHES = ("keep_freed_memory", "torch_compile")
DEFAULT_STEPS = {"cartpole8": 49_152, "cartpole64": 98_304, "arena": 98_304}
"""Agent steps per run: enough epochs after the warm-up for a stable `warm` figure."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="cartpole8,arena", help="comma-separated compare.py task names")
    parser.add_argument("--switches", default=",".join(SWITCHES), help=f"comma-separated, from {', '.join(SWITCHES)}")
    parser.add_argument("--steps", type=int, default=None, help="agent steps per run (task default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (median reported)")
    parser.add_argument("--out", default="bench/results", help="directory for speedups.md and speedups.json")
    args = parser.parse_args(argv)
    args.switches = [s.strip() for s in args.switches.split(",") if s.strip()]
    unknown = [s for s in args.switches if s not in SWITCHES]
    if unknown or args.repeats < 1:
        parser.error(f"unknown switch(es) {unknown}; known: {', '.join(SWITCHES)}" if unknown else "--repeats >= 1")
    try:
        args.tasks = parse_tasks(args.tasks)
    except ValueError as error:
        parser.error(str(error))
    return args


def measure_switch(task: Any, switch: str, steps: int, repeats: int) -> dict[str, Any]:
    """Alternating off/on runs of one task; medians of whole-run and warm agent-steps/s, and their ratios."""
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for repeat in range(repeats):
        for setting in runs:
            overrides = [*task.overrides, f"{switch}={'true' if setting == 'on' else 'false'}"]
            spec = {"kind": "mettle", "task": {**task.as_dict(), "overrides": overrides}, "steps": steps,
                    "seed": repeat}
            result = run_worker(spec, timeout=1800)
            result.pop("config", None)
            runs[setting].append(result)
            log(f"{task.name} {switch}={setting} #{repeat}: " + (
                f"{result['sps']:,.0f} agent-steps/s, warm {result['warm_sps'] or 0:,.0f}" if "sps" in result
                else result["error"].splitlines()[-1]))
    medians = {setting: {key: median_of(results, key) for key in ("sps", "warm_sps")}
               for setting, results in runs.items()}
    ratios = {key: divide(medians["on"][key], medians["off"][key]) for key in ("sps", "warm_sps")}
    return {"steps": steps, "repeats": repeats, "medians": medians, "ratios": ratios, "runs": runs}


def render(report: dict[str, Any]) -> str:
    """The markdown table: one row per task and switch."""
    m = report["machine"]
    lines = [
        "# Speed switches, on ÷ off", "",
        f"{m['date']}, {m['cpus']} CPUs, load average {m['load_avg'][0]:.2f} at start; torch {m['torch']}, "
        "one torch thread. `warm` leaves out the first epochs (compiling, heap growth).", "",
        "| task | switch | steps x runs | off | on | on ÷ off | off, warm | on, warm | on ÷ off, warm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, switch), entry in ((tuple(key.split("/")), e) for key, e in report["results"].items()):
        off, on, ratio = entry["medians"]["off"], entry["medians"]["on"], entry["ratios"]
        lines.append(f"| {task} | {switch} | {entry['steps']:,} x {entry['repeats']} | {number(off['sps'])} | "
                     f"{number(on['sps'])} | {times(ratio['sps'])} | {number(off['warm_sps'])} | "
                     f"{number(on['warm_sps'])} | {times(ratio['warm_sps'])} |")
    return "\n".join(lines) + "\n"


def number(value: float | None) -> str:
    """Agent-steps/s with thousands separators, or a dash."""
    return "–" if value is None else f"{value:,.0f}"


def times(value: float | None) -> str:
    """A ratio as 1.23x, or a dash."""
    return "–" if value is None else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> int:
    """Measure every task and switch, then write the report."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(), "results": {}}
    for task in args.tasks:
        for switch in args.switches:
            steps = args.steps or DEFAULT_STEPS.get(task.name, task.sps_steps)
            report["results"][f"{task.name}/{switch}"] = measure_switch(task, switch, steps, args.repeats)
    report["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speedups.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "speedups.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
