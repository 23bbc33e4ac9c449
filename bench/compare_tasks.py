"""The tasks and matched settings that bench/compare.py measures Mettle, Stable-Baselines3 and the raw env on."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

CARTPOLE_THRESHOLD = 475.0
"""Mean return that counts as solving CartPole-v1 (Gymnasium's reward_threshold)."""
RETURN_WINDOW = 20
"""Finished training episodes averaged for the time-to-threshold test (the same rule for both trainers)."""

SB3_ZOO_CARTPOLE: dict[str, Any] = {
    "n_envs": 8,
    "n_timesteps": 100_000,
    "n_steps": 32,
    "batch_size": 256,
    "gae_lambda": 0.8,
    "gamma": 0.98,
    "n_epochs": 20,
    "ent_coef": 0.0,
    "learning_rate": "lin_0.001",
    "clip_range": "lin_0.2",
}
"""rl-baselines3-zoo's tuned PPO entry for CartPole-v1 (hyperparams/ppo.yml); lin_x decays x linearly to 0."""


@dataclass(frozen=True)
class Task:
    """One benchmark task: which env, and the settings both trainers share for the throughput runs."""

    name: str
    env: str
    num_envs: int
    overrides: tuple[str, ...]
    """Mettle key=value overrides on top of the env's recipe (the SB3 side is derived from the result)."""
    sps_steps: int
    """Default agent steps per throughput run."""
    sb3: bool
    """Whether Stable-Baselines3 can train it (single-agent Gymnasium only)."""
    solve: bool
    """Whether the time-to-threshold comparison runs on it."""

    def as_dict(self) -> dict[str, Any]:
        """Plain form for the JSON report and for the worker processes."""
        return asdict(self)


def cartpole(name: str, envs: int, batch: int, epochs: int, sps_steps: int, solve: bool = False) -> Task:
    """A CartPole-v1 task with 4 minibatches per update, which SB3 and plain PPO also train."""
    overrides = (f"batch_size={batch}", f"minibatch_size={batch // 4}", f"update_epochs={epochs}")
    return Task(name=name, env="gym:CartPole-v1", num_envs=envs, overrides=overrides, sps_steps=sps_steps, sb3=True,
                solve=solve)


TASKS: dict[str, Task] = {
    "cartpole8": cartpole("cartpole8", envs=8, batch=1024, epochs=10, sps_steps=49_152, solve=True),
    "cleanrl8": cartpole("cleanrl8", envs=8, batch=1024, epochs=4, sps_steps=49_152),
    "cartpole64": cartpole("cartpole64", envs=64, batch=8192, epochs=10, sps_steps=98_304),
    "arena": Task(name="arena", env="mettagrid:arena", num_envs=16, overrides=(), sps_steps=49_152, sb3=False,
                  solve=False),
}
"""cartpole8 is the CLASSIC_CONTROL recipe as is; cleanrl8 is CleanRL's default PPO layout (8 envs x 128 steps,
4 minibatches, 4 update epochs); cartpole64 keeps 128 steps per env and 4 minibatches."""


def parse_tasks(text: str) -> list[Task]:
    """Task names from a comma-separated list, failing with the known names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or text!r}; known: {', '.join(TASKS)}")
    return [TASKS[name] for name in names]
