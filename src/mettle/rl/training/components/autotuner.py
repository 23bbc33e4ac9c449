"""UpdateEpochsAutotuner: fewer PPO passes when updates overshoot, more when they barely move the policy.

After every epoch it reads the update's mean `approx_kl` and `clipfrac` (averaged over ranks, so
every rank takes the same decision and DDP keeps the same number of backward passes):

* too far (approx_kl > kl_high OR clipfrac > clipfrac_high): one pass fewer, not below min_epochs;
* too timid (approx_kl < kl_low AND clipfrac < clipfrac_low): one pass more, not above max_epochs;
* in between: nothing, and both streaks reset.

Hysteresis comes from the gap between the low and high thresholds plus `patience`: a move needs
`patience` consecutive epochs on the same side, and the streak restarts after every move, so the
value changes by at most one every `patience` epochs. Epochs without finite signals are skipped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mettle.rl.training.component import TrainerComponent

if TYPE_CHECKING:
    from mettle.rl.training.context import ComponentContext

__all__ = ["AutotunerConfig", "UpdateEpochsAutotuner"]

_MAX_UPDATE_EPOCHS = 1000
"""TrainerConfig.update_epochs' own upper bound."""


def _check_thresholds(min_epochs: int, max_epochs: int, kl: tuple[float, float], clip: tuple[float, float],
                      patience: int) -> None:
    """Raise ValueError for bounds or thresholds that cannot work together."""
    if not 1 <= min_epochs <= max_epochs <= _MAX_UPDATE_EPOCHS:
        raise ValueError(f"need 1 <= min_epochs <= max_epochs <= {_MAX_UPDATE_EPOCHS}, got {min_epochs}, "
                         f"{max_epochs}")
    if not 0 <= kl[0] < kl[1]:
        raise ValueError(f"need 0 <= kl_low < kl_high, got {kl[0]}, {kl[1]}")
    if not 0 <= clip[0] < clip[1]:
        raise ValueError(f"need 0 <= clipfrac_low < clipfrac_high, got {clip[0]}, {clip[1]}")
    if patience < 1:
        raise ValueError(f"patience {patience} must be >= 1")


class UpdateEpochsAutotuner(TrainerComponent):
    """Moves `state.hyperparameters.update_epochs` by one within [min_epochs, max_epochs] from KL and clipping."""

    def __init__(
        self,
        min_epochs: int = 1,
        max_epochs: int = 16,
        kl_low: float = 0.005,
        kl_high: float = 0.03,
        clipfrac_low: float = 0.05,
        clipfrac_high: float = 0.3,
        patience: int = 2,
    ) -> None:
        super().__init__()
        _check_thresholds(min_epochs, max_epochs, (kl_low, kl_high), (clipfrac_low, clipfrac_high), patience)
        self.min_epochs, self.max_epochs = min_epochs, max_epochs
        self.kl_low, self.kl_high = kl_low, kl_high
        self.clipfrac_low, self.clipfrac_high = clipfrac_low, clipfrac_high
        self.patience = patience
        self.high_streak = 0
        """Consecutive epochs above a high threshold."""
        self.low_streak = 0
        """Consecutive epochs below both low thresholds."""
        self.adjustments: list[tuple[int, int]] = []
        """(epoch, new update_epochs) for every change made."""
        self._restored_epochs: int | None = None
        """update_epochs from an old checkpoint (kept by the autotuner, not TrainerState) loaded before registration."""

    # -- hooks ---------------------------------------------------------------------
    def register(self, context: ComponentContext) -> None:
        """Bring update_epochs into bounds (or back to a value loaded before registration)."""
        super().register(context)
        current = context.state.hyperparameters.update_epochs
        wanted = self._restored_epochs if self._restored_epochs is not None else current
        self._restored_epochs = None
        self._set(self._clamp(wanted))

    def on_epoch_end(self, epoch: int) -> None:
        """Read this update's diagnostics and adjust update_epochs for the next one."""
        signals = self._signals()
        if signals is None:
            return
        current = self.context.state.hyperparameters.update_epochs
        proposed = self.observe(*signals, current)
        if proposed != current:
            self._set(proposed)
            self.adjustments.append((epoch, proposed))

    # -- decision ------------------------------------------------------------------
    def observe(self, approx_kl: float, clipfrac: float, current: int) -> int:
        """Update the streaks with one epoch's signals; return the update_epochs to use next."""
        if approx_kl > self.kl_high or clipfrac > self.clipfrac_high:
            self.high_streak, self.low_streak = self.high_streak + 1, 0
        elif approx_kl < self.kl_low and clipfrac < self.clipfrac_low:
            self.high_streak, self.low_streak = 0, self.low_streak + 1
        else:
            self.high_streak = self.low_streak = 0
        if self.high_streak >= self.patience:
            self.high_streak = 0
            return self._clamp(current - 1)
        if self.low_streak >= self.patience:
            self.low_streak = 0
            return self._clamp(current + 1)
        return self._clamp(current)

    def _signals(self) -> tuple[float, float] | None:
        """Rank-averaged (approx_kl, clipfrac) of the last update, or None when missing or not finite."""
        ctx = self.context
        losses = ctx.stats.losses
        kl_key, clip_key = "ppo_actor/approx_kl", "ppo_actor/clipfrac"
        if kl_key not in losses or clip_key not in losses:
            return None
        local = torch.tensor([losses[kl_key], losses[clip_key]], dtype=torch.float64)
        kl, clipfrac = (float(v) for v in ctx.distributed.all_reduce_mean(local.to(ctx.distributed.device)).cpu())
        return (kl, clipfrac) if math.isfinite(kl) and math.isfinite(clipfrac) else None

    def _clamp(self, epochs: int) -> int:
        """Keep a value within [min_epochs, max_epochs]."""
        return min(max(int(epochs), self.min_epochs), self.max_epochs)

    def _set(self, epochs: int) -> None:
        """Write the value where the training loop reads it (checkpointed with TrainerState)."""
        self.context.state.hyperparameters.update_epochs = epochs

    # -- checkpoint ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Both streaks and the adjustment log, as plain containers (the tuned value is in TrainerState)."""
        return {
            "high_streak": self.high_streak,
            "low_streak": self.low_streak,
            "adjustments": [list(item) for item in self.adjustments],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the streaks; an old checkpoint's tuned value too (now, or at registration)."""
        self.high_streak = int(state["high_streak"])
        self.low_streak = int(state["low_streak"])
        self.adjustments = [(int(epoch), int(value)) for epoch, value in state.get("adjustments", [])]
        if state.get("update_epochs") is None:
            return
        if self._context is None:
            self._restored_epochs = int(state["update_epochs"])
        else:
            self._set(self._clamp(int(state["update_epochs"])))


class AutotunerConfig(BaseModel):
    """Automatic tuning of PPO update epochs from approx-KL and clip fraction, for the CLI."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    enabled: bool = False
    """Adjust `update_epochs` during training."""
    min_epochs: int = Field(1, ge=1, le=_MAX_UPDATE_EPOCHS)
    """Never fewer update epochs than this."""
    max_epochs: int = Field(16, ge=1, le=_MAX_UPDATE_EPOCHS)
    """Never more update epochs than this."""
    kl_low: float = Field(0.005, ge=0)
    """Below this approx-KL (and clipfrac below clipfrac_low) the update is too timid: one epoch more."""
    kl_high: float = Field(0.03, gt=0)
    """Above this approx-KL (or clipfrac above clipfrac_high) the update overshoots: one epoch fewer."""
    clipfrac_low: float = Field(0.05, ge=0, le=1)
    """Clip fraction below which (with low KL) updates count as too timid."""
    clipfrac_high: float = Field(0.3, gt=0, le=1)
    """Clip fraction above which updates count as overshooting."""
    patience: int = Field(2, ge=1)
    """Consecutive epochs on the same side of the thresholds before each one-epoch change."""

    @model_validator(mode="after")
    def _check(self) -> AutotunerConfig:
        _check_thresholds(self.min_epochs, self.max_epochs, (self.kl_low, self.kl_high),
                          (self.clipfrac_low, self.clipfrac_high), self.patience)
        return self

    def build(self) -> UpdateEpochsAutotuner | None:
        """The component when enabled, else None."""
        if not self.enabled:
            return None
        return UpdateEpochsAutotuner(self.min_epochs, self.max_epochs, self.kl_low, self.kl_high,
                                     self.clipfrac_low, self.clipfrac_high, self.patience)
