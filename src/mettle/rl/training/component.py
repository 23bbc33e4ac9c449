"""TrainerComponent: the extension point; TrainerCallback: the moments it is called at."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mettle.rl.training.context import ComponentContext


class TrainerCallback(Enum):
    """Points in the training loop where components are called, valued by their hook name."""

    STEP = "on_step"
    ROLLOUT_END = "on_rollout_end"
    EPOCH_END = "on_epoch_end"
    TRAINING_COMPLETE = "on_training_complete"
    FAILURE = "on_failure"


def crossed_interval(previous: int, current: int, interval: int) -> bool:
    """True when a multiple of `interval` lies in (previous, current], so skipped boundaries still fire."""
    if interval <= 0:
        return False
    return current // interval > previous // interval


class TrainerComponent:
    """Base class of everything plugged into the trainer; every hook is a no-op by default.

    `epoch_interval` gates `on_epoch_end`; `master_only` components exist on rank 0 only.
    Components with state override `state_dict`/`load_state_dict` and are checkpointed under
    `state_key`.
    """

    epoch_interval: int = 1
    master_only: bool = False

    def __init__(self, epoch_interval: int | None = None) -> None:
        if epoch_interval is not None:
            if epoch_interval < 1:
                raise ValueError(f"epoch_interval {epoch_interval} must be >= 1")
            self.epoch_interval = epoch_interval
        self._context: ComponentContext | None = None

    @property
    def context(self) -> ComponentContext:
        """The trainer's shared context (available once registered)."""
        if self._context is None:
            raise RuntimeError(f"{type(self).__name__} is not registered with a trainer yet")
        return self._context

    @property
    def state_key(self) -> str:
        """Name under which this component's state is checkpointed."""
        return type(self).__name__

    def register(self, context: ComponentContext) -> None:
        """Receive the shared context when attached to a trainer."""
        self._context = context

    def on_step(self, infos: list[dict[str, Any]]) -> None:
        """After each rollout, with the infos of the episodes that finished in it."""

    def on_rollout_end(self) -> None:
        """After the rollout phase, before the update."""

    def on_epoch_end(self, epoch: int) -> None:
        """After the update, when `epoch` crosses a multiple of `epoch_interval`."""

    def on_training_complete(self) -> None:
        """Once, after the last epoch."""

    def on_failure(self, error: BaseException) -> None:
        """Once, when training stops with an exception (which is re-raised afterwards)."""

    def state_dict(self) -> dict[str, Any]:
        """Plain-container state to checkpoint (empty for stateless components)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
