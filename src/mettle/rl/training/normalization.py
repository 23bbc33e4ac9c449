"""Observation and reward normalisation on the learner's side (`env.normalize_observations`, `env.normalize_rewards`).

Both update from the learner's own copy of each rollout (its Experience) at fixed points of the epoch, never on
the acting side. So synchronous and overlapped training (where a forked actor collects) update alike, the order
of updates is the schedule's and not the clock's, and a resumed run continues exactly. Every rank adds its
rollout's statistics into one all-reduce, so every rank holds the same statistics and normalises alike.

Observations: the policy owns the statistics (`mettle.agent.normalizer`), so they are saved with its weights,
evaluation and play apply them, and the overlapped actor receives them with the weights it acts with. A rollout
is collected and trained on with one set of statistics; after the update, the rollout's live observations
(`mask`) are folded in, and the next rollout acts with the result.

Rewards: each row keeps a discounted return R_t = gamma * R_{t-1} + r_t over its live steps, restarted after
every step that ends an episode (terminated or truncated), carried from rollout to rollout. When a rollout
arrives its returns join the running variance of R (over every rank), then its stored rewards become
r / sqrt(var + EPSILON), clipped to [-CLIP, CLIP]: what advantages, values and losses see. The episode returns
in infos, and so every reported return, stay the environment's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from mettle.agent.normalizer import (
    CLIP,
    EPSILON,
    Moments,
    batch_moments,
    empty_moments,
    merge_moments,
    moments_from_sums,
    shifted_sums,
)

if TYPE_CHECKING:
    from mettle.agent.normalizer import ObservationNormalizer
    from mettle.rl.training.experience import Experience

SumOverRanks = Callable[[torch.Tensor], torch.Tensor]
"""Element-wise sum of a tensor over every rank (`DistributedHelper.all_reduce_sum`; the identity on one)."""


def merge_over_ranks(batch: Moments, shift: torch.Tensor, sum_over_ranks: SumOverRanks) -> Moments:
    """The statistics of every rank's batch together, the same on every rank (their sums about a shared `shift`)."""
    return moments_from_sums(sum_over_ranks(shifted_sums(batch, shift)), shift)


def live_observations(experience: Experience) -> torch.Tensor:
    """[N, F] float64: the observations of the rollout's live steps (`mask`), in buffer order."""
    observations, mask = experience.buffers["observations"], experience.buffers["mask"]
    return observations[mask].reshape(int(mask.sum()), -1).to(torch.float64)


def update_observation_statistics(normalizer: ObservationNormalizer, experience: Experience,
                                  sum_over_ranks: SumOverRanks) -> None:
    """Fold the rollout's live observations, on every rank, into the policy's running statistics."""
    batch = batch_moments(live_observations(experience))
    normalizer.merge(merge_over_ranks(batch, normalizer.mean, sum_over_ranks))


def discounted_returns(rewards: torch.Tensor, ends: torch.Tensor, live: torch.Tensor, gamma: float,
                       carry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's running discounted return at each step, and where it stands after the last one.

    All [rows, T] but `carry` [rows] (the returns before the first step). At a live step R = gamma * R + r; a step
    that is not live leaves R as it is (its value in the output means nothing); after a step that ends an episode
    R restarts at 0.
    """
    running = carry.to(torch.float64).clone()
    out = torch.zeros(rewards.shape, dtype=torch.float64, device=rewards.device)
    for step in range(rewards.shape[1]):
        stepped = running * gamma + rewards[:, step].to(torch.float64)
        running = torch.where(live[:, step], stepped, running)
        out[:, step] = running
        running = running.masked_fill(ends[:, step], 0.0)
    return out, running


class RewardScaler:
    """Scales each rollout's stored rewards by the running standard deviation of the rows' discounted returns."""

    def __init__(self, gamma: float, num_rows: int, device: torch.device | str = "cpu") -> None:
        self.gamma = gamma
        self.returns = torch.zeros(num_rows, dtype=torch.float64, device=device)
        """Each row's discounted return so far in its current episode."""
        self.moments = empty_moments(1, device)
        """Running statistics of the returns at every live step so far, on every rank."""

    @property
    def std(self) -> float:
        """What rewards are divided by now: sqrt(var + EPSILON)."""
        return float(torch.sqrt(self.moments.var[0] + EPSILON))

    def scale(self, experience: Experience, sum_over_ranks: SumOverRanks) -> None:
        """Add the rollout's returns to the statistics, then scale and clip its stored rewards in place."""
        series = {name: experience.as_row_series(experience.buffers[name])
                  for name in ("rewards", "terminals", "truncations", "mask")}
        live = series["mask"]
        returns, self.returns = discounted_returns(series["rewards"], series["terminals"] | series["truncations"],
                                                   live, self.gamma, self.returns)
        batch = batch_moments(returns[live].unsqueeze(1))
        self.moments = merge_moments(self.moments, merge_over_ranks(batch, self.moments.mean, sum_over_ranks))
        rewards = experience.buffers["rewards"]
        scaled = (rewards.to(torch.float64) / self.std).clamp(-CLIP, CLIP)
        rewards.copy_(scaled)

    def state_dict(self) -> dict[str, Any]:
        """The per-row returns and the running statistics, for exact resume."""
        moments = self.moments
        return {"returns": self.returns.cpu().clone(), "count": moments.count.cpu().clone(),
                "mean": moments.mean.cpu().clone(), "m2": moments.m2.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`'s output; a state for another number of rows is refused, naming both."""
        returns = state["returns"]
        if tuple(returns.shape) != tuple(self.returns.shape):
            raise ValueError(f"reward normalisation state holds {tuple(returns.shape)} row returns, this run has "
                             f"{tuple(self.returns.shape)}")
        device = self.returns.device
        self.returns = returns.to(device, torch.float64).clone()
        self.moments = Moments(*(state[key].to(device, torch.float64).reshape(shape).clone()
                                 for key, shape in (("count", ()), ("mean", (1,)), ("m2", (1,)))))
