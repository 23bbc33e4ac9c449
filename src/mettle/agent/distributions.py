"""Action distributions: independent categorical heads (Discrete, MultiDiscrete) or a diagonal Gaussian (Box)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


class MultiCategorical:
    """Independent categorical heads read from one flat logits vector, so a policy needs one actor layer."""

    def __init__(self, logits: torch.Tensor, nvec: Sequence[int]) -> None:
        self.nvec, width, self._uneven = _head_layout(tuple(nvec))
        if logits.shape[-1] != width:
            raise ValueError(f"logits end in {logits.shape[-1]} entries; nvec {self.nvec} needs {width}")
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
        """Draw one action per head, [..., heads] int64, exactly from the heads' probabilities.

        An exponential race (torch.multinomial's own method, in three tensor ops): with E_i ~ Exp(1) drawn
        independently, E_i / p_i ~ Exp(p_i) and the first of them to ring, argmax p_i / E_i, is action i with
        probability p_i. Padding has p = 0 and never wins.
        """
        race = torch.empty_like(self.probs).exponential_(generator=generator)
        drawn = (self.probs / race).argmax(dim=-1)
        if self._uneven:  # only a 0 / 0 (an exponential draw of exactly 0, about 2^-53) could pick padding
            return torch.minimum(drawn, _last_actions(self.nvec, drawn.device))
        return drawn

    def mode(self) -> torch.Tensor:
        """Most likely action per head, [..., heads] int64 (deterministic evaluation)."""
        return self.log_probs.argmax(dim=-1)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """Joint log-probability of `actions` [..., heads]: heads are independent, so log-probs add."""
        if actions.shape[-1] != self.num_heads:
            raise ValueError(f"actions end in {actions.shape[-1]} entries, expected {self.num_heads} heads")
        picked = self.log_probs.gather(-1, actions.long().unsqueeze(-1))
        if self.num_heads == 1:
            return picked.view(self.batch_shape)
        return picked.squeeze(-1).sum(dim=-1)

    def entropy(self) -> torch.Tensor:
        """Joint entropy [...]: the sum of the heads' entropies, as the heads are independent."""
        log_probs = self.log_probs
        if self._uneven:  # padding holds -inf, and 0 * -inf would be NaN; equal heads have none
            log_probs = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)
        p_log_p = self.probs * log_probs
        if self.num_heads == 1:  # one reduction over one dimension: several times cheaper on small batches
            return p_log_p.sum(dim=-1).neg_().view(self.batch_shape)
        return -p_log_p.sum(dim=(-2, -1))


_LAYOUTS: dict[tuple[int, ...], tuple[tuple[int, ...], int, bool]] = {}


def _head_layout(nvec: tuple[int, ...]) -> tuple[tuple[int, ...], int, bool]:
    """(head sizes as ints, their sum, whether they differ), checked once per action space, not on every call.

    A plain dict, not functools.cache, which torch.compile warns that it bypasses."""
    layout = _LAYOUTS.get(nvec)
    if layout is None:
        sizes = tuple(int(n) for n in nvec)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"nvec must hold at least one positive head size, got {sizes}")
        layout = _LAYOUTS[nvec] = (sizes, sum(sizes), len(set(sizes)) > 1)
    return layout


_LAST_ACTIONS: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _last_actions(nvec: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Each head's largest action, [heads]; built once per action space and device, not on every draw."""
    last = _LAST_ACTIONS.get((nvec, device))
    if last is None:
        last = _LAST_ACTIONS[nvec, device] = torch.tensor([n - 1 for n in nvec], device=device)
    return last


def _per_head(logits: torch.Tensor, nvec: tuple[int, ...]) -> torch.Tensor:
    """Lay logits out as [..., heads, max(nvec)], padding short heads with -inf so they never get mass."""
    if len(nvec) == 1:
        return logits.unsqueeze(-2)
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


def sample(
    logits: torch.Tensor, nvec: Sequence[int], generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]]:
    """Draw actions [..., heads] from flat logits [..., sum(nvec)]; return (actions, log_prob, entropy function).

    The acting path: the same draw as `MultiCategorical(logits, nvec).sample(generator)` (the same exponential
    race over the same entries, in the same order) in fewer tensor operations, each on a two-dimensional table
    with one row per (row, head): heads of equal size need no padding. Heads of different sizes go through
    MultiCategorical. The entropy is left as a function, as a rollout never reads it.
    """
    sizes, _, uneven = _head_layout(tuple(nvec))
    if uneven:
        dist = MultiCategorical(logits, sizes)
        actions = dist.sample(generator)
        return actions, dist.log_prob(actions), dist.entropy
    batch, heads = logits.shape[:-1], len(sizes)
    log_probs = logits.reshape(-1, sizes[0]).log_softmax(-1)
    probs = log_probs.exp()
    drawn = (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1, keepdim=True)
    picked = log_probs.gather(-1, drawn)

    def entropy() -> torch.Tensor:
        per_head = (probs * log_probs).sum(-1).neg_()
        return per_head.view(batch) if heads == 1 else per_head.view(*batch, heads).sum(-1)

    log_prob = picked.view(batch) if heads == 1 else picked.view(*batch, heads).sum(-1)
    return drawn.view(*batch, heads), log_prob, entropy


def act(
    logits: torch.Tensor, nvec: Sequence[int], actions: torch.Tensor | None, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | Callable[[], torch.Tensor]]:
    """Sample (or take the mode, or score given) actions; return (actions, log_prob, entropy).

    When acting (no `actions` given) the entropy is returned as the function that computes it, for
    `PolicyOutput` to run on first read: a rollout never reads it.
    """
    if actions is None and not deterministic:
        return sample(logits, nvec)
    dist = MultiCategorical(logits, nvec)
    if actions is None:
        actions = dist.mode()
        return actions, dist.log_prob(actions), dist.entropy
    return actions.long(), dist.log_prob(actions), dist.entropy()


HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


class DiagonalGaussian:
    """Independent normals, one per Box dimension, with a log-std shared by every state (a parameter, not an output).

    The policy's actor layer gives the means; the log-std [dims] starts at 0 (std 1), as CleanRL and SB3 start.
    Samples are unbounded: the environment clips what it is sent, and log-probabilities stay those of the
    unclipped sample, which is what the experience stores and PPO's ratio compares.
    """

    def __init__(self, mean: torch.Tensor, log_std: torch.Tensor) -> None:
        if log_std.shape != mean.shape[-1:]:
            raise ValueError(f"log_std shaped {tuple(log_std.shape)}, expected [{mean.shape[-1]}] (one per dimension)")
        self.mean, self.log_std = mean, log_std
        self.batch_shape = mean.shape[:-1]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw [..., dims] float: mean + std * N(0, 1), the noise from `generator` (else torch's global one).

        Without gradient, as a categorical draw: PPO differentiates the log-probability of a fixed action."""
        with torch.no_grad():
            noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
            return self.mean + self.log_std.exp() * noise

    def mode(self) -> torch.Tensor:
        """The mean [..., dims]: the most likely action (deterministic evaluation)."""
        return self.mean

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """Joint log-density of `actions` [..., dims]: dimensions are independent, so their log-densities add."""
        return self.log_prob_of_standardized(self.standardize(actions))

    def standardize(self, actions: torch.Tensor) -> torch.Tensor:
        """(actions - mean) / std [..., dims]: what the log-density and its gradients are written in."""
        if actions.shape[-1] != self.mean.shape[-1]:
            raise ValueError(f"actions end in {actions.shape[-1]} entries, expected {self.mean.shape[-1]} dimensions")
        return (actions - self.mean) * (-self.log_std).exp()

    def log_prob_of_standardized(self, z: torch.Tensor) -> torch.Tensor:
        """Joint log-density [...] of the actions whose standardized values are `z`."""
        return (-0.5 * z.square() - self.log_std - HALF_LOG_TWO_PI).sum(-1)

    def entropy(self) -> torch.Tensor:
        """Joint entropy [...]: sum over dimensions of 1/2 log(2 pi e) + log_std, the same for every state."""
        per_state = (self.log_std + (0.5 + HALF_LOG_TWO_PI)).sum()
        return per_state.expand(self.batch_shape)


def act_gaussian(
    mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor | None, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or take the mean, or score given) Box actions; return (actions, log_prob, entropy)."""
    dist = DiagonalGaussian(mean, log_std)
    if actions is None:
        actions = dist.mode() if deterministic else dist.sample()
    return actions, dist.log_prob(actions), dist.entropy()


def act_with_head(
    logits: torch.Tensor, nvec: Sequence[int], log_std: torch.Tensor | None, actions: torch.Tensor | None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | Callable[[], torch.Tensor]]:
    """`act` for categorical heads, or `act_gaussian` where the policy holds a log-std (its actions are a Box)."""
    if log_std is None:
        return act(logits, nvec, actions, deterministic)
    return act_gaussian(logits, log_std, actions, deterministic)
