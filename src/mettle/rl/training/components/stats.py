"""StatsReporter: one metrics dict per report (environment, losses, performance, timing) sent to every logger."""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mettle.rl.training.component import TrainerComponent
from mettle.rl.training.components.loggers import JsonlLogger, MetricsLogger, TensorBoardLogger, WandbLogger

logger = logging.getLogger(__name__)

WandbChoice = Literal["off", "online", "offline", "disabled"]
IDENTIFIER_KEYS = frozenset({"env_id", "agent_id", "task_id"})
"""Numeric episode-info keys that name an episode rather than measure it, so they are not averaged."""


class StatsConfig(BaseModel):
    """Where training metrics go and how often they are reported."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    tensorboard: bool = True
    """Write TensorBoard event files under <run_dir>/tensorboard."""
    jsonl: bool = True
    """Append one JSON object per report to <run_dir>/metrics.jsonl."""
    wandb: WandbChoice = "off"
    """Weights & Biases: off (never imported), online, offline (files under <run_dir>/wandb), or disabled (no-op)."""
    wandb_project: str = "mettle"
    """W&B project the run is logged to."""
    interval: int = Field(1, ge=1)
    """Epochs between reports; episodes finished in between are summarised, not dropped."""


class EpisodeSummary:
    """Running sums of numeric episode-info keys, so one report covers every episode since the previous one."""

    def __init__(self) -> None:
        self.episodes = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, info: dict[str, Any]) -> None:
        """Fold one finished episode's numeric values in (identifiers and non-numbers are skipped)."""
        self.episodes += 1
        for key, value in info.items():
            if key not in IDENTIFIER_KEYS and isinstance(value, numbers.Real):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
                self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        """Per-key means over the episodes that carried the key."""
        return {key: total / self.counts[key] for key, total in self.sums.items()}

    def clear(self) -> None:
        """Start the next report's summary."""
        self.episodes = 0
        self.sums, self.counts = {}, {}

    def state_dict(self) -> dict[str, Any]:
        """Plain-container copy, so episodes not yet reported survive a restart."""
        return {"episodes": self.episodes, "sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.episodes = int(state["episodes"])
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.counts = {str(k): int(v) for k, v in state["counts"].items()}


class StatsReporter(TrainerComponent):
    """Every `epoch_interval` epochs, logs environment/, loss/, performance/ and timing/ metrics at the agent step.

    Register it before the checkpointer, so a checkpoint taken at a report holds the state after that report.
    """

    master_only = True

    def __init__(self, loggers: Sequence[MetricsLogger], epoch_interval: int = 1) -> None:
        super().__init__(epoch_interval)
        self.loggers = list(loggers)
        self.episodes = EpisodeSummary()
        self._report_started = time.perf_counter()
        self._reported_epoch = 0
        self._closed = False

    @classmethod
    def from_config(cls, cfg: StatsConfig, run_dir: Path, run_name: str, config: dict[str, Any]) -> StatsReporter:
        """The reporter a run's StatsConfig describes, with its loggers under `run_dir`."""
        loggers = build_loggers(run_dir, cfg.tensorboard, cfg.jsonl, cfg.wandb, cfg.wandb_project, run_name, config)
        return cls(loggers, epoch_interval=cfg.interval)

    # -- hooks ----------------------------------------------------------------------

    def register(self, context: Any) -> None:
        """Measure the first report's wall time from now."""
        super().register(context)
        self._report_started = time.perf_counter()
        self._reported_epoch = context.state.epoch

    def on_step(self, infos: list[dict[str, Any]]) -> None:
        """Summarise the episodes that just finished."""
        for info in infos:
            self.episodes.add(info)

    def on_epoch_end(self, epoch: int) -> None:
        """Report (the trainer calls this every `epoch_interval` epochs)."""
        self.report()

    def on_training_complete(self) -> None:
        """Report the epochs since the last report (or figures published since, e.g. a final evaluation), then close."""
        try:
            if self.context.state.epoch > self._reported_epoch:
                self.report()
            elif self.context.stats.metrics:
                self._send(self._published())
        finally:
            self.close()

    def on_failure(self, error: BaseException) -> None:
        """Close the loggers so what was logged is flushed."""
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Unreported episodes and wall time, so interval > 1 loses nothing across a restart."""
        return {
            "episodes": self.episodes.state_dict(),
            "reported_epoch": self._reported_epoch,
            "wall_since_report": time.perf_counter() - self._report_started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the report that was open when the checkpoint was written."""
        self.episodes.load_state_dict(state["episodes"])
        self._reported_epoch = int(state["reported_epoch"])
        self._report_started = time.perf_counter() - float(state["wall_since_report"])

    # -- reporting ------------------------------------------------------------------

    def report(self) -> dict[str, float]:
        """Build this report's metrics, send them to every logger at the current agent step, return them."""
        metrics = self.collect()
        self._send(metrics)
        self.episodes.clear()
        self._reported_epoch = self.context.state.epoch
        return metrics

    def _send(self, metrics: dict[str, float]) -> None:
        """Log at the current agent step; published figures are consumed."""
        for sink in self.loggers:
            sink.log(metrics, self.context.state.agent_step)
        self.context.stats.metrics.clear()

    def collect(self) -> dict[str, float]:
        """All namespaces; reading the timers starts the next report's timing."""
        return {**self._environment(), **self._losses(), **self._performance(), **self._timing(), **self._published()}

    def _published(self) -> dict[str, float]:
        """What other components published for this report (eval/, monitor/, gradients/...)."""
        return {key: float(value) for key, value in self.context.stats.metrics.items()}

    def close(self) -> None:
        """Close every logger once; one failing does not keep the others open."""
        if self._closed:
            return
        self._closed = True
        for sink in self.loggers:
            try:
                sink.close()
            except Exception:
                logger.exception("closing %s failed", type(sink).__name__)

    def _environment(self) -> dict[str, float]:
        """Episode means since the last report, plus how many episodes they cover."""
        means = {f"environment/{key}": value for key, value in self.episodes.means().items()}
        return {"environment/episodes": float(self.episodes.episodes), **means}

    def _losses(self) -> dict[str, float]:
        """The last update's mean diagnostics: each loss's under loss/<loss name>/, the update's under loss/."""
        return {f"loss/{name}": float(value) for name, value in self.context.stats.losses.items()}

    def _performance(self) -> dict[str, float]:
        """Throughput, progress counters and the current learning rate."""
        ctx = self.context
        return {
            "performance/steps_per_second": float(ctx.stats.steps_per_second),
            "performance/agent_step": float(ctx.state.agent_step),
            "performance/epoch": float(ctx.state.epoch),
            "performance/learning_rate": float(ctx.optimizer.param_groups[0]["lr"]),
        }

    def _timing(self) -> dict[str, float]:
        """Seconds per stopwatch timer since the last report, and each one's fraction of the wall time."""
        now = time.perf_counter()
        wall, self._report_started = max(now - self._report_started, 1e-9), now
        laps = self.context.stopwatch.lap_all()
        laps["other"] = max(wall - laps.get("rollout", 0.0) - laps.get("train", 0.0), 0.0)
        metrics = {"timing/wall": wall}
        for name, seconds in laps.items():
            metrics[f"timing/{name}"] = seconds
            metrics[f"timing/{name}_frac"] = seconds / wall
        return metrics


def build_loggers(
    run_dir: Path,
    tensorboard: bool,
    jsonl: bool,
    wandb_mode: WandbChoice,
    wandb_project: str,
    run_name: str,
    config: dict[str, Any],
) -> list[MetricsLogger]:
    """The loggers a run asked for: run_dir/tensorboard, run_dir/metrics.jsonl, W&B files under run_dir/wandb."""
    run_dir = Path(run_dir)
    loggers: list[MetricsLogger] = []
    if tensorboard:
        loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
    if jsonl:
        loggers.append(JsonlLogger(run_dir / "metrics.jsonl"))
    if wandb_mode != "off":
        loggers.append(WandbLogger(wandb_project, run_name, mode=wandb_mode, dir=run_dir, config=config))
    return loggers
