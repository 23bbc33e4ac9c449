"""What the short learning benches share: a component that stops training at a target return or a deadline."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np

from mettle.config import RunConfig, build_run_config
from mettle.recipes import recipe_for
from mettle.rl.training import TrainerComponent

WINDOW = 20
"""Episodes in the moving mean that is compared with the target."""


class Deadline(TrainerComponent):
    """Records the moving mean return each epoch; stops training at the target or when the budget is spent."""

    def __init__(self, target: float, budget_s: float) -> None:
        super().__init__(epoch_interval=1)
        self.target, self.budget_s = target, budget_s
        self.returns: deque[float] = deque(maxlen=WINDOW)
        self.start = time.monotonic()
        self.curve: list[dict[str, float]] = []
        self.reached: dict[str, float] | None = None

    def on_step(self, infos: list[dict[str, Any]]) -> None:
        """Keep the returns of the agent-episodes that ended."""
        self.returns.extend(float(info["episode_return"]) for info in infos)

    def on_epoch_end(self, epoch: int) -> None:
        """Log the point on the curve; stop at the target (once a full window is seen) or at the deadline."""
        seconds = time.monotonic() - self.start
        mean = float(np.mean(self.returns)) if self.returns else float("nan")
        point = {"seconds": seconds, "agent_steps": float(self.context.state.agent_step), "mean_return": mean}
        self.curve.append(point)
        print(f"{seconds:7.1f} s  {point['agent_steps']:>10,.0f} steps  mean return {mean:9.2f}", flush=True)
        if len(self.returns) == WINDOW and mean >= self.target:
            self.reached = point
            self.context.stop_requested = True
        elif seconds >= self.budget_s:
            self.context.stop_requested = True

    def outcome(self, digits: int) -> tuple[dict[str, float], str]:
        """The last point of the curve, and whether (and when) the target was reached, for the closing line."""
        last = self.curve[-1] if self.curve else {"seconds": 0.0, "agent_steps": 0.0, "mean_return": float("nan")}
        if self.reached:
            return last, f"reached at {self.reached['seconds']:.0f} s, {self.reached['agent_steps']:,.0f} steps"
        return last, f"not reached; last mean {last['mean_return']:.{digits}f}"


def run_config(env: str, overrides: list[str], seed: int) -> RunConfig:
    """What `mettle train --env ENV` resolves: the recipe, then the overrides."""
    return build_run_config([f"env.name={env}", *overrides, f"seed={seed}"], defaults=recipe_for(env, None))
