"""Heartbeat: a small JSON file rewritten every epoch so an external watchdog can tell the run is alive."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mettle.files import atomic_write
from mettle.rl.training.component import TrainerComponent


class HeartbeatConfig(BaseModel):
    """Whether and how often the run writes its heartbeat file."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    enabled: bool = True
    """Write `heartbeat.json` in the run directory (cheap: one small file replace per epoch)."""
    interval: int = Field(1, ge=1)
    """Epochs between heartbeats; a watchdog's timeout should exceed this many epochs' duration."""


class Heartbeat(TrainerComponent):
    """Atomically rewrites `path` with {"agent_step", "epoch", "time", "status", "pid"} every `epoch_interval` epochs.

    A watchdog compares "time" (Unix seconds) or the file's mtime with the clock; "status" is
    "running", then "complete" or "failed" when training ends. The write is a temp file in the
    same directory followed by os.replace, so a reader never sees a partial file. There is no
    fsync: a heartbeat only has to be current, not to survive a power cut.
    """

    master_only = True

    def __init__(self, path: Path, epoch_interval: int = 1) -> None:
        super().__init__(epoch_interval)
        self.path = Path(path)
        self.beats = 0
        """Heartbeats written by this process."""

    def register(self, context: Any) -> None:
        """Beat once at start-up, so the file exists (and is fresh) before the first epoch ends."""
        super().register(context)
        self.beat("starting")

    def on_epoch_end(self, epoch: int) -> None:
        """The regular beat."""
        self.beat("running")

    def on_training_complete(self) -> None:
        """Tell the watchdog the run ended on purpose."""
        self.beat("complete")

    def on_failure(self, error: BaseException) -> None:
        """Tell the watchdog the run died, and why."""
        self.beat("failed", error=f"{type(error).__name__}: {error}"[:500])

    def beat(self, status: str, **extra: Any) -> None:
        """Write the current progress atomically."""
        state = self.context.state
        payload = {"agent_step": state.agent_step, "epoch": state.epoch, "time": time.time(), "status": status,
                   "pid": os.getpid(), **extra}
        write_json_atomic(self.path, payload)
        self.beats += 1


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Readers see the old or the new heartbeat, never half of one (not fsynced: it is rewritten every epoch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write((json.dumps(payload) + "\n").encode()), durable=False)


def read_heartbeat(path: Path) -> dict[str, Any] | None:
    """The last heartbeat written at `path`, or None when there is none yet (for watchdogs and tests)."""
    try:
        heartbeat: dict[str, Any] = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    return heartbeat
