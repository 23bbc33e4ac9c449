"""Action distributions over one or more independent categorical heads."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F


class MultiCategorical:
    """Independent categorical heads read from one flat logits vector, so a policy needs one actor layer."""

    def __init__(self, logits: torch.Tensor, nvec: Sequence[int]) -> None:
        self.nvec = tuple(int(n) for n in nvec)
        if not self.nvec or min(self.nvec) < 1:
            raise ValueError(f"nvec must hold at least one positive head size, got {self.nvec}")
        if logits.shape[-1] != sum(self.nvec):
            raise ValueError(
                f"logits end in {logits.shape[-1]} entries; nvec {self.nvec} needs {sum(self.nvec)}"
            )
        self.batch_shape = logits.shape[:-1]
        # Normalised log-probabilities [..., heads, max(nvec)]; padding entries are -inf.
        self.log_probs = F.log_softmax(_per_head(logits, self.nvec), dim=-1)
        # Probabilities, zero on padding: computed once, as sampling, entropy and both callers of act() need them.
        self.probs = self.log_probs.exp()

    @property
    def num_heads(self) -> int:
        """Action heads; actions end in this many entries."""
        return len(self.nvec)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one action per head, [..., heads] int64: the first action whose cumulative probability exceeds
        a uniform draw (a few tensor ops, several times cheaper than torch.multinomial on small batches)."""
        probs = self.probs
        uniform = torch.empty_like(probs[..., :1]).uniform_(generator=generator)  # traceable with dynamic shapes
        drawn = (probs.cumsum(dim=-1) <= uniform).sum(dim=-1)
        # Rounding can leave a head's total a hair under the draw: keep the index inside that head.
        if len(set(self.nvec)) == 1:
            return drawn.clamp_(max=self.nvec[0] - 1)
        return torch.minimum(drawn, _last_actions(self.nvec, drawn.device))

    def mode(self) -> torch.Tensor:
        """Most likely action per head, [..., heads] int64 (deterministic evaluation)."""
        return self.log_probs.argmax(dim=-1)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """Joint log-probability of `actions` [..., heads]: heads are independent, so log-probs add."""
        if actions.shape[-1] != self.num_heads:
            raise ValueError(f"actions end in {actions.shape[-1]} entries, expected {self.num_heads} heads")
        picked = self.log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        return picked.sum(dim=-1)

    def entropy(self) -> torch.Tensor:
        """Joint entropy [...]: the sum of the heads' entropies, as the heads are independent."""
        log_probs = self.log_probs
        if len(set(self.nvec)) > 1:  # padding holds -inf, and 0 * -inf would be NaN; equal heads have none
            log_probs = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)
        return -(self.probs * log_probs).sum(dim=(-2, -1))


@functools.cache
def _last_actions(nvec: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Each head's largest action, [heads]; built once per action space, not on every draw."""
    return torch.tensor([n - 1 for n in nvec], device=device)


def _per_head(logits: torch.Tensor, nvec: tuple[int, ...]) -> torch.Tensor:
    """Lay logits out as [..., heads, max(nvec)], padding short heads with -inf so they never get mass."""
    width = max(nvec)
    if all(n == width for n in nvec):
        return logits.reshape(*logits.shape[:-1], len(nvec), width)
    chunks = torch.split(logits, list(nvec), dim=-1)
    padded = [F.pad(chunk, (0, width - chunk.shape[-1]), value=float("-inf")) for chunk in chunks]
    return torch.stack(padded, dim=-2)


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, nvec: Sequence[int]) -> torch.Tensor:
    """KL(teacher || student) of two multi-categorical distributions given as flat logits [..., sum(nvec)]: the sum
    over heads, which are independent. Heads are normalised one by one, so no padding enters the sum."""
    sizes = [int(n) for n in nvec]
    total = torch.zeros(teacher_logits.shape[:-1], dtype=student_logits.dtype, device=student_logits.device)
    heads = zip(torch.split(teacher_logits, sizes, dim=-1), torch.split(student_logits, sizes, dim=-1), strict=True)
    for teacher, student in heads:
        teacher_log_probs = F.log_softmax(teacher, dim=-1)
        total = total + (teacher_log_probs.exp() * (teacher_log_probs - F.log_softmax(student, dim=-1))).sum(-1)
    return total


def act(
    logits: torch.Tensor, nvec: Sequence[int], actions: torch.Tensor | None, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or take the mode, or score given) actions; return (actions, log_prob, entropy)."""
    dist = MultiCategorical(logits, nvec)
    if actions is None:
        actions = dist.mode() if deterministic else dist.sample()
    return actions.long(), dist.log_prob(actions), dist.entropy()
