"""Run a policy for whole episodes and report their returns (used by `mettle eval` and the Evaluator)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mettle.agent.policy import Policy
from mettle.rl.training.environment import TrainingEnvironment


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
