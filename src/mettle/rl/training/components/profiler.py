"""TorchProfiler: a torch.profiler trace of one whole epoch every N epochs, exported as Chrome trace JSON."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.profiler import ProfilerActivity, profile

from mettle.rl.training.component import TrainerComponent

logger = logging.getLogger(__name__)


class ProfilerConfig(BaseModel):
    """Whether and how often to record a torch.profiler trace."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    enabled: bool = False
    """Record traces into the run directory's profiles/ folder (slows the profiled epochs noticeably)."""
    interval: int = Field(100, ge=1)
    """Profile epochs interval, 2*interval, ... (1: every epoch)."""
    record_shapes: bool = False
    """Also record operator input shapes (bigger traces, more overhead)."""


class TorchProfiler(TrainerComponent):
    """Profiles epochs whose number is a multiple of `interval`; writes `out_dir/trace_epoch_<n>.json`.

    Recording starts at the end of epoch n-1 (at registration when n is the first epoch) and
    stops at the end of epoch n, so the trace holds the rollout, the update and the epoch-end
    hooks of the components registered before this one. Open it in chrome://tracing or
    https://ui.perfetto.dev. A profiler that fails to start or export logs a warning instead of
    stopping training; one still recording when training ends is stopped and its partial trace
    dropped. On resume, the first profiled epoch is skipped when it is the very next epoch.
    """

    master_only = True

    def __init__(self, out_dir: Path, interval: int = 100, record_shapes: bool = False) -> None:
        super().__init__(1)  # every epoch end: this component decides itself when to start and stop
        if interval < 1:
            raise ValueError(f"interval {interval} must be >= 1")
        self.out_dir = Path(out_dir)
        self.interval = interval
        self.record_shapes = record_shapes
        self.traces: list[Path] = []
        """Trace files written so far."""
        self._profile: profile | None = None

    @property
    def recording(self) -> bool:
        """Whether an epoch is being profiled now."""
        return self._profile is not None

    def register(self, context: Any) -> None:
        """Start at once when the very next epoch is one to profile."""
        super().register(context)
        self._maybe_start(context.state.epoch)

    def on_epoch_end(self, epoch: int) -> None:
        """Finish the profiled epoch's trace; start recording when the next epoch is due."""
        if self._profile is not None:
            self._finish(epoch)
        self._maybe_start(epoch)

    def on_training_complete(self) -> None:
        """Stop a recording that no epoch will complete."""
        self._discard()

    def on_failure(self, error: BaseException) -> None:
        """Leave no profiler running behind a failed run."""
        self._discard()

    def _activities(self) -> list[ProfilerActivity]:
        activities = [ProfilerActivity.CPU]
        if self.context.device.type == "cuda" and torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        return activities

    def _maybe_start(self, completed_epochs: int) -> None:
        if (completed_epochs + 1) % self.interval:
            return
        prof = profile(activities=self._activities(), record_shapes=self.record_shapes)
        try:
            prof.start()
        except Exception as error:  # e.g. another profiler is already active in this process
            logger.warning("torch profiler could not start for epoch %d: %r", completed_epochs + 1, error)
            return
        self._profile = prof

    def _finish(self, epoch: int) -> None:
        prof, self._profile = self._profile, None
        assert prof is not None
        path = self.out_dir / f"trace_epoch_{epoch}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            prof.stop()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(tmp))  # then rename: no half-written trace under the final name
            os.replace(tmp, path)
        except Exception as error:  # a diagnostic must not end a long run
            logger.warning("torch profiler trace for epoch %d was not written to %s: %r", epoch, path, error)
            return
        finally:
            tmp.unlink(missing_ok=True)
        self.traces.append(path)
        logger.info("profiler trace of epoch %d written to %s", epoch, path)

    def _discard(self) -> None:
        prof, self._profile = self._profile, None
        if prof is None:
            return
        try:
            prof.stop()
        except Exception as error:
            logger.warning("torch profiler did not stop cleanly: %r", error)
