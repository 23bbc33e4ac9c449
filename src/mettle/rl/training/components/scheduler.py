"""Hyperparameter schedules over agent steps, and the component that applies them during training.

A `Schedule` is a pure function of (agent_step, total_steps). `HyperparameterScheduler` evaluates its
schedules at the agent step an epoch starts from and writes the results to the checkpointed
`ctx.state.hyperparameters`, where training reads them; the config is read-only and keeps what was asked:

* learning rate: `hyperparameters.learning_rate` and every optimizer param group (`set_learning_rate`;
  the core loop also writes it there before each update), so an annealed rate of exactly 0 is allowed;
* entropy and clip coefficients: `hyperparameters` (the PPO actor loss reads them on every call);
  schedules are checked up front against the bounds the config accepts.

Why not a torch `LambdaLR`: stepped once per epoch, its lambda sees an epoch counter and must assume
agent_step = epochs x batch_size x world_size, which breaks when a resumed run changes batch size or
rank count; it scales the optimizer's initial lr by a factor (a schedule's absolute values would have
to be divided by it); and its own `last_epoch` becomes one more counter to keep in step with
TrainerState. Setting the values directly from `agent_step` needs no state of its own and resumes
exactly by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mettle.rl.training.component import TrainerComponent
from mettle.rl.training.optimizer import set_learning_rate

if TYPE_CHECKING:
    from mettle.rl.training.context import ComponentContext

__all__ = ["HyperparameterScheduler", "Schedule", "ScheduleComponent", "SchedulesConfig", "check_schedule_bounds"]


class Schedule(BaseModel):
    """A value over training progress: constant, linear or cosine from `start` to `end`."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    kind: Literal["constant", "linear", "cosine"]
    """constant: always `start`; linear: straight line start->end; cosine: half-cosine start->end."""
    start: float = Field(ge=0, allow_inf_nan=False)
    """Value at agent step 0."""
    end: float | None = Field(None, ge=0, allow_inf_nan=False)
    """Value at `total_steps` and after (linear and cosine only; leave unset for constant)."""

    @model_validator(mode="after")
    def _check_end(self) -> Schedule:
        if self.kind == "constant" and self.end is not None:
            raise ValueError("a constant schedule takes no `end`; use kind 'linear' or 'cosine' to change value")
        if self.kind != "constant" and self.end is None:
            raise ValueError(f"a {self.kind} schedule needs an `end` value")
        return self

    def value(self, agent_step: int, total_steps: int) -> float:
        """The scheduled value at `agent_step`, with progress agent_step/total_steps clipped to [0, 1]."""
        if total_steps <= 0:
            raise ValueError(f"total_steps {total_steps} must be > 0")
        if self.kind == "constant" or self.end is None:
            return self.start
        progress = min(max(agent_step / total_steps, 0.0), 1.0)
        if self.kind == "linear":
            raw = self.start + (self.end - self.start) * progress
        else:
            raw = self.end + (self.start - self.end) * (1.0 + math.cos(math.pi * progress)) / 2.0
        # Rounding must never step outside [start, end]: a clip schedule from 1.0 must not give 1.0000000000000002.
        return min(max(raw, min(self.start, self.end)), max(self.start, self.end))

    @property
    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value the schedule takes (it is monotone)."""
        end = self.start if self.end is None else self.end
        return min(self.start, end), max(self.start, end)


# ---------------------------------------------------------------------- targets
def _set_learning_rate(ctx: ComponentContext, value: float) -> None:
    """Into the state and, so that it shows at once, the optimizer's groups (0 is fine, unlike in OptimizerConfig)."""
    ctx.state.hyperparameters.learning_rate = value
    set_learning_rate(ctx.optimizer, value)


def _set_entropy_coef(ctx: ComponentContext, value: float) -> None:
    """The actor loss reads `hyperparameters.entropy_coef` on every call."""
    ctx.state.hyperparameters.entropy_coef = value


def _set_clip_coef(ctx: ComponentContext, value: float) -> None:
    """The actor loss reads `hyperparameters.clip_coef` on every call."""
    ctx.state.hyperparameters.clip_coef = value


_SETTERS: dict[str, Callable[[ComponentContext, float], None]] = {
    "learning_rate": _set_learning_rate,
    "entropy_coef": _set_entropy_coef,
    "clip_coef": _set_clip_coef,
}

# (lowest allowed, lowest inclusive, highest allowed): mirrors the bounds the config and optimizer accept.
_BOUNDS: dict[str, tuple[float, bool, float]] = {
    "learning_rate": (0.0, True, 1.0),
    "entropy_coef": (0.0, True, math.inf),
    "clip_coef": (0.0, False, 1.0),
}


def check_schedule_bounds(name: str, schedule: Schedule) -> None:
    """Fail early, naming the target, when any value of the schedule would be invalid for it."""
    if name not in _BOUNDS:
        raise ValueError(f"unknown schedule target {name!r}; expected one of {sorted(_BOUNDS)}")
    low, inclusive, high = _BOUNDS[name]
    smallest, largest = schedule.bounds
    if smallest < low or (smallest == low and not inclusive) or largest > high:
        interval = f"{'[' if inclusive else '('}{low}, {high}]"
        raise ValueError(f"{name} schedule takes values in [{smallest}, {largest}], outside {interval}")


# ---------------------------------------------------------------------- the component
class HyperparameterScheduler(TrainerComponent):
    """Sets learning rate, entropy and clip coefficients from their schedules before every update.

    Epoch k's update (1-based) uses the values at agent_step = (k - 1) x batch_size x world_size,
    the step its rollout started from; so after k epochs the optimizer and `state.hyperparameters`
    show the values at the current agent_step. Values are applied at registration, after a checkpoint is loaded,
    after every epoch, and again at every rollout end (so nothing that ran in between, such as a
    restore that reloaded the optimizer's groups, can leave a stale value in the update).
    """

    def __init__(
        self,
        learning_rate: Schedule | None = None,
        entropy_coef: Schedule | None = None,
        clip_coef: Schedule | None = None,
    ) -> None:
        super().__init__()
        given = {"learning_rate": learning_rate, "entropy_coef": entropy_coef, "clip_coef": clip_coef}
        self.schedules: dict[str, Schedule] = {name: s for name, s in given.items() if s is not None}
        for name, schedule in self.schedules.items():
            check_schedule_bounds(name, schedule)
        self.current: dict[str, float] = {}
        """The values last applied, by target name (for logging)."""
        self.applied_step: int | None = None
        """The agent step those values were evaluated at."""

    def register(self, context: ComponentContext) -> None:
        """Apply the values for the current step."""
        super().register(context)
        self.apply(context.state.agent_step)

    def on_rollout_end(self) -> None:
        """Re-apply the values for the step this epoch's rollout started from, just before the update."""
        ctx = self.context
        self.apply(ctx.state.agent_step - ctx.rollout_agent_steps)

    def on_epoch_end(self, epoch: int) -> None:
        """Apply the values for the next epoch, so that they are visible (and logged) right away."""
        self.apply(self.context.state.agent_step)

    def apply(self, agent_step: int) -> dict[str, float]:
        """Evaluate every schedule at `agent_step` and write the values to their targets."""
        ctx = self.context
        for name, schedule in self.schedules.items():
            value = schedule.value(agent_step, ctx.config.total_timesteps)
            _SETTERS[name](ctx, value)
            self.current[name] = value
        self.applied_step = agent_step
        return dict(self.current)

    def state_dict(self) -> dict[str, Any]:
        """The last applied step and values, for inspection: they are recomputed from TrainerState on load."""
        return {"agent_step": self.applied_step, "values": dict(self.current)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-apply the values for the restored agent step (TrainerState, loaded first, holds the same ones)."""
        if self._context is not None:
            self.apply(self.context.state.agent_step)


ScheduleComponent = HyperparameterScheduler
"""Alias under the generic name."""


class SchedulesConfig(BaseModel):
    """Schedules over agent steps for the CLI; an unset one leaves its hyperparameter fixed."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    learning_rate: Schedule | None = None
    """Optimizer learning rate, in [0, 1] (0 allowed: it is set on the optimizer, not the config)."""
    entropy_coef: Schedule | None = None
    """PPO entropy bonus weight, >= 0."""
    clip_coef: Schedule | None = None
    """PPO ratio clip range, in (0, 1]."""

    @model_validator(mode="after")
    def _check_bounds(self) -> SchedulesConfig:
        for name in _SETTERS:
            schedule = getattr(self, name)
            if schedule is not None:
                check_schedule_bounds(name, schedule)
        return self

    def build(self) -> HyperparameterScheduler | None:
        """The component for these schedules, or None when none is set."""
        if self.learning_rate is None and self.entropy_coef is None and self.clip_coef is None:
            return None
        return HyperparameterScheduler(self.learning_rate, self.entropy_coef, self.clip_coef)
