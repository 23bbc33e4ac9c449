"""MuJoCo HalfCheetah-v5, 1M steps: Mettle against SB3 (rl-zoo's tuned settings) and a CleanRL-style PPO, one run.

    .venv/bin/python bench/halfcheetah.py --out DIR [--steps 1000000] [--seeds 1] [--systems mettle,cleanrl,sb3_zoo]
    .venv/bin/python bench/halfcheetah.py --quick        # 20k steps each: a smoke run, not a measurement
    .venv/bin/python bench/halfcheetah.py --systems mettle --mettle-set policy.log_std_init=-1   # a variant
    .venv/bin/python bench/halfcheetah.py --collect DIR [DIR ...] --out DIR   # one table from runs made apart

Each system trains with the settings its users would start from, on one torch thread, in its own process, one
after another:

* mettle: `mettle train --env gym:HalfCheetah-v5` with no override (the continuous-control recipe with its
  HalfCheetah entry: 8 envs, 512-step rollouts, minibatch 64, 20 epochs, lr 1e-4, gamma 0.98, lambda 0.92, clip
  0.1, 64x64 tanh actor and critic, log-std -2, observations and rewards normalised in the trainer);
* cleanrl: bench/plain_ppo.py with CleanRL's ppo_continuous_action settings (1 env, 2048 steps, 32 minibatches,
  10 epochs, lr 3e-4 annealed, value clipping, Gymnasium's normalising wrappers on the env);
* sb3_zoo: Stable-Baselines3 PPO with rl-baselines3-zoo's tuned HalfCheetah entry (1 env, 512 steps, minibatch
  64, 20 epochs, lr 2.06e-5, gamma 0.98, ReLU 256x256 actor and critic, log-std -2, VecNormalize).

Figures per run: the final return (mean raw return of the last 20 training episodes; stochastic actions, as each
trainer reports it), agent steps per wall-clock second and per CPU second of the process and its children (the
CPU figure is steadier on a shared machine). Writes results.json and results.md to --out (default: a temporary
directory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENV = "HalfCheetah-v5"
SYSTEMS = ("mettle", "cleanrl", "sb3_zoo")
QUICK_STEPS = 20_480
SB3_ZOO_HALFCHEETAH: dict[str, Any] = {
    "n_steps": 512, "batch_size": 64, "gamma": 0.98, "learning_rate": 2.0633e-05, "ent_coef": 0.000401762,
    "clip_range": 0.1, "n_epochs": 20, "gae_lambda": 0.92, "max_grad_norm": 0.8, "vf_coef": 0.58096,
}
"""rl-baselines3-zoo hyperparams/ppo.yml, `HalfCheetah-v3` (tuned; n_envs 1, normalize: true), minus policy_kwargs
(log_std_init=-2, ortho_init=False, ReLU, pi and vf 256x256), which `sb3_policy_kwargs` builds."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (`--worker` is the per-run child process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="results directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=1_000_000, help="agent steps per run (default 1M)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per system (interleaved by seed)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per run (a smoke run)")
    parser.add_argument("--mettle-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a `mettle train` override for the mettle runs (repeatable)")
    parser.add_argument("--collect", type=Path, nargs="+", metavar="DIR",
                        help="run nothing: summarise the per-run files (SYSTEM-sSEED.json) earlier runs left in DIRs")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------- the runs
def run_mettle(steps: int, seed: int, overrides: list[str]) -> dict[str, Any]:
    """`mettle train --env gym:HalfCheetah-v5` as resolved (then `overrides`), for `steps`."""
    from compare_workers import run_mettle as train

    task = {"env": f"gym:{ENV}", "num_envs": 8, "overrides": overrides}
    result = train({"task": task, "steps": steps, "seed": seed})
    result.pop("config")
    return {**result, "overrides": overrides}


def run_cleanrl(steps: int, seed: int, overrides: list[str]) -> dict[str, Any]:
    """bench/plain_ppo.py with CleanRL's continuous-control settings."""
    from plain_ppo import Settings, train

    settings = Settings(env=ENV, num_envs=1, num_steps=2048, total_timesteps=steps, minibatch_size=64, update_epochs=10,
                        learning_rate=3e-4, adam_eps=1e-5, gamma=0.99, gae_lambda=0.95, clip_coef=0.2,
                        value_clip_coef=0.2, entropy_coef=0.0, value_coef=0.5, max_grad_norm=0.5, hidden_size=64,
                        seed=seed, anneal_lr=True, normalize=True)
    result: dict[str, Any] = train(settings)
    return result


def sb3_policy_kwargs() -> dict[str, Any]:
    """rl-zoo's policy_kwargs for HalfCheetah."""
    from torch import nn

    return {"log_std_init": -2.0, "ortho_init": False, "activation_fn": nn.ReLU,
            "net_arch": {"pi": [256, 256], "vf": [256, 256]}}


def run_sb3_zoo(steps: int, seed: int, overrides: list[str]) -> dict[str, Any]:
    """SB3 PPO with rl-zoo's tuned HalfCheetah settings; Monitor (inside VecNormalize) records raw returns."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    env = VecNormalize(make_vec_env(ENV, n_envs=1, seed=seed), gamma=SB3_ZOO_HALFCHEETAH["gamma"])
    model = PPO("MlpPolicy", env, seed=seed, device="cpu", verbose=0, policy_kwargs=sb3_policy_kwargs(),
                **SB3_ZOO_HALFCHEETAH)
    started = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - started
    env.close()
    recent = [float(e["r"]) for e in model.ep_info_buffer][-20:]
    return {"agent_steps": model.num_timesteps, "wall_s": wall, "sps": model.num_timesteps / wall,
            "recent_mean_return": statistics.fmean(recent) if recent else None,
            "settings": {"n_envs": 1, **SB3_ZOO_HALFCHEETAH, "policy_kwargs": "log_std -2, ReLU 256x256, no ortho"}}


RUNNERS = {"mettle": run_mettle, "cleanrl": run_cleanrl, "sb3_zoo": run_sb3_zoo}
"""Each takes (steps, seed, the --mettle-set overrides); only Mettle's run reads the overrides."""


def worker(args: argparse.Namespace) -> int:
    """One run in this process, on one torch thread; the result goes to --result as JSON."""
    import torch

    torch.set_num_threads(1)
    result = RUNNERS[args.worker](args.steps, args.seed, args.mettle_set)
    args.result.write_text(json.dumps(result, default=str))
    return 0


# ------------------------------------------------------------------------------------------- the driver
def measure(system: str, steps: int, seed: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    """Run one system in a child process; add wall time and the CPU time it (and its children) used."""
    result_file = out / f"{system}-s{seed}.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    command = [sys.executable, __file__, "--worker", system, "--seed", str(seed), "--steps", str(steps),
               "--result", str(result_file), *(f"--mettle-set={o}" for o in overrides)]
    subprocess.run(command, check=True, cwd=Path(__file__).parent)
    process_wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result: dict[str, Any] = json.loads(result_file.read_text())
    result.update(system=system, seed=seed, process_wall_s=process_wall, process_cpu_s=cpu,
                  sps_per_cpu_s=result["agent_steps"] / cpu)
    result_file.write_text(json.dumps(result, indent=2, default=str))
    return result


def run_and_print(system: str, steps: int, seed: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    """`measure`, announced and its figures printed."""
    print(f"{system} seed {seed}: {steps:,} steps", flush=True)
    result = measure(system, steps, seed, out, overrides)
    print(f"  final return {result['recent_mean_return']:.1f} | {result['sps']:,.0f} steps/s "
          f"| {result['sps_per_cpu_s']:,.0f} per CPU s", flush=True)
    return result


def collect(directories: list[Path], systems: list[str], steps: int) -> list[dict[str, Any]]:
    """The per-run results `measure` wrote in `directories`, for `systems`; a run of another length, or a seed
    found twice for one system, is refused."""
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for directory in directories:
        for path in sorted(directory.glob("*-s*.json")):
            run = json.loads(path.read_text())
            if run.get("system") not in systems:
                continue
            key = (run["system"], run["seed"])
            if key in runs:
                sys.exit(f"--collect: {key[0]} seed {key[1]} is in two places; keep one ({path})")
            if run["agent_steps"] < steps:
                sys.exit(f"--collect: {path} ran {run['agent_steps']:,} steps, not {steps:,}")
            runs[key] = {**run, "file": str(path)}
    missing = [s for s in systems if not any(k[0] == s for k in runs)]
    if missing:
        sys.exit(f"--collect: no runs of {missing} in {[str(d) for d in directories]}")
    return [runs[k] for k in sorted(runs, key=lambda k: (k[1], systems.index(k[0])))]


def summarize(runs: list[dict[str, Any]], systems: list[str]) -> dict[str, dict[str, float]]:
    """Per system: mean final return, SPS (wall) and SPS per CPU second over its seeds."""
    table = {}
    for system in systems:
        mine = [r for r in runs if r["system"] == system]
        table[system] = {"runs": len(mine), "final_return": statistics.fmean(r["recent_mean_return"] for r in mine),
                         "sps": statistics.fmean(r["sps"] for r in mine),
                         "sps_per_cpu_s": statistics.fmean(r["sps_per_cpu_s"] for r in mine),
                         "returns": [round(r["recent_mean_return"], 1) for r in mine]}
    return table


def render(summary: dict[str, dict[str, Any]], machine: dict[str, Any], steps: int, overrides: list[str]) -> str:
    """results.md: the table and Mettle's ratios against each peer."""
    shown = f" (Mettle with {' '.join(overrides)})" if overrides else ""
    lines = [f"# HalfCheetah-v5, {steps:,} agent steps per run{shown}", "",
             f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), torch {machine['torch']}, one torch thread "
             f"per run; {when(machine)}.", "",
             "| system | runs | final return (last 20 episodes) | per seed | agent steps/s (wall) | per CPU second |",
             "|---|---|---|---|---|---|"]
    for system, row in summary.items():
        lines.append(f"| {system} | {row['runs']} | {row['final_return']:.1f} | {row['returns']} | "
                     f"{row['sps']:,.0f} | {row['sps_per_cpu_s']:,.0f} |")
    if "mettle" in summary:
        mettle = summary["mettle"]
        lines.append("")
        for peer, row in summary.items():
            if peer != "mettle":
                lines.append(f"- Mettle / {peer}: steps/s x{mettle['sps'] / row['sps']:.2f} (wall), "
                             f"x{mettle['sps_per_cpu_s'] / row['sps_per_cpu_s']:.2f} (CPU); final return "
                             f"{mettle['final_return']:.0f} vs {row['final_return']:.0f}")
    return "\n".join(lines) + "\n"


def when(machine: dict[str, Any]) -> str:
    """When the runs were made: this invocation's load and date, or where --collect found them."""
    if "collected_from" in machine:
        return (f"runs collected on {machine['date']} from {', '.join(machine['collected_from'])} (each made by "
                "an invocation of this script on this machine)")
    return f"load average {machine['load_avg']} at start, {machine.get('load_avg_end')} at end; {machine['date']}"


def machine_facts() -> dict[str, Any]:
    """What the figures came from."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu_model": model, "torch": torch.__version__, "python": platform.python_version(),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: list[str] | None = None) -> int:
    """Run every system for every seed (interleaved by seed), then write the table."""
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        sys.exit(f"--systems: unknown {unknown}; choose from {list(SYSTEMS)}")
    steps = QUICK_STEPS if args.quick else args.steps
    out = args.out or Path(tempfile.mkdtemp(prefix="halfcheetah-"))
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_facts()
    if args.collect:
        runs = collect(args.collect, systems, steps)
        machine["collected_from"] = [str(d) for d in args.collect]
    else:
        runs = [run_and_print(system, steps, seed, out, args.mettle_set)
                for seed in range(args.first_seed, args.first_seed + args.seeds) for system in systems]
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = summarize(runs, systems)
    (out / "results.json").write_text(json.dumps({"machine": machine, "steps": steps, "mettle_set": args.mettle_set,
                                                  "summary": summary,
                                                  "runs": runs}, indent=2, default=str))
    (out / "results.md").write_text(render(summary, machine, steps, args.mettle_set))
    print(render(summary, machine, steps, args.mettle_set))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
