"""Metrics sinks behind one interface: TensorBoard, a JSON-lines file and Weights & Biases."""

from __future__ import annotations

import json
import math
import re
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TextIO

from mettle.files import atomic_write

WandbMode = Literal["online", "offline", "disabled"]


class MetricsLogger(ABC):
    """Receives one flat dict of scalar metrics per report, keyed by "namespace/name", at an agent step."""

    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record every metric at `step`."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release files or runs; safe to call twice."""

    def __enter__(self) -> MetricsLogger:
        """Use as a context manager so the sink is closed on errors too."""
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        """Close on leaving the block."""
        self.close()


class TensorBoardLogger(MetricsLogger):
    """Scalars into TensorBoard event files under `log_dir`, flushed every report so they are readable live.

    The event file is opened at the first report, marking everything logged before at that step or later
    as purged: after a resume, readers see the resumed run's values, not those of the run it replaced.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # tensorboard is an optional extra
            raise ImportError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from error
        self.log_dir = Path(log_dir)
        self._open = SummaryWriter
        self._writer: Any = None
        self._closed = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One scalar per metric, then flush."""
        if self._writer is None:
            self._writer = self._open(log_dir=str(self.log_dir), purge_step=int(step))
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if not self._closed:
            self._closed = True
            if self._writer is not None:
                self._writer.close()


class JsonlLogger(MetricsLogger):
    """One JSON object per report ({"step", "time", "epoch"?, metrics...}), appended so resumed runs continue it.

    The first report drops earlier records at its step or later (logged by a run that was killed after its
    last checkpoint), so every step appears once, with the values of the run that continued.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Write and flush one line, so a crash loses at most the report being written."""
        if self._file is None:
            self._file = self._open_from(int(step))
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        if "performance/epoch" in metrics:
            record["epoch"] = int(metrics["performance/epoch"])
        record.update({name: _json_number(value) for name, value in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()

    def _open_from(self, step: int) -> TextIO:
        """Keep the records before `step` (a torn last line too is dropped), then append."""
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8", errors="replace")  # a damaged line is dropped below
            kept = [line for line in text.splitlines(keepends=True)
                    if line.endswith("\n") and _record_step(line) < step]
            atomic_write(self.path, lambda handle: handle.write("".join(kept).encode()))
        return self.path.open("a", encoding="utf-8")


def _record_step(line: str) -> float:
    """The step of one metrics.jsonl line; an unreadable line sorts last, so it is dropped."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return math.inf


class WandbLogger(MetricsLogger):
    """A Weights & Biases run; "offline" writes files under `dir`/wandb for a later `wandb sync`, with no network.

    The run id is derived from `run_name`, so a resumed training run continues the same W&B run. Console capture
    and code saving are off: the progress dashboard owns the terminal.
    """

    def __init__(
        self,
        project: str,
        run_name: str,
        mode: WandbMode = "offline",
        dir: str | Path = ".",
        config: dict[str, Any] | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError as error:  # wandb is an optional extra
            raise ImportError("W&B logging needs the wandb package: pip install wandb") from error
        Path(dir).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", save_code=False)
        self._run: Any = wandb.init(
            project=project,
            name=run_name,
            id=wandb_run_id(run_name),
            resume="allow",
            mode=mode,
            dir=str(dir),
            config=config or {},
            settings=settings,
            reinit="create_new",
        )
        self._closed = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log every metric at `step` (W&B ignores steps lower than ones it has seen)."""
        self._run.log(dict(metrics), step=int(step))

    def close(self) -> None:
        """Finish the run (writes the offline run's last records)."""
        if not self._closed:
            self._closed = True
            self._run.finish()


def wandb_run_id(run_name: str) -> str:
    """A W&B-safe run id (letters, digits, '-', '_', at most 64) derived from the run name."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64] or "run"


def _json_number(value: float) -> float | None:
    """Plain floats for JSON; nan and infinities become null, which strict JSON readers accept."""
    number = float(value)
    return number if math.isfinite(number) else None
