"""Does one shared policy learn when agents differ in spaces? An MPE task with two roles, against a random policy.

`mpe2.simple_speaker_listener_v4` (default): a speaker (3 observations, 3 choices) tells a listener (11
observations, 5 choices) which landmark to reach; mettle pads the speaker's observations, adds each agent's type,
and masks the two choices the speaker lacks. First measures a uniformly random policy (each agent drawing only
from its own choices) over `--episodes` episodes, then trains with the config `mettle train --env ...` resolves
(then `--set` overrides) until the mean return of the last 20 agent-episodes beats the random mean by `--gain` of
its size (default 0.5: from about -40 to -20) or `--minutes` pass. Then evaluates the policy greedily. Writes JSON;
with `--check`, exits 1 when the target was not reached or the greedy evaluation misses it.

    .venv/bin/python bench/heterogeneous_learning.py --check
    .venv/bin/python bench/heterogeneous_learning.py --minutes 1    # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deadline import WINDOW, Deadline, run_config
from mettle.config import RunConfig
from mettle.contracts import INVALID_ACTIONS_KEY, TrainingEnvironment
from mettle.envs.factory import make_environment
from mettle.rl.evaluate import evaluate_policy, summarize_returns
from mettle.run import build_run

ENV = "pettingzoo:mpe2.simple_speaker_listener_v4:parallel_env"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default=ENV, help=f"a PettingZoo env whose agents differ (default {ENV})")
    parser.add_argument("--minutes", type=float, default=3.0, help="training wall-clock budget (default 3)")
    parser.add_argument("--gain", type=float, default=0.5, help="share of |random mean| to beat it by (default 0.5)")
    parser.add_argument("--episodes", type=int, default=64, help="agent-episodes per evaluation (default 64)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `mettle train` override (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--json", type=Path, default=None, help="output file (default: a temporary directory)")
    return parser.parse_args(argv)


def eval_env(cfg: RunConfig) -> TrainingEnvironment:
    """Fresh episodes, on another seed than training's."""
    return make_environment(cfg.env.model_copy(update={"vectorization": "serial"}), seed=cfg.trainer.seed + 777)


def random_return(cfg: RunConfig, episodes: int) -> dict[str, float]:
    """Return statistics of uniformly random choices, each agent drawing only among those its space has."""
    env, rng = eval_env(cfg), np.random.default_rng(cfg.trainer.seed)
    try:
        info = env.policy_env_info
        nvec = np.asarray(info.action_nvec)
        infos: list[dict[str, Any]] = []
        env.reset(seed=cfg.trainer.seed + 777)
        while len(infos) < episodes:
            batch = env.get_observations()
            infos.extend(batch.infos)
            choices = np.tile(nvec, (env.batch_info.num_rows, 1))
            table = info.extras.get(INVALID_ACTIONS_KEY)
            if table is not None:  # a type's own choices: those not masked, per head
                types = batch.observations[:, -len(table):].argmax(axis=1)
                choices = np.stack([_own_choices(table[t], nvec) for t in types])
            env.send_actions((rng.random(choices.shape) * choices).astype(np.int64))
        return summarize_returns(infos[:episodes])
    finally:
        env.close()


def _own_choices(invalid: np.ndarray, nvec: np.ndarray) -> np.ndarray:
    """Per head, how many leading choices a type has (its valid ones come first)."""
    heads = np.split(~invalid, np.cumsum(nvec)[:-1])
    return np.array([int(head.sum()) for head in heads])


def main(argv: list[str] | None = None) -> int:
    """Measure random play, train to the target or the deadline, evaluate, report."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    cfg = run_config(args.env, args.set, args.seed)
    random = random_return(cfg, args.episodes)
    target = random["mean_return"] + args.gain * abs(random["mean_return"])
    print(f"{args.env}: random mean return {random['mean_return']:.2f}; training up to {args.minutes:g} min toward "
          f"a {WINDOW}-episode mean of {target:.2f}", flush=True)
    deadline = Deadline(target, args.minutes * 60)
    with build_run(cfg, components=[deadline]) as run:
        run.trainer.train()
        env = eval_env(cfg)
        try:
            greedy = summarize_returns(evaluate_policy(run.policy, env, args.episodes, "cpu", True,
                                                       seed=cfg.trainer.seed + 777))
        finally:
            env.close()
    passed = deadline.reached is not None and greedy["mean_return"] >= target
    result = {"env": args.env, "random": random, "target": target, "minutes": args.minutes, "overrides": args.set,
              "seed": args.seed, "reached": deadline.reached, "curve": deadline.curve, "greedy": greedy,
              "passed": passed}
    out = args.json or Path(tempfile.mkdtemp(prefix="heterogeneous-learning-")) / "heterogeneous_learning.json"
    out.write_text(json.dumps(result, indent=2))
    last, when = deadline.outcome(2)
    print(f"random {random['mean_return']:.2f} -> target {target:.2f}: {when} | greedy {greedy['mean_return']:.2f} "
          f"± {greedy['std_return']:.2f} | {last['agent_steps']:,.0f} steps in {last['seconds']:.0f} s")
    print(f"results in {out}")
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
