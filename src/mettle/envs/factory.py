"""Build a TrainingEnvironment from an EnvConfig: `family:name`, vectorised as configured."""

from __future__ import annotations

import functools
from collections.abc import Collection
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

from mettle.contracts import TrainingEnvironment
from mettle.errors import ConfigError

if TYPE_CHECKING:
    from mettle.envs.gymnasium import Vectorization

FAMILIES = ("mettagrid", "gym", "pettingzoo")
TRUSTED_ENV_PACKAGES = ("pettingzoo", "mpe2", "magent2", "gymnasium", "gymnasium_robotics", "ale_py", "minigrid",
                        "shimmy", "mettagrid", "mettle.envs")
"""Packages whose modules a name read from a file (a run's config.json) may import: environment packages only."""
ENV_ENTRY_POINTS = "mettle.envs"
"""Entry-point group through which an installed package vouches for its own environment modules."""
PETTINGZOO_FACTORIES = ("parallel_env",)
"""The callables a name read from a file may call in a trusted PettingZoo module (PettingZoo's own convention)."""


class EnvSettings(Protocol):
    """The env settings `make_environment` reads, as `mettle.config.EnvConfig` holds them (envs sit below config)."""

    name: str
    num_envs: int
    num_workers: int
    async_factor: int
    worker_timeout_s: float
    kwargs: dict[str, Any]

    @property
    def vectorization(self) -> str:
        """serial, multiprocess, gymnasium_sync or gymnasium_async (read-only here, so a Literal field fits)."""


def split_env_name(name: str) -> tuple[str, str]:
    """Split `family:rest`, failing with the list of known families."""
    family, sep, rest = name.partition(":")
    if not sep or family not in FAMILIES or not rest:
        raise ConfigError(
            f"env.name {name!r} is not understood; use one of {', '.join(f + ':<name>' for f in FAMILIES)}"
            " (e.g. mettagrid:arena, gym:CartPole-v1, pettingzoo:my_pkg.my_env:parallel_env)"
        )
    return family, rest


def build_in_process(
    family: str,
    target: str,
    kwargs: dict[str, Any],
    gym_mode: Vectorization,
    num_envs: int,
    worker_index: int = 0,
) -> TrainingEnvironment:
    """One in-process environment of `num_envs` instances (also what each vector worker runs)."""
    if family == "gym":
        from mettle.envs.gymnasium import GymnasiumEnvironment

        return GymnasiumEnvironment(target, num_envs=num_envs, vectorization=gym_mode, env_kwargs=dict(kwargs))
    if family == "pettingzoo":
        from mettle.envs.pettingzoo import PettingZooEnvironment, parse_pettingzoo_spec

        return PettingZooEnvironment(parse_pettingzoo_spec(target), num_envs=num_envs, env_kwargs=dict(kwargs))
    from mettle.envs.mettagrid import make_mettagrid_environment

    return make_mettagrid_environment(target, num_envs=num_envs, **kwargs)


def make_environment(cfg: EnvSettings, seed: int = 0, num_envs: int | None = None) -> TrainingEnvironment:
    """Create the environment a config names; unknown names and bad layouts fail with a one-line fix."""
    family, target = split_env_name(cfg.name)
    count = num_envs or cfg.num_envs
    try:
        if cfg.vectorization == "multiprocess" and cfg.num_workers > 1:
            from mettle.envs.vector import VectorEnvironment

            build_in_process(family, target, cfg.kwargs, "sync", 1).close()  # fail fast, in this process
            # SyncVectorEnv in the workers: its per-sub-env seeds give the same rollouts for any num_workers.
            factory = functools.partial(build_in_process, family, target, dict(cfg.kwargs), "sync")
            workers = min(cfg.num_workers, count)
            return VectorEnvironment(factory, count, workers, cfg.async_factor, seed=seed,
                                     timeout_s=cfg.worker_timeout_s)
        modes: dict[str, Vectorization] = {"gymnasium_async": "async", "gymnasium_sync": "sync"}
        gym_mode = modes.get(cfg.vectorization, "auto")
        return build_in_process(family, target, cfg.kwargs, gym_mode, count)
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None


def module_to_import(name: str) -> tuple[str, str] | None:
    """The (module, attribute) an env name makes us import: `pettingzoo:<module>:<callable>`, `gym:<module>:<id>`."""
    family, _, rest = name.partition(":")
    module, sep, attribute = rest.rpartition(":")
    if family not in ("gym", "pettingzoo") or not sep:
        return None
    return module.strip(), attribute.strip()


def vouched_modules() -> set[str]:
    """Modules named by the installed `mettle.envs` entry points (`module` or `module:callable`)."""
    return {point.value.partition(":")[0].strip() for point in entry_points(group=ENV_ENTRY_POINTS)}


def check_trusted_env_name(name: str, field: str, typed: Collection[str] = (), remedy: str | None = None) -> None:
    """Refuse an env name read from a file that would import a module we do not trust, before anything imports it.

    Trusted: a name the user typed on this command line (`typed`), modules under TRUSTED_ENV_PACKAGES (for
    PettingZoo only their `parallel_env`), and modules that an installed `mettle.envs` entry point names.
    """
    target = module_to_import(name)
    if target is None or name in typed:
        return
    module, attribute = target
    if module in vouched_modules():
        return
    trusted_package = any(module == package or module.startswith(package + ".") for package in TRUSTED_ENV_PACKAGES)
    if trusted_package and (name.startswith("gym:") or attribute in PETTINGZOO_FACTORIES):
        return
    raise ConfigError(
        f"{field} {name!r} would import {module!r}; a name read from a file may only import environment packages "
        f"Mettle trusts ({', '.join(TRUSTED_ENV_PACKAGES)}; for PettingZoo their {'/'.join(PETTINGZOO_FACTORIES)}) "
        f"or a module a {ENV_ENTRY_POINTS!r} entry point names, so it was refused; if you trust it, "
        f"{remedy or f'pass --env {name}'} on the command line"
    )
