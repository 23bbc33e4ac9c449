"""The hand-written PPO gradient (gradient=analytic) against autograd: every parameter's gradient, every
diagnostic and the log-probs, over the shapes of MLPPolicy and both branches of each clipped term; then whole
training on CartPole with either path, and which path a trainer picks."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from mettle.agent.lstm import LSTMPolicy
from mettle.agent.mlp import MLPPolicy
from mettle.agent.normalizer import batch_moments
from mettle.contracts import PolicyEnvInfo
from mettle.envs.gymnasium import GymnasiumEnvironment
from mettle.envs.testing import BanditEnvironment
from mettle.rl.loss import PPOActorLoss, PPOCriticLoss
from mettle.rl.loss.base import Loss
from mettle.rl.minibatch import Minibatch
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import PPOConfig, TrainerConfig
from mettle.rl.training.analytic import AnalyticPPOGradient, analytic_problem

SEGMENTS, HORIZON, OBS = 6, 5, 7


def make_policy(nvec: tuple[int, ...], num_layers: int, shared_torso: bool, activation: str = "tanh") -> MLPPolicy:
    """A seeded MLPPolicy over a 7-feature Box and a MultiDiscrete(nvec) (Discrete for one head)."""
    torch.manual_seed(0)
    action = gym.spaces.Discrete(nvec[0]) if len(nvec) == 1 else gym.spaces.MultiDiscrete(list(nvec))
    policy = MLPPolicy(hidden_size=16, num_layers=num_layers, shared_torso=shared_torso, activation=activation)
    policy.initialize_to_environment(PolicyEnvInfo(gym.spaces.Box(-1.0, 1.0, (OBS,), np.float32), action), "cpu")
    with torch.no_grad():  # heads as large as the torsos, so logits move and every term has a gradient to compare
        policy.actor_head.weight.normal_(0.0, 0.5)
    return policy


def make_gaussian_policy(
    dims: int, num_layers: int, shared_torso: bool, log_std_init: float, activation: str = "tanh"
) -> MLPPolicy:
    """A seeded MLPPolicy over a 7-feature Box with Box(dims) actions: a diagonal Gaussian head."""
    torch.manual_seed(0)
    policy = MLPPolicy(hidden_size=16, num_layers=num_layers, shared_torso=shared_torso, log_std_init=log_std_init,
                       activation=activation)
    action = gym.spaces.Box(-1.0, 1.0, (dims,), np.float32)
    policy.initialize_to_environment(PolicyEnvInfo(gym.spaces.Box(-1.0, 1.0, (OBS,), np.float32), action), "cpu")
    with torch.no_grad():  # per-dimension stds that differ, so a mixed-up dimension would show
        policy.actor_head.weight.normal_(0.0, 0.5)
        policy.log_std.add_(torch.linspace(-0.3, 0.3, dims))
    return policy


def make_minibatch(policy: MLPPolicy, weighted: bool) -> Minibatch:
    """Stored log-probs and values that put ratios and values on both sides of their clip ranges."""
    gen = torch.Generator().manual_seed(1)
    obs = torch.randn(SEGMENTS, HORIZON, OBS, generator=gen)
    if policy.log_std is not None:  # Box actions: anywhere around the means, some well outside the bounds
        actions = 1.5 * torch.randn(SEGMENTS, HORIZON, policy.action_dims, generator=gen)
    else:
        actions = torch.stack([torch.randint(0, n, (SEGMENTS, HORIZON), generator=gen) for n in policy.nvec], -1)
    with torch.no_grad():
        out = policy(obs, torch.zeros(SEGMENTS, HORIZON, dtype=torch.bool), actions=actions)
    mask = torch.rand(SEGMENTS, HORIZON, generator=gen) > 0.2
    data = {
        "observations": obs, "actions": actions, "mask": mask,
        "starts": torch.zeros(SEGMENTS, HORIZON, dtype=torch.bool),
        "log_probs": out.log_prob + 0.4 * torch.randn(SEGMENTS, HORIZON, generator=gen),
        "values": out.values + 0.4 * torch.randn(SEGMENTS, HORIZON, generator=gen),
    }
    weights = torch.rand(SEGMENTS, 1, generator=gen) + 0.5 if weighted else torch.ones(SEGMENTS, 1)
    advantages, returns = (torch.randn(SEGMENTS, HORIZON, generator=gen) for _ in range(2))
    return Minibatch(torch.arange(SEGMENTS), data, advantages, returns, weights)


def autograd_reference(
    policy: MLPPolicy, losses: list[Loss], minibatch: Minibatch
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """(gradients, diagnostics, log-probs) as the autograd path takes them: forward, sum of losses, backward."""
    policy.zero_grad(set_to_none=True)
    data = minibatch.data
    output = policy(data["observations"], data["starts"], actions=data["actions"])
    metrics, total = {}, torch.zeros(())
    for loss in losses:
        value, named = loss(minibatch, output)
        metrics.update({f"{loss.name}/{k}": v for k, v in named.items()})
        total = total + value
    total.backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    return grads, metrics, output.log_prob.detach()


CASES = [
    pytest.param((2,), 2, False, True, 0.01, False, id="cartpole-shape"),
    pytest.param((3, 5, 2), 2, False, True, 0.05, True, id="unequal-heads-weighted"),
    pytest.param((4, 4), 3, True, False, 0.0, False, id="shared-torso-no-value-clip"),
    pytest.param((3,), 0, False, True, 0.02, True, id="no-hidden-layers"),
    pytest.param((6, 3), 1, True, True, 0.1, False, id="shared-one-layer"),
]


@pytest.mark.parametrize(("nvec", "num_layers", "shared", "clip_value", "entropy_coef", "weighted"), CASES)
def test_analytic_gradient_equals_autograd(
    nvec: tuple[int, ...], num_layers: int, shared: bool, clip_value: bool, entropy_coef: float, weighted: bool
) -> None:
    check_against_autograd(make_policy(nvec, num_layers, shared), clip_value, entropy_coef, weighted)


GAUSSIAN_CASES = [
    pytest.param(1, 2, False, True, 0.0, False, 0.0, id="pendulum-shape"),
    pytest.param(6, 2, False, False, 0.0, True, -1.0, id="halfcheetah-recipe-weighted"),
    pytest.param(3, 3, True, True, 0.05, False, -2.0, id="shared-torso-entropy-bonus"),
    pytest.param(2, 0, False, True, 0.01, True, 0.5, id="no-hidden-layers"),
]


@pytest.mark.parametrize(("dims", "num_layers", "shared", "clip_value", "entropy_coef", "weighted", "log_std_init"),
                         GAUSSIAN_CASES)
def test_analytic_gaussian_gradient_equals_autograd(
    dims: int, num_layers: int, shared: bool, clip_value: bool, entropy_coef: float, weighted: bool,
    log_std_init: float,
) -> None:
    """Box actions: the means' and the log-std's gradients, log-probs and diagnostics as autograd takes them."""
    check_against_autograd(make_gaussian_policy(dims, num_layers, shared, log_std_init), clip_value, entropy_coef,
                           weighted)


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
@pytest.mark.parametrize("head", ["categorical", "gaussian"])
def test_relu_torsos_take_the_same_gradient_as_autograd(head: str, shared: bool) -> None:
    """policy.activation=relu: the backward masks where a unit was off (some are, at these sizes)."""
    policy = (make_policy((3, 2), 2, shared, activation="relu") if head == "categorical"
              else make_gaussian_policy(4, 2, shared, -1.0, activation="relu"))
    x = make_minibatch(policy, weighted=False).data["observations"].reshape(-1, OBS)
    off = (policy.actor_torso[0](x) <= 0).float().mean()
    assert 0.1 < float(off) < 0.9, "both sides of the kink are exercised"
    check_against_autograd(policy, clip_value=True, entropy_coef=0.01, weighted=True)


def check_against_autograd(policy: MLPPolicy, clip_value: bool, entropy_coef: float, weighted: bool) -> None:
    """Every gradient (stale ones overwritten), diagnostic and log-prob of the analytic step equals autograd's."""
    cfg = PPOConfig(clip_coef=0.2, clip_value_loss=clip_value, value_clip_coef=0.1, entropy_coef=entropy_coef,
                    value_coef=0.7)
    losses: list[Loss] = [PPOActorLoss(cfg), PPOCriticLoss(cfg)]
    minibatch = make_minibatch(policy, weighted)
    grads, metrics, log_prob = autograd_reference(policy, losses, minibatch)

    for p in policy.parameters():  # stale gradients must be overwritten, not added to
        p.grad = torch.full_like(p, 123.0)
    analytic_metrics, analytic_log_prob = AnalyticPPOGradient(policy, losses)(minibatch)

    assert 0.05 < float(metrics["ppo_actor/clipfrac"]) < 0.95, "both branches of the clipped policy term are taken"
    torch.testing.assert_close(analytic_log_prob, log_prob)
    assert analytic_metrics.keys() == metrics.keys()
    for name, value in metrics.items():
        torch.testing.assert_close(analytic_metrics[name], value.detach(), msg=name)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_analytic_gradient_reads_normalised_observations_as_the_forward_does() -> None:
    """With an observation normaliser (statistics far from the raw features') both paths see the same input."""
    policy = make_policy((3, 2), 2, False)
    normalizer = policy.attach_observation_normalizer(OBS)
    gen = torch.Generator().manual_seed(2)
    normalizer.merge(batch_moments(torch.randn(50, OBS, generator=gen, dtype=torch.float64) * 0.3 + 0.5))
    cfg = PPOConfig(clip_coef=0.2, entropy_coef=0.01)
    losses: list[Loss] = [PPOActorLoss(cfg), PPOCriticLoss(cfg)]
    minibatch = make_minibatch(policy, weighted=False)
    grads, metrics, log_prob = autograd_reference(policy, losses, minibatch)
    assert analytic_problem(policy, losses) is None, "a normaliser has no parameters: the analytic path applies"
    analytic_metrics, analytic_log_prob = AnalyticPPOGradient(policy, losses)(minibatch)
    torch.testing.assert_close(analytic_log_prob, log_prob)
    for name, value in metrics.items():
        torch.testing.assert_close(analytic_metrics[name], value.detach(), msg=name)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_value_clip_takes_both_branches_in_the_cases_above() -> None:
    """Guards the comparison: stored values far enough off that some clipped errors are the larger."""
    policy = make_policy((2,), 2, False)
    minibatch = make_minibatch(policy, weighted=False)
    with torch.no_grad():
        values = policy(minibatch.data["observations"], minibatch.data["starts"]).values
    moved = (values - minibatch.data["values"]).abs() > 0.1
    assert 0 < int(moved.sum()) < moved.numel()


def small_config(**overrides: object) -> TrainerConfig:
    return TrainerConfig(total_timesteps=4 * 256, batch_size=256, minibatch_size=64, bptt_horizon=8,
                         update_epochs=3, seed=5, **overrides)  # type: ignore[arg-type]


def train_gym(gradient: str, env_id: str = "CartPole-v1", log_std_init: float = 0.0) -> tuple[Trainer, MLPPolicy]:
    """Four epochs of a Gymnasium env from one seed with the given gradient path."""
    policy = MLPPolicy(hidden_size=32, log_std_init=log_std_init)
    with GymnasiumEnvironment(env_id, 8) as env:
        trainer = Trainer(small_config(gradient=gradient), env, policy, "cpu")
        trainer.train()
    return trainer, policy


@pytest.mark.parametrize(("env_id", "log_std_init"), [("CartPole-v1", 0.0), ("Pendulum-v1", -1.0)])
def test_training_is_the_same_with_either_gradient_path(env_id: str, log_std_init: float) -> None:
    analytic_trainer, analytic = train_gym("analytic", env_id, log_std_init)
    autograd_trainer, autograd = train_gym("autograd", env_id, log_std_init)
    assert analytic_trainer.core_loop.gradient_path() is not None
    assert autograd_trainer.core_loop.gradient_path() is None
    for (name, a), (_, b) in zip(autograd.state_dict().items(), analytic.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=f"{name} after four epochs")
    actions = [t.context.experience.buffers["actions"] for t in (analytic_trainer, autograd_trainer)]
    if env_id == "CartPole-v1":  # the same choices, step for step
        assert torch.equal(*actions)
    else:  # the same noise around means that differ by float rounding
        torch.testing.assert_close(*actions, atol=1e-4, rtol=1e-3)
    a_stats, b_stats = autograd_trainer.context.stats.losses, analytic_trainer.context.stats.losses
    assert a_stats.keys() == b_stats.keys()
    for name, value in a_stats.items():
        assert b_stats[name] == pytest.approx(value, rel=1e-3, abs=1e-5), name


class ZeroLoss(Loss):
    """A custom term: any loss beyond PPO's actor and critic needs autograd."""

    name = "zero"

    def __call__(self, minibatch: Minibatch, output: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.zeros(()), {}


def test_auto_uses_the_analytic_gradient_only_where_it_applies() -> None:
    mlp = Trainer(small_config(), BanditEnvironment(num_envs=4), MLPPolicy(hidden_size=8), "cpu")
    assert isinstance(mlp.core_loop.gradient_path(), AnalyticPPOGradient)
    lstm = Trainer(small_config(), BanditEnvironment(num_envs=4), LSTMPolicy(hidden_size=8), "cpu")
    assert lstm.core_loop.gradient_path() is None
    custom = Trainer(small_config(), BanditEnvironment(num_envs=4), MLPPolicy(hidden_size=8), "cpu")
    custom.add_loss(ZeroLoss())
    assert custom.core_loop.gradient_path() is None
    problem = analytic_problem(custom.context.policy, custom.losses)
    assert "losses are ['ppo_actor', 'ppo_critic', 'zero']" in str(problem)


def test_gradient_analytic_where_it_cannot_apply_fails_before_training() -> None:
    trainer = Trainer(small_config(gradient="analytic"), BanditEnvironment(num_envs=4), LSTMPolicy(hidden_size=8),
                      "cpu")
    with pytest.raises(ValueError, match="gradient=analytic cannot be used: it is written for MLPPolicy, and the "
                                         "policy is LSTMPolicy; set gradient=auto or gradient=autograd"):
        trainer.train()
    assert trainer.context.state.agent_step == 0


def test_hooks_and_reparametrised_layers_fall_back_to_autograd() -> None:
    """A hand-written forward would skip them and train the wrong function, so `auto` leaves them to autograd."""
    hooked = make_policy((2,), 2, False)
    hooked.actor_head.register_forward_hook(lambda module, args, out: out * 2.0)
    assert "forward hooks or parametrizations" in str(analytic_problem(hooked, [PPOActorLoss(PPOConfig()),
                                                                           PPOCriticLoss(PPOConfig())]))
    normed = make_policy((2,), 2, False)
    torch.nn.utils.parametrizations.weight_norm(normed.critic_head)
    assert analytic_problem(normed, [PPOActorLoss(PPOConfig()), PPOCriticLoss(PPOConfig())]) is not None


def test_nan_advantages_reach_the_gradient_as_with_autograd() -> None:
    """A NaN must not turn into a silent zero gradient."""
    policy = make_policy((2,), 2, False)
    minibatch = make_minibatch(policy, weighted=False)
    minibatch.advantages[0, 0] = float("nan")
    AnalyticPPOGradient(policy, [PPOActorLoss(PPOConfig()), PPOCriticLoss(PPOConfig())])(minibatch)
    assert torch.isnan(policy.actor_head.weight.grad).any()
