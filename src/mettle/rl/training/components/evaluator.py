"""Evaluator: every few epochs, whole evaluation episodes on separate environments, without touching training.

Isolation from training is what makes the Evaluator safe to switch on: a run with it registered trains
bit-for-bit like a run without. Evaluation therefore

* runs on environments of its own (built lazily by the given factories, reused, closed at the end);
* saves and restores the policy's per-row rollout memory (recurrent policies) and every module's
  train/eval flag;
* saves the global python/numpy/torch (and CUDA) RNG streams, seeds them with `seed` so a sampled
  evaluation is reproducible, and puts the training streams back afterwards.

Results go to `Evaluator.latest` ({"eval/<name>/mean_return": ..., ...}), to `Evaluator.history`
(checkpointed), and into `ctx.stats.metrics` for the reporters.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from numbers import Real
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mettle.agent.policy import Policy
from mettle.rl.evaluate import evaluate_policy, summarize_returns
from mettle.rl.training.component import TrainerComponent
from mettle.rl.training.environment import TrainingEnvironment

__all__ = ["EnvFactory", "Evaluator", "EvaluatorConfig", "env_stat_means", "isolated_evaluation"]

logger = logging.getLogger(__name__)

EnvFactory = Callable[[], TrainingEnvironment]
"""Builds one evaluation environment (called once, on first use)."""

_INFO_IDS = frozenset({"env_id", "agent_id", "episode_return", "episode_length"})
"""Info keys that are bookkeeping or already summarised by `summarize_returns`."""


class EvaluatorConfig(BaseModel):
    """Periodic evaluation, as set from the CLI or a config file."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    enabled: bool = False
    """Run the Evaluator during training."""
    interval: int = Field(10, ge=1)
    """Evaluate every this many epochs (and once more when training completes)."""
    episodes: int = Field(10, ge=1)
    """Agent-episodes per evaluation environment, spread evenly over its agent rows."""
    deterministic: bool = True
    """Greedy (argmax) actions; False samples from the policy, seeded for reproducibility."""
    num_envs: int = Field(4, ge=1)
    """Environment instances in each evaluation environment (more finish the episodes sooner)."""
    envs: list[str] = Field(default_factory=list)
    """Other environments (family:name) to evaluate on besides the training one, e.g. another MettaGrid task."""

    def build(self, envs: Mapping[str, EnvFactory], seed: int = 12345) -> Evaluator | None:
        """The component when enabled (the factories should honour `num_envs`), else None."""
        if not self.enabled:
            return None
        return Evaluator(envs, self.episodes, self.interval, self.deterministic, seed)


# ---------------------------------------------------------------------- isolation helpers
@contextmanager
def isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed python/numpy/torch for the evaluation and restore the training streams exactly afterwards."""
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


@contextmanager
def preserved_policy(policy: Policy) -> Iterator[None]:
    """Put back the policy's rollout memory and every module's train/eval flag after the block."""
    memory = {key: value.detach().clone() for key, value in policy.memory_state().items()}
    modes = [(module, module.training) for module in policy.modules()]
    try:
        yield
    finally:
        policy.load_memory_state(memory)
        for module, training in modes:
            module.training = training


@contextmanager
def isolated_evaluation(policy: Policy, seed: int, device: torch.device) -> Iterator[None]:
    """Both isolations together: whatever runs inside leaves training's RNG, memory and modes as they were."""
    with preserved_policy(policy), isolated_rng(seed, device):
        yield


def env_stat_means(infos: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of every numeric per-episode stat (game/*, agent/*, ...), over the episodes that report it."""
    values: dict[str, list[float]] = {}
    for info in infos:
        for key, value in info.items():
            if key not in _INFO_IDS and isinstance(value, Real):
                values.setdefault(key, []).append(float(value))
    return {key: math.fsum(vals) / len(vals) for key, vals in values.items()}


# ---------------------------------------------------------------------- the component
class Evaluator(TrainerComponent):
    """Runs `episodes` evaluation episodes per environment every `epoch_interval` epochs (rank 0 only)."""

    master_only = True

    def __init__(
        self,
        envs: Mapping[str, EnvFactory],
        episodes: int = 10,
        epoch_interval: int = 10,
        deterministic: bool = True,
        seed: int = 12345,
        on_complete: bool = True,
    ) -> None:
        super().__init__(epoch_interval)
        if not envs:
            raise ValueError("Evaluator needs at least one evaluation environment factory")
        if episodes < 1:
            raise ValueError(f"episodes {episodes} must be >= 1")
        if seed < 0:
            raise ValueError(f"seed {seed} must be >= 0")
        self.factories = dict(envs)
        self.episodes = episodes
        self.deterministic = deterministic
        self.seed = seed
        self.on_complete = on_complete
        self.latest: dict[str, float] = {}
        """Results of the most recent evaluation, keyed "eval/<env name>/<metric>"."""
        self.history: list[dict[str, float]] = []
        """Every evaluation's results plus its "epoch" and "agent_step" (checkpointed)."""
        self._envs: dict[str, TrainingEnvironment] = {}

    # -- hooks ---------------------------------------------------------------------
    def on_epoch_end(self, epoch: int) -> None:
        """Evaluate on the interval."""
        self.evaluate()

    def on_training_complete(self) -> None:
        """Evaluate the final policy (unless this epoch was just evaluated), then release the environments."""
        try:
            if self.on_complete and not self._evaluated_this_epoch():
                self.evaluate()
        finally:
            self.close()

    def on_failure(self, error: BaseException) -> None:
        """Release the environments; the failure itself is the trainer's to report."""
        self.close()

    # -- evaluation ----------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Evaluate the current policy on every environment; record, publish and return the results."""
        ctx = self.context
        results: dict[str, float] = {}
        with ctx.stopwatch("evaluate"):
            for name in self.factories:
                results.update(self._evaluate_one(name))
        self.latest = results
        self.history.append({"epoch": float(ctx.state.epoch), "agent_step": float(ctx.state.agent_step), **results})
        self._publish(results)
        return dict(results)

    def _evaluate_one(self, name: str) -> dict[str, float]:
        """One environment's episodes, inside the isolation, summarised under "eval/<name>/"."""
        ctx = self.context
        with isolated_evaluation(ctx.policy, self.seed, ctx.device):
            env = self._env(name)
            infos = evaluate_policy(ctx.policy, env, self.episodes, ctx.device, self.deterministic, self.seed)
        summary = {**summarize_returns(infos), **env_stat_means(infos)}
        return {f"eval/{name}/{key}": float(value) for key, value in summary.items()}

    def _env(self, name: str) -> TrainingEnvironment:
        """The named environment, built on first use and reused afterwards."""
        if name not in self._envs:
            self._envs[name] = self.factories[name]()
        return self._envs[name]

    def _publish(self, results: dict[str, float]) -> None:
        """Hand the results to the reporters through the epoch stats."""
        self.context.stats.metrics.update(results)

    def _evaluated_this_epoch(self) -> bool:
        """Whether the newest history entry belongs to the current epoch (avoids a duplicate final run)."""
        return bool(self.history) and int(self.history[-1]["epoch"]) == self.context.state.epoch

    def close(self) -> None:
        """Close every environment this Evaluator built; a failing close is logged, not raised."""
        envs, self._envs = self._envs, {}
        for name, env in envs.items():
            try:
                env.close()
            except Exception:  # closing must not hide the training outcome
                logger.exception("closing evaluation environment %r failed", name)

    # -- checkpoint ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The history of results (plain floats), so a resumed run keeps its evaluation curve."""
        return {"history": [dict(entry) for entry in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history; `latest` is its newest entry's results."""
        self.history = [{key: float(value) for key, value in entry.items()} for entry in state.get("history", [])]
        newest = self.history[-1] if self.history else {}
        self.latest = {key: value for key, value in newest.items() if key.startswith("eval/")}
