"""Run a policy for whole episodes and report their returns (used by `mettle eval` and the Evaluator)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch

from mettle.agent.policy import Policy
from mettle.rl.training.environment import TrainingEnvironment

ActionMode = Literal["sampled", "greedy"]
"""How an evaluation acts: sample from the policy, or take its mode (each head's argmax, a Gaussian's mean)."""
ActionChoice = Literal["auto", "sampled", "greedy"]
"""What a user asks for; "auto" is the env family's default (`default_actions`)."""
FAMILY_LABELS = {"mettagrid": "MettaGrid", "gym": "Gymnasium", "pettingzoo": "PettingZoo"}
"""How the printed mode line names an env family."""
CLI_SWITCHES: Mapping[ActionMode, str] = {"sampled": "--sample", "greedy": "--greedy"}
"""The `mettle eval` / `mettle play` flags that choose each mode, for the printed mode line."""


def env_family(env_name: str) -> str:
    """The `family` of `family:name` (the whole name when it has no family, as test envs do)."""
    return env_name.partition(":")[0]


def default_actions(env_name: str) -> ActionMode:
    """Sampled on MettaGrid, where greedy agents block each other and stand still; greedy elsewhere."""
    return "sampled" if env_family(env_name) == "mettagrid" else "greedy"


def resolve_actions(choice: ActionChoice, env_name: str) -> ActionMode:
    """The mode an evaluation of `env_name` uses when `choice` was asked for."""
    return default_actions(env_name) if choice == "auto" else choice


def actions_line(choice: ActionChoice, env_name: str, switches: Mapping[ActionMode, str] = CLI_SWITCHES) -> str:
    """`actions: sampled (MettaGrid default; --greedy for argmax)`: what an evaluation did and how to change it.

    Printed by every evaluation, so a low greedy score is never mistaken for a failed training run.
    """
    mode = resolve_actions(choice, env_name)
    family = FAMILY_LABELS.get(env_family(env_name), env_family(env_name))
    if choice != "auto":
        return f"actions: {mode} ({switches[mode]}; {family} default: {default_actions(env_name)})"
    other: ActionMode = "greedy" if mode == "sampled" else "sampled"
    how = f"{switches[other]} for argmax" if other == "greedy" else f"{switches[other]} to sample"
    return f"actions: {mode} ({family} default; {how})"


@contextmanager
def isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed python/numpy/torch so sampled episodes repeat for a seed; put the caller's streams back afterwards."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        if cuda_state is not None:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


def evaluate_policy(
    policy: Policy,
    env: TrainingEnvironment,
    episodes: int,
    device: torch.device | str = "cpu",
    deterministic: bool = True,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Infos of exactly `episodes` agent-episodes, spread evenly over agent rows so short ones are not favoured.

    Environments report one info per agent per episode, with `env_id` and (multi-agent) `agent_id`.
    """
    rows, agents = env.batch_info.num_rows, env.batch_info.agents_per_env
    quota = np.full(rows, episodes // rows) + (np.arange(rows) < episodes % rows)
    done = np.zeros(rows, dtype=np.int64)
    results: list[dict[str, Any]] = []
    policy.reset_memory()
    policy.eval()
    env.reset(seed=seed)
    while len(results) < episodes:
        batch = env.get_observations()
        for info in batch.infos:
            row = int(info["env_id"]) * agents + int(info.get("agent_id", 0))
            if done[row] < quota[row]:
                done[row] += 1
                results.append(info)
        env.send_actions(policy.act(batch, device, deterministic))
    return results


def summarize_returns(infos: list[dict[str, Any]]) -> dict[str, float]:
    """Mean, std, min and max of episode returns and mean length."""
    returns = np.array([float(i["episode_return"]) for i in infos])
    lengths = np.array([float(i.get("episode_length", 0)) for i in infos])
    return {
        "episodes": len(infos),
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "min_return": float(returns.min()),
        "max_return": float(returns.max()),
        "mean_length": float(lengths.mean()),
    }


def evaluate_suite(
    policy: Policy,
    variants: Mapping[str, Callable[[], TrainingEnvironment]],
    episodes: int,
    device: torch.device | str = "cpu",
    deterministic: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """`episodes` agent-episodes on each variant: their summaries, and the mean of the variants' mean returns.

    The mean weighs every variant alike, however many agents or steps it has, so it reads as "the suite's score".
    """
    scores: dict[str, dict[str, float]] = {}
    for name, make_env in variants.items():
        env = make_env()
        try:
            scores[name] = summarize_returns(evaluate_policy(policy, env, episodes, device, deterministic, seed))
        finally:
            env.close()
    mean = float(np.mean([score["mean_return"] for score in scores.values()]))
    return {"mean_return": mean, "variants": scores}
