"""How close does training run to the simulator's own speed? Env-only vs training agent-steps per second.

In one process, on the env a `mettle train --env mettagrid:<task>` run would build (recipe, then options):
(a) the TrainingEnvironment from `make_environment`, stepped with uniformly random actions, with the same
vectorisation and workers as training (and, unless --no-bare, mettagrid's own Simulator stepping the same
number of games one after another); (b) a short `Trainer.train()` on that env config, timed by the
trainer's stopwatch after a warm-up epoch. Prints both rates, their ratio (target >= 0.5) and the time
split (rollout env wait / inference / train) that bounds training, and writes JSON.

    .venv/bin/python bench/mettagrid_throughput.py --task arena --seconds 30
    .venv/bin/python bench/mettagrid_throughput.py --vectorization multiprocess --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mettle.agent.registry import build_policy
from mettle.config import RunConfig, build_run_config
from mettle.envs.factory import make_environment
from mettle.envs.mettagrid import load_mettagrid_config
from mettle.recipes import recipe_for
from mettle.rl.trainer import Trainer
from mettle.rl.training import TrainerComponent
from mettle.rl.training.environment import random_actions

TIMERS = ("rollout.env", "rollout.inference", "train")
"""Stopwatch timers that split a training epoch: waiting for the env, running the policy, updating it."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="navigation", help="MettaGrid task or config file (default navigation)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per measurement (default 20)")
    parser.add_argument("--num-envs", type=int, default=None, help="games stepped together (default: the recipe's)")
    parser.add_argument("--vectorization", choices=["serial", "multiprocess"], default=None,
                        help="serial: in this process; multiprocess: worker processes (default: the recipe's)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes for multiprocess")
    parser.add_argument("--async-factor", type=int, default=None, help="worker groups stepped in turn")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `mettle train` override (repeatable), e.g. --set policy.hidden_size=64")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare mettagrid Simulator measurement")
    parser.add_argument("--target", type=float, default=0.5, help="training/env ratio that passes (default 0.5)")
    parser.add_argument("--json", type=Path, default=None,
                        help="output file (default: mettagrid_throughput-<task>.json in the temp directory)")
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The config `mettle train --env mettagrid:<task>` resolves, with this bench's env options on top."""
    env_name = f"mettagrid:{args.task}"
    options = {"env.num_envs": args.num_envs, "env.vectorization": args.vectorization,
               "env.num_workers": args.workers, "env.async_factor": args.async_factor}
    chosen = [f"{key}={value}" for key, value in options.items() if value is not None]
    return build_run_config([*recipe_for(env_name, None), f"env.name={env_name}", *chosen, *args.set])


def env_rate(cfg: RunConfig, seconds: float, seed: int = 0) -> dict[str, Any]:
    """Agent-steps/s of the training env under random actions (one warm-up second is not counted)."""
    env = make_environment(cfg.env, seed=seed)
    rng = np.random.default_rng(seed)
    info = env.policy_env_info
    try:
        env.reset(seed=seed)
        _step_randomly(env, info, rng, 1.0)
        steps, elapsed = _step_randomly(env, info, rng, seconds)
    finally:
        env.close()
    return {"agent_steps": steps, "seconds": elapsed, "sps": steps / elapsed,
            "rows": env.batch_info.num_rows, "vectorization": cfg.env.vectorization, "workers": cfg.env.num_workers}


def _step_randomly(env: Any, info: Any, rng: np.random.Generator, seconds: float) -> tuple[int, float]:
    """Step whatever rows the env hands over, as the rollout loop does, for `seconds`; (agent steps, seconds)."""
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        batch = env.get_observations()
        rows = batch.rows.stop - batch.rows.start
        env.send_actions(random_actions(info, rows, rng), batch.rows)
        steps += rows
    return steps, elapsed


def bare_rate(cfg: RunConfig, task: str, seconds: float, seed: int = 0) -> dict[str, Any]:
    """Agent-steps/s of mettagrid's own Simulator running `num_envs` games in turn, without mettle's adapter."""
    from mettagrid.simulator import Simulator

    config = load_mettagrid_config(task, **cfg.env.kwargs)
    simulator = Simulator()
    sims = [simulator.new_simulation(config, seed=seed + game) for game in range(cfg.env.num_envs)]
    rng = np.random.default_rng(seed)
    actions = len(sims[0].action_names)
    steps, start, episodes = 0, time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds:
        for game, sim in enumerate(sims):
            if sim.is_done():
                sim.close()
                episodes += 1
                sims[game] = sim = simulator.new_simulation(config, seed=seed + game + episodes * len(sims))
            sim._c_sim.actions()[:] = rng.integers(0, actions, sim.num_agents)
            sim.step()
            steps += sim.num_agents
    for sim in sims:
        sim.close()
    return {"agent_steps": steps, "seconds": elapsed, "sps": steps / elapsed, "games": len(sims)}


class StopAfter(TrainerComponent):
    """Marks the end of a warm-up epoch, then asks the trainer to stop once `seconds` more have passed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(epoch_interval=1)
        self.seconds = seconds
        self.warm: dict[str, float] | None = None
        self.end: dict[str, float] | None = None

    def snapshot(self) -> dict[str, float]:
        """Wall time, agent steps and the stopwatch's split timers now."""
        ctx = self.context
        return {"time": time.perf_counter(), "agent_step": float(ctx.state.agent_step),
                **{name: ctx.stopwatch.elapsed(name) for name in TIMERS}}

    def on_epoch_end(self, epoch: int) -> None:
        """The first epoch warms up (buffers, first episodes); timing starts after it."""
        now = self.snapshot()
        if self.warm is None:
            self.warm = now
        elif now["time"] - self.warm["time"] >= self.seconds:
            self.end = now
            self.context.stop_requested = True


def train_rate(cfg: RunConfig, seconds: float) -> dict[str, Any]:
    """Agent-steps/s of `Trainer.train()` on the run's env, policy and trainer config, after one warm-up epoch."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    env = make_environment(cfg.env, seed=cfg.trainer.seed)
    try:
        policy = build_policy(cfg.policy.kind, hidden_size=cfg.policy.hidden_size)
        trainer = Trainer(cfg.trainer, env, policy, cfg.device)
        clock = StopAfter(seconds)
        trainer.register(clock)
        trainer.train()
    finally:
        env.close()
    if clock.warm is None or clock.end is None:
        raise RuntimeError("training ended before the measurement did; raise total_timesteps")
    delta = {key: clock.end[key] - clock.warm[key] for key in clock.end}
    wall = delta["time"]
    split = {f"{name}_frac": delta[name] / wall for name in TIMERS}
    split["other_frac"] = max(0.0, 1.0 - sum(split.values()))
    return {"agent_steps": int(delta["agent_step"]), "seconds": wall, "sps": delta["agent_step"] / wall,
            "epochs": trainer.context.state.epoch - 1, **split}


def report(result: dict[str, Any], target: float) -> None:
    """Both rates, their ratio and the split of a training epoch, in a few lines."""
    env, train = result["env"], result["train"]
    print(f"task {result['task']}: {env['rows']} agent rows, {env['vectorization']} "
          f"({env['workers']} workers), {train['epochs']} training epochs measured")
    if "bare" in result:
        bare = result["bare"]
        print(f"  bare mettagrid Simulator : {bare['sps']:>10,.0f} agent-steps/s ({bare['games']} games in turn)")
    print(f"  env, random actions      : {env['sps']:>10,.0f} agent-steps/s")
    print(f"  training                 : {train['sps']:>10,.0f} agent-steps/s")
    verdict = "meets" if result["ratio"] >= target else "below"
    print(f"  training / env           : {result['ratio']:>10.2f} ({verdict} the {target:g} target)")
    print("  training time: " + ", ".join(f"{name} {100 * train[f'{name}_frac']:.0f}%"
                                          for name in (*TIMERS, "other")))


def main(argv: list[str] | None = None) -> int:
    """Measure, print and write JSON; the exit code is 0 (this bench reports, it does not gate)."""
    args = parse_args(argv)
    cfg = run_config(args)
    result: dict[str, Any] = {"task": args.task, "config": cfg.model_dump(mode="json"), "target": args.target}
    if not args.no_bare:
        result["bare"] = bare_rate(cfg, args.task, args.seconds)
    result["env"] = env_rate(cfg, args.seconds)
    result["train"] = train_rate(cfg, args.seconds)
    result["ratio"] = result["train"]["sps"] / result["env"]["sps"]
    report(result, args.target)
    out = args.json or Path(tempfile.gettempdir()) / f"mettagrid_throughput-{Path(args.task).stem}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
