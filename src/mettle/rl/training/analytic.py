"""PPO's gradient for the MLP policy written out by hand: the step autograd takes, for about half the cost.

At small sizes (CartPole's 64x64 torsos, 256-row minibatches) a gradient step is bound by per-op overhead,
not arithmetic: autograd records and replays some sixty small ops, `clip_grad_norm_` and the loss add more.
Here the forward keeps only what the backward needs and the backward is the chain rule in a dozen matmuls,
written straight into the parameters' `.grad`. It covers categorical heads (Discrete, MultiDiscrete) and the
diagonal Gaussian of Box actions (means from the actor head, one state-independent log-std per dimension).
`bench/update_floor.py` and `bench/gradient_paths.py` measure it against plain PyTorch and autograd steps;
`tests/rl/test_analytic_gradient.py` checks every gradient and diagnostic against autograd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from mettle.agent.distributions import DiagonalGaussian, MultiCategorical
from mettle.agent.layers import Dense, dense, flatten_steps, torso_forward, torso_layers
from mettle.agent.mlp import MLPPolicy
from mettle.rl.loss.ppo_actor import PPOActorLoss
from mettle.rl.loss.ppo_critic import PPOCriticLoss

if TYPE_CHECKING:
    from mettle.rl.loss.base import Loss
    from mettle.rl.minibatch import Minibatch


DIAGNOSTICS = ("ppo_actor/policy_loss", "ppo_actor/entropy", "ppo_actor/approx_kl", "ppo_actor/clipfrac",
               "ppo_critic/value_loss")
"""What PPOActorLoss and PPOCriticLoss report, in the order the analytic step computes them."""


def analytic_problem(policy: nn.Module, losses: Sequence[Loss]) -> str | None:
    """Why the hand-written gradient cannot stand in for autograd here, or None when it can."""
    if type(policy) is not MLPPolicy:
        return f"it is written for MLPPolicy, and the policy is {type(policy).__name__}"
    if policy.invalid_actions is not None:
        return "it is written for unmasked heads, and this environment masks the choices some agent types lack"
    if sorted(type(loss).__name__ for loss in losses) != ["PPOActorLoss", "PPOCriticLoss"] or not all(
        type(loss) in (PPOActorLoss, PPOCriticLoss) for loss in losses
    ):
        names = [loss.name for loss in losses]
        return f"it is written for the PPO actor and critic losses together, and the losses are {names}"
    if not all(p.requires_grad for p in policy.parameters()):
        return "some policy parameters are frozen (requires_grad=False)"
    if any(m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m) for m in policy.modules()):
        return "the policy has forward hooks or parametrizations, which a hand-written forward would skip"
    try:
        torsos = [policy.actor_torso] if policy.critic_torso is None else [policy.actor_torso, policy.critic_torso]
        layers = [layer for torso in torsos for layer in torso_layers(torso)[0]]
    except ValueError as error:
        return str(error)
    read = {id(t) for layer in layers for t in layer} | {id(t) for head in (policy.actor_head, policy.critic_head)
                                                         for t in (head.weight, head.bias)}
    if policy.log_std is not None:
        read.add(id(policy.log_std))
    if read != {id(p) for p in policy.parameters()}:
        return "the policy has parameters beyond its torsos' and heads' Linear layers"
    return None


def analytic_refusal(choice: str, policy: nn.Module, losses: Sequence[Loss]) -> str | None:
    """The one line that refuses `gradient=analytic` where it cannot apply; None when it applies or is not asked for."""
    problem = analytic_problem(policy, losses) if choice == "analytic" else None
    if problem is None:
        return None
    return f"gradient=analytic cannot be used: {problem}; set gradient=auto or gradient=autograd"


class AnalyticPPOGradient:
    """Forward, PPO actor and critic losses, and backward for an MLPPolicy, without autograd."""

    def __init__(self, policy: MLPPolicy, losses: Sequence[Loss]) -> None:
        problem = analytic_problem(policy, losses)
        if problem is not None:
            raise ValueError(f"the analytic PPO gradient does not apply: {problem}")
        self.policy = policy
        self.actor_loss = next(loss for loss in losses if isinstance(loss, PPOActorLoss))
        self.critic_loss = next(loss for loss in losses if isinstance(loss, PPOCriticLoss))
        # (weight, bias) pairs, looked up once: nn.Module attribute access costs more than some of the maths
        self.actor_layers, self.activation = torso_layers(policy.actor_torso)
        self.critic_layers = None if policy.critic_torso is None else torso_layers(policy.critic_torso)[0]
        self.actor_head = (policy.actor_head.weight, policy.actor_head.bias)
        self.critic_head = (policy.critic_head.weight, policy.critic_head.bias)

    @torch.no_grad()
    def __call__(self, minibatch: Minibatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Set each parameter's `.grad` to the gradient of the summed losses; return (diagnostics, log-probs [n, T])."""
        policy, data = self.policy, minibatch.data
        n, t = data["observations"].shape[:2]
        x = policy.normalize_observations(flatten_steps(data["observations"], policy.obs_shape))
        actor_acts = torso_forward(self.actor_layers, self.activation, x)
        critic_acts = (actor_acts if self.critic_layers is None
                       else torso_forward(self.critic_layers, self.activation, x))
        head_out = dense(self.actor_head, actor_acts[-1])
        values = dense(self.critic_head, critic_acts[-1]).view(n * t)
        weights = minibatch.loss_weights.reshape(n * t)
        actions = data["actions"].reshape(n * t, -1)
        if policy.log_std is None:
            grad_head, log_prob, actor_rows = self._categorical(head_out, actions, minibatch, weights)
        else:
            grad_head, log_prob, actor_rows = self._gaussian(head_out, policy.log_std, actions, minibatch, weights)
        grad_values, value_rows = self._critic(values, minibatch, weights)
        self._backward(actor_acts, critic_acts, grad_head, grad_values.unsqueeze(1))
        # Every diagnostic is a weighted mean over steps: one matmul for all five.
        means = torch.stack([*actor_rows, value_rows]) @ weights
        return dict(zip(DIAGNOSTICS, means.unbind(), strict=True)), log_prob.view(n, t)

    def _surrogate(
        self, log_prob: torch.Tensor, minibatch: Minibatch, weights: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """d(clipped policy loss)/d log-prob [N], weighted, and the per-step (policy loss, approx-KL, clipfrac)."""
        clip = self.actor_loss.clip_coef
        log_ratio = log_prob - minibatch.data["log_probs"].reshape(-1)
        ratio = log_ratio.exp()
        neg_advantages = minibatch.advantages.reshape(-1).neg()
        unclipped, clipped = ratio * neg_advantages, ratio.clamp(1.0 - clip, 1.0 + clip).mul_(neg_advantages)
        # The pessimistic term's slope in log_prob: -A * ratio where the unclipped term is the larger, else 0 (a tie
        # outside the clip range needs A = 0, so its slope is 0 either way). NaN fails `<` and so still propagates.
        grad_log_prob = torch.where(unclipped < clipped, 0.0, unclipped).mul_(weights)
        ratio_change = ratio - 1.0
        clipped_steps = (ratio_change.abs() > clip).to(weights.dtype)
        return grad_log_prob, [torch.maximum(unclipped, clipped), ratio_change - log_ratio, clipped_steps]

    def _categorical(
        self, logits: torch.Tensor, actions: torch.Tensor, minibatch: Minibatch, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """d(policy loss - entropy_coef * entropy)/d logits [N, sum(nvec)], log-probs [N], per-step diagnostics."""
        entropy_coef = self.actor_loss.entropy_coef
        dist = MultiCategorical(logits, self.policy.nvec)
        log_prob = dist.log_prob(actions)
        grad_log_prob, (policy_loss, approx_kl, clipfrac) = self._surrogate(log_prob, minibatch, weights)
        grad_log_prob = grad_log_prob.view(-1, 1, 1)
        # d log p(a)/dz = onehot(a) - p, per head.
        grad = dist.probs * grad_log_prob.neg()
        grad.scatter_add_(-1, actions.unsqueeze(-1), grad_log_prob.expand(-1, dist.num_heads, 1))
        log_probs = dist.log_probs
        if len(set(dist.nvec)) > 1:  # padding holds -inf, and 0 * -inf would be NaN
            log_probs = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)
        p_log_p = dist.probs * log_probs
        neg_head_entropy = p_log_p.sum(-1, keepdim=True)
        if entropy_coef:  # d entropy/dz = -p (log p + H), per head
            grad.addcmul_(p_log_p - dist.probs * neg_head_entropy, weights.view(-1, 1, 1), value=entropy_coef)
        entropy = neg_head_entropy.sum((-2, -1)).neg_()
        return _flat_logits(grad, dist.nvec), log_prob, [policy_loss, entropy, approx_kl, clipfrac]

    def _gaussian(
        self, means: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor, minibatch: Minibatch,
        weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """d(policy loss - entropy_coef * entropy)/d means [N, dims], log-probs [N], per-step diagnostics; the
        log-std's gradient (summed over steps) is written to its `.grad` here."""
        dist = DiagonalGaussian(means, log_std)
        z = dist.standardize(actions)
        log_prob = dist.log_prob_of_standardized(z)
        grad_log_prob, (policy_loss, approx_kl, clipfrac) = self._surrogate(log_prob, minibatch, weights)
        inv_std = log_std.neg().exp()
        # d log p/d mean = z / std; d log p/d log_std = z^2 - 1; d entropy/d log_std = 1 in every state.
        grad_log_std = torch.mm(grad_log_prob.unsqueeze(0), z.square().sub_(1.0)).squeeze(0)
        _grad(log_std).copy_(grad_log_std.sub_(self.actor_loss.entropy_coef * weights.sum()))
        grad_means = z.mul_(inv_std).mul_(grad_log_prob.unsqueeze(1))
        return grad_means, log_prob, [policy_loss, dist.entropy(), approx_kl, clipfrac]

    def _critic(
        self, values: torch.Tensor, minibatch: Minibatch, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """d(value_coef * value loss)/d values [N], and the per-step value loss."""
        cfg = self.critic_loss.cfg
        error = values - minibatch.returns.reshape(-1)
        squared = error.square()
        if cfg.clip_value_loss:
            old = minibatch.data["values"].reshape(-1)
            returns = minibatch.returns.reshape(-1)
            clipped = (old + (values - old).clamp_(-cfg.value_clip_coef, cfg.value_clip_coef) - returns).square_()
            # Where the clipped error is the larger, the value sits outside the clip range: no gradient. (Autograd
            # halves the gradient on an exact tie outside the range, returns midway between the two values; this
            # keeps it whole. NaN fails `<` and so still propagates.)
            error = torch.where(squared < clipped, 0.0, error)
            squared = torch.maximum(squared, clipped)
        return error.mul_(weights).mul_(cfg.value_coef), squared.mul_(0.5)

    def _backward(
        self, actor_acts: list[torch.Tensor], critic_acts: list[torch.Tensor],
        grad_logits: torch.Tensor, grad_values: torch.Tensor,
    ) -> None:
        """Chain rule from (logits, values) through the heads and torsos into each parameter's `.grad`."""
        grad_actor = _head_backward(self.actor_head, actor_acts[-1], grad_logits)
        grad_critic = _head_backward(self.critic_head, critic_acts[-1], grad_values)
        if self.critic_layers is None:
            _torso_backward(self.actor_layers, self.activation, actor_acts, grad_actor.add_(grad_critic))
            return
        _torso_backward(self.actor_layers, self.activation, actor_acts, grad_actor)
        _torso_backward(self.critic_layers, self.activation, critic_acts, grad_critic)


"""A Linear layer's (weight [out, in], bias [out])."""


def _head_backward(head: Dense, features: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Write the head's weight and bias gradients; return the gradient at its input."""
    weight, bias = head
    torch.mm(grad_out.t(), features, out=_grad(weight))
    torch.sum(grad_out, 0, out=_grad(bias))
    return grad_out @ weight


def _torso_backward(layers: list[Dense], activation: str, acts: list[torch.Tensor], grad_out: torch.Tensor) -> None:
    """Write every layer's weight and bias gradients, from the gradient at the torso's output."""
    grad = grad_out
    for i in reversed(range(len(layers))):
        weight, bias = layers[i]
        if activation == "tanh":  # d tanh = 1 - tanh^2, from the output
            grad = torch.ops.aten.tanh_backward(grad, acts[i + 1])
        else:  # d relu = [output > 0]
            grad = torch.ops.aten.threshold_backward(grad, acts[i + 1], 0.0)
        torch.mm(grad.t(), acts[i], out=_grad(weight))
        torch.sum(grad, 0, out=_grad(bias))
        if i:
            grad = grad @ weight


def _grad(param: torch.Tensor) -> torch.Tensor:
    """The parameter's `.grad`, allocated where there is none yet (it is then overwritten, never added to)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def _flat_logits(per_head: torch.Tensor, nvec: tuple[int, ...]) -> torch.Tensor:
    """[N, heads, max(nvec)] back to the flat [N, sum(nvec)] logits layout, dropping the padding."""
    if len(set(nvec)) == 1:
        return per_head.reshape(per_head.shape[0], -1)
    return torch.cat([per_head[:, h, :size] for h, size in enumerate(nvec)], dim=1)
