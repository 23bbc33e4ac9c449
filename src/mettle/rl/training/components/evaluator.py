"""Evaluator: every few epochs, whole evaluation episodes on separate environments, without touching training.

Isolation from training is what makes the Evaluator safe to switch on: a run with it registered trains
bit-for-bit like a run without. Evaluation therefore

* runs on environments of its own (built lazily by the given factories, reused, closed at the end);
* saves and restores the policy's per-row rollout memory (recurrent policies) and every module's
  train/eval flag;
* saves the global python/numpy/torch (and CUDA) RNG streams, seeds them with `seed` so a sampled
  evaluation is reproducible, and puts the training streams back afterwards.

How it acts is `actions`: "auto" (the default) samples on MettaGrid, where greedy agents block each other and
stand still, and takes the argmax elsewhere; "sampled" or "greedy" force one. The mode used is logged once per
environment and recorded with every result as "eval/<name>/greedy" (1.0 argmax, 0.0 sampled).

With `replays` N > 0 and a `replay_dir`, the first N episodes to start in each evaluation of each environment
that can record them (MettaGrid: mettagrid's own writer) are saved as MettaScope replays under
`replay_dir/<env name>/epoch_<epoch>/<uuid>.json.z`, and each path is logged.

Results go to `Evaluator.latest` ({"eval/<name>/mean_return": ..., ...}), to `Evaluator.history`
(checkpointed), and into `ctx.stats.metrics` for the reporters.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mettle.agent.policy import Policy
from mettle.contracts import RecordsReplays
from mettle.rl.evaluate import (
    ActionChoice,
    ActionMode,
    actions_line,
    evaluate_policy,
    isolated_rng,
    resolve_actions,
    summarize_returns,
)
from mettle.rl.training.component import TrainerComponent
from mettle.rl.training.environment import TrainingEnvironment

__all__ = ["EnvFactory", "Evaluator", "EvaluatorConfig", "env_stat_means", "isolated_evaluation"]

logger = logging.getLogger(__name__)

EnvFactory = Callable[[], TrainingEnvironment]
"""Builds one evaluation environment (called once, on first use)."""

CONFIG_SWITCHES: Mapping[ActionMode, str] = {"sampled": "evaluator.actions=sampled",
                                             "greedy": "evaluator.actions=greedy"}
"""The overrides that choose each mode, for the logged mode line."""

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
    actions: ActionChoice = "auto"
    """auto: sampled on MettaGrid (greedy agents there block each other), greedy (argmax) elsewhere; sampled
    (seeded, so reproducible) or greedy force one mode on every evaluation environment."""
    num_envs: int = Field(4, ge=1)
    """Environment instances in each evaluation environment (more finish the episodes sooner)."""
    envs: list[str] = Field(default_factory=list)
    """Other environments (family:name) to evaluate on besides the training one, e.g. another MettaGrid task."""
    suite: str | None = None
    """Held-out MettaGrid variants to evaluate on too (arena-heldout, navigation-heldout or a suite file): each
    variant's results, and the mean of their mean returns as eval/<suite>/mean_return."""
    replays: int = Field(0, ge=0)
    """Save the first this many episodes of each evaluation of each MettaGrid environment as MettaScope replays
    (RUN_DIR/replays/<env>/epoch_<epoch>/*.json.z, paths logged); 0: none."""

    @model_validator(mode="before")
    @classmethod
    def _read_deterministic(cls, data: Any) -> Any:
        """Load configs saved before `actions` replaced `deterministic`.

        `deterministic: true` was the default every config.json recorded, chosen or not, so it becomes "auto"
        (greedy still on Gymnasium/PettingZoo, sampled on MettaGrid); `false` was a choice: "sampled".
        """
        if isinstance(data, dict) and "deterministic" in data and "actions" not in data:
            data = dict(data)
            deterministic = data.pop("deterministic")
            if isinstance(deterministic, bool):
                data["actions"] = "auto" if deterministic else "sampled"
            else:
                data["deterministic"] = deterministic  # left for the "extra fields" error to name
        return data

    def build(self, envs: Mapping[str, EnvFactory], seed: int = 12345,
              suites: Mapping[str, list[str]] | None = None, replay_dir: Path | None = None) -> Evaluator | None:
        """The component when enabled (the factories should honour `num_envs`), else None; replays need a dir."""
        if not self.enabled:
            return None
        return Evaluator(envs, self.episodes, self.interval, self.actions, seed, suites=suites,
                         replays=self.replays if replay_dir is not None else 0, replay_dir=replay_dir)


# ---------------------------------------------------------------------- isolation helpers
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
        actions: ActionChoice = "auto",
        seed: int = 12345,
        on_complete: bool = True,
        suites: Mapping[str, list[str]] | None = None,
        replays: int = 0,
        replay_dir: Path | None = None,
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
        self.actions = actions
        self.modes: dict[str, ActionMode] = {name: resolve_actions(actions, name) for name in self.factories}
        """Each environment's mode, "auto" resolved by its env family."""
        self.seed = seed
        self.on_complete = on_complete
        self.suites = {name: list(members) for name, members in (suites or {}).items()}
        """Suite name -> the environments (of `envs`) that are its variants: their mean is reported too."""
        unknown = sorted({env for members in self.suites.values() for env in members} - set(self.factories))
        if unknown:
            raise ValueError(f"suite variants {unknown} have no evaluation environment factory")
        if replays < 0 or (replays and replay_dir is None):
            raise ValueError(f"replays {replays} must be >= 0, and a replay_dir is needed to save any")
        self.replays = replays
        self.replay_dir = replay_dir
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
        for suite, members in self.suites.items():
            means = [results[f"eval/{member}/mean_return"] for member in members]
            results[f"eval/{suite}/mean_return"] = math.fsum(means) / len(means)
        self.latest = results
        self.history.append({"epoch": float(ctx.state.epoch), "agent_step": float(ctx.state.agent_step), **results})
        self._publish(results)
        return dict(results)

    def _evaluate_one(self, name: str) -> dict[str, float]:
        """One environment's episodes, inside the isolation, summarised under "eval/<name>/"."""
        ctx = self.context
        with isolated_evaluation(ctx.policy, self.seed, ctx.device):
            env = self._env(name)
            greedy = self.modes[name] == "greedy"
            recording = self._start_replays(name, env)
            infos = evaluate_policy(ctx.policy, env, self.episodes, ctx.device, greedy, self.seed)
            if recording is not None:
                self._log_replays(name, recording)
        summary = {**summarize_returns(infos), **env_stat_means(infos), "greedy": float(greedy)}
        return {f"eval/{name}/{key}": float(value) for key, value in summary.items()}

    def _env(self, name: str) -> TrainingEnvironment:
        """The named environment, built on first use (saying how it is acted on) and reused afterwards."""
        if name not in self._envs:
            logger.info("evaluator on %s: %s", name, actions_line(self.actions, name, CONFIG_SWITCHES))
            self._envs[name] = self.factories[name]()
            if self.replays and not isinstance(self._envs[name], RecordsReplays):
                logger.warning("evaluator on %s: evaluator.replays=%d, but this environment writes no replays "
                               "(MettaGrid environments do)", name, self.replays)
        return self._envs[name]

    def _start_replays(self, name: str, env: TrainingEnvironment) -> RecordsReplays | None:
        """Have the env record this evaluation's first `replays` episodes, when asked and it can."""
        if not self.replays or self.replay_dir is None or not isinstance(env, RecordsReplays):
            return None
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        env.record_replays(self.replay_dir / folder / f"epoch_{self.context.state.epoch}", self.replays)
        return env

    def _log_replays(self, name: str, env: RecordsReplays) -> None:
        """Write what is still being recorded, stop recording, and log every replay's path."""
        written = env.finish_replays()
        env.record_replays(None)
        for path in written:
            logger.info("evaluator on %s: replay %s", name, path)

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
