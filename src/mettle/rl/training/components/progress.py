"""ProgressLogger: a plain progress line every few seconds (steps, SPS, return)."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any, TextIO

from mettle.rl.training.component import TrainerComponent


class ProgressLogger(TrainerComponent):
    """Prints agent steps, throughput and recent mean episode return at most every `interval_s` seconds."""

    master_only = True

    def __init__(self, interval_s: float = 5.0, window: int = 100, stream: TextIO | None = None) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.stream = stream or sys.stdout
        self.returns: deque[float] = deque(maxlen=window)
        self.lengths: deque[float] = deque(maxlen=window)
        self._last_print = float("-inf")
        self._started = time.perf_counter()
        self._start_step = 0

    def register(self, context: Any) -> None:
        """Remember where this session started, for the session's average throughput."""
        super().register(context)
        self._start_step = context.state.agent_step

    def on_step(self, infos: list[dict[str, Any]]) -> None:
        """Collect finished episodes."""
        for info in infos:
            if "episode_return" in info:
                self.returns.append(float(info["episode_return"]))
                self.lengths.append(float(info.get("episode_length", 0)))

    def on_epoch_end(self, epoch: int) -> None:
        """Print when the interval has passed."""
        now = time.perf_counter()
        if now - self._last_print >= self.interval_s:
            self._last_print = now
            self.emit()

    def on_training_complete(self) -> None:
        """A last line with the final figures."""
        self.emit(prefix="done")

    def mean_return(self) -> float:
        """Mean return of the recent episodes (nan before the first one ends)."""
        return sum(self.returns) / len(self.returns) if self.returns else float("nan")

    def emit(self, prefix: str = "") -> None:
        """Write one progress line."""
        ctx = self.context
        state, cfg = ctx.state, ctx.config
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        avg_sps = (state.agent_step - self._start_step) / elapsed
        mean_len = sum(self.lengths) / len(self.lengths) if self.lengths else float("nan")
        losses = ctx.stats.losses
        line = (
            f"{prefix + ' ' if prefix else ''}epoch {state.epoch} | steps {state.agent_step:,}/{cfg.total_timesteps:,} "
            f"| sps {ctx.stats.steps_per_second:,.0f} (avg {avg_sps:,.0f}) "
            f"| return {self.mean_return():.2f} | length {mean_len:.1f} "
            f"| policy_loss {losses.get('policy_loss', float('nan')):.4f} "
            f"| value_loss {losses.get('value_loss', float('nan')):.4f} "
            f"| entropy {losses.get('entropy', float('nan')):.3f} | {elapsed:.0f}s"
        )
        print(line, file=self.stream, flush=True)
