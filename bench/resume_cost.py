"""What exact resume costs: the episode log's share of env stepping, and the replay time at a resume.

Exact resume replays each environment instance's episode from its start (see `mettle.envs.rows.EpisodeLog`),
so every send keeps a copy of the actions. This bench steps the raw environments a training run uses, with
random actions, alternating runs with the log on and with `EpisodeLog.record` stubbed out, and reports the
median agent-steps/s of each and their ratio; then it times `load_state_dict` (the replay) on a fresh env
after `--steps` steps. Run from the repository root:

    .venv/bin/python bench/resume_cost.py [--repeats 3] [--steps 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mettle.contracts import TrainingEnvironment
from mettle.envs import rows
from mettle.envs.gymnasium import GymnasiumEnvironment
from mettle.envs.mettagrid import make_mettagrid_environment
from mettle.envs.pettingzoo import PettingZooEnvironment, parse_pettingzoo_spec

ENVS: dict[str, Callable[[], TrainingEnvironment]] = {
    "cartpole-sync8": lambda: GymnasiumEnvironment("CartPole-v1", num_envs=8, vectorization="sync"),
    "mpe2-spread8": lambda: PettingZooEnvironment(parse_pettingzoo_spec("mpe2.simple_spread_v3:parallel_env"), 8),
    "arena8": lambda: make_mettagrid_environment("arena", num_envs=8, seed=1),
}


def random_actions(env: TrainingEnvironment, count: int) -> list[np.ndarray]:
    """A fixed set of random action batches, so both variants step the same way."""
    rng, nvec = np.random.default_rng(0), np.asarray(env.policy_env_info.action_nvec)
    return [(rng.random((env.batch_info.num_rows, len(nvec))) * nvec).astype(np.int64) for _ in range(count)]


def steps_per_second(make: Callable[[], TrainingEnvironment], steps: int) -> tuple[float, TrainingEnvironment]:
    """Agent-steps/s of `steps` sends with random actions; the env is returned still open."""
    env = make()
    actions = random_actions(env, 64)
    env.get_observations()
    started = time.perf_counter()
    for step in range(steps):
        env.send_actions(actions[step % 64])
        env.get_observations()
    return steps * env.batch_info.num_rows / (time.perf_counter() - started), env


def measure(name: str, steps: int, repeats: int) -> dict[str, Any]:
    """Log on vs off, interleaved; then the replay time of one resume."""
    make, record = ENVS[name], rows.EpisodeLog.record
    on: list[float] = []
    off: list[float] = []
    for _ in range(repeats):
        sps, env = steps_per_second(make, steps)
        on.append(sps)
        state = env.state_dict()
        env.close()
        rows.EpisodeLog.record = lambda self, actions: None  # type: ignore[method-assign]
        try:
            sps, env = steps_per_second(make, steps)
            off.append(sps)
            env.close()
        finally:
            rows.EpisodeLog.record = record  # type: ignore[method-assign]
    fresh = make()
    started = time.perf_counter()
    fresh.load_state_dict(state)  # type: ignore[arg-type]
    replay_s = time.perf_counter() - started
    fresh.close()
    return {"env": name, "sps_log": statistics.median(on), "sps_no_log": statistics.median(off),
            "ratio": statistics.median(on) / statistics.median(off), "replay_s": replay_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = [measure(name, args.steps, args.repeats) for name in ENVS]
    print("| env | agent-steps/s, log on | log off | on / off | replay at resume |")
    print("|---|---|---|---|---|")
    for r in results:
        figures = f"{r['sps_log']:,.0f} | {r['sps_no_log']:,.0f} | {r['ratio']:.3f} | {r['replay_s']:.3f} s"
        print(f"| {r['env']} | {figures} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
