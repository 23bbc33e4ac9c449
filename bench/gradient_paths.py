"""The hand-written PPO gradient against autograd on one env's recipe: training-phase time of each, in one process.

    .venv/bin/python bench/gradient_paths.py [--env gym:HalfCheetah-v5] [--repeats 5] [--set KEY=VALUE ...] [--out DIR]

Builds `mettle train --env ENV` as resolved (recipe included, then --set overrides) twice, once with
`gradient=analytic` and once with `gradient=autograd`, fills each one's experience with one rollout, then times
`training_phase()` (all update epochs over that rollout) on each, alternating, `--repeats` times on one torch thread.
The training phases keep updating the same rollout; that changes the numbers, not the work. Reports the median
seconds per phase, per gradient step and the ratio. Writes gradient_paths.md/json to --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from compare import machine_info, write_report


def resolved(env_name: str, overrides: list[str]) -> Any:
    """The RunConfig `mettle train --env ENV` resolves: its recipe, then `overrides`."""
    from mettle.config import build_run_config
    from mettle.recipes import recipe_for

    return build_run_config([*recipe_for(env_name, None), f"env.name={env_name}", *overrides])


def phase(env_name: str, gradient: str, overrides: list[str]) -> tuple[Any, Any]:
    """(env, the Trainer's training phase) after one rollout, for `env_name`'s recipe with `gradient`."""
    from mettle.run import build_run

    run = build_run(resolved(env_name, [*overrides, f"gradient={gradient}"]))
    run.trainer.rollout_phase()
    chosen = run.trainer.core_loop.gradient_path()
    assert (chosen is not None) == (gradient == "analytic"), f"gradient={gradient} took the other path"
    return run.env, run.trainer.core_loop.training_phase


def measure(env_name: str, overrides: list[str], repeats: int) -> dict[str, Any]:
    """Median seconds per training phase of each gradient path, alternating."""
    torch.set_num_threads(1)
    built = {path: phase(env_name, path, overrides) for path in ("analytic", "autograd")}
    times: dict[str, list[float]] = {path: [] for path in built}
    try:
        for _, train in built.values():  # a warm-up phase each
            train()
        for _ in range(repeats):
            for path, (_, train) in built.items():
                started = time.perf_counter()
                train()
                times[path].append(time.perf_counter() - started)
    finally:
        for env, _ in built.values():
            env.close()
    cfg = resolved(env_name, overrides).trainer
    steps = cfg.update_epochs * (cfg.batch_size // cfg.minibatch_size)
    medians = {path: statistics.median(t) for path, t in times.items()}
    return {"env": env_name, "overrides": overrides, "repeats": repeats, "gradient_steps_per_phase": steps,
            "seconds": times, "median_s": medians,
            "ms_per_step": {path: 1000 * m / steps for path, m in medians.items()},
            "autograd_over_analytic": medians["autograd"] / medians["analytic"]}


def render(result: dict[str, Any], machine: dict[str, Any]) -> str:
    """gradient_paths.md."""
    shown = f" with {' '.join(result['overrides'])}" if result["overrides"] else ""
    lines = [f"# Training phase, hand-written gradient vs autograd: {result['env']}{shown}", "",
             f"Machine: {machine}", "",
             f"{result['gradient_steps_per_phase']} gradient steps per phase, median of {result['repeats']}:", "",
             "| gradient | s per phase | ms per gradient step |", "|---|---|---|"]
    for path, seconds in result["median_s"].items():
        lines.append(f"| {path} | {seconds:.3f} | {result['ms_per_step'][path]:.2f} |")
    lines += ["", f"autograd / analytic: x{result['autograd_over_analytic']:.2f}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="gym:HalfCheetah-v5")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override (repeatable)")
    parser.add_argument("--out", default=None, help="results directory (default: a temporary one)")
    args = parser.parse_args(argv)
    result = measure(args.env, args.set, args.repeats)
    machine = machine_info()
    write_report(args.out, "gradient_paths", {**result, "machine": machine}, render(result, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
