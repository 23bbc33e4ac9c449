"""Build a TrainingEnvironment from an EnvConfig's `family:name` string."""

from __future__ import annotations

from mettle.config import ConfigError, EnvConfig
from mettle.rl.training.environment import TrainingEnvironment

FAMILIES = ("gym",)


def split_env_name(name: str) -> tuple[str, str]:
    """Split `family:rest`, failing with the list of known families."""
    family, sep, rest = name.partition(":")
    if not sep or family not in FAMILIES or not rest:
        raise ConfigError(
            f"env.name {name!r} is not understood; use one of {', '.join(f + ':<name>' for f in FAMILIES)}"
            " (e.g. gym:CartPole-v1)"
        )
    return family, rest


def make_environment(cfg: EnvConfig, seed: int = 0, num_envs: int | None = None) -> TrainingEnvironment:
    """Create the environment a config names (unknown names fail with a suggestion)."""
    _family, env_id = split_env_name(cfg.name)
    from mettle.envs.gymnasium import GymnasiumEnvironment

    try:
        return GymnasiumEnvironment(
            env_id,
            num_envs=num_envs or cfg.num_envs,
            vectorization=cfg.vectorization,
            seed=seed,
            env_kwargs=dict(cfg.kwargs),
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
