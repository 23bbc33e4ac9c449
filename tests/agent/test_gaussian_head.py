"""Box actions: the diagonal Gaussian against torch.distributions.Normal, and the policies that act with it."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from scipy import stats

from mettle.agent.distributions import DiagonalGaussian, act_gaussian
from mettle.agent.lstm import LSTMPolicy
from mettle.agent.mlp import MLPPolicy
from mettle.agent.policy import Policy
from mettle.agent.registry import build_policy
from mettle.contracts import PolicyEnvInfo

BOX = gym.spaces.Box(np.array([-2.0, 0.0, -1.0], dtype=np.float32), np.array([2.0, 1.0, 1.0], dtype=np.float32))
OBS = gym.spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
INFO = PolicyEnvInfo(OBS, BOX)


def reference(mean: torch.Tensor, log_std: torch.Tensor) -> torch.distributions.Normal:
    """The independent oracle: torch's own Normal, one per dimension."""
    return torch.distributions.Normal(mean.double(), log_std.double().exp().expand_as(mean))


@pytest.mark.parametrize("shape", [(5, 1), (3, 4, 2), (7, 3)])
def test_log_prob_and_entropy_equal_torch_normals_summed_over_dimensions(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(shape, generator=gen)
    log_std = torch.randn(shape[-1:], generator=gen) * 0.7
    actions = mean + 3.0 * torch.randn(shape, generator=gen)  # far outside one std too, as clipped samples are
    dist, oracle = DiagonalGaussian(mean, log_std), reference(mean, log_std)
    float32 = {"rtol": 1e-6, "atol": 1e-5}  # ours in float32, the oracle in float64
    torch.testing.assert_close(dist.log_prob(actions).double(), oracle.log_prob(actions.double()).sum(-1), **float32)
    torch.testing.assert_close(dist.entropy().double(), oracle.entropy().sum(-1), **float32)
    assert dist.log_prob(actions).shape == dist.entropy().shape == shape[:-1]


def test_log_prob_of_a_hand_worked_point() -> None:
    """N(0.5, e^0.2) at 2.7: -(2.2 / e^0.2)^2 / 2 - 0.2 - log(2 pi) / 2."""
    dist = DiagonalGaussian(torch.tensor([0.5]), torch.tensor([0.2]))
    expected = -0.5 * (2.2 / math.exp(0.2)) ** 2 - 0.2 - 0.5 * math.log(2 * math.pi)
    assert dist.log_prob(torch.tensor([2.7])).item() == pytest.approx(expected, rel=1e-6)


def test_gradients_reach_the_mean_and_the_log_std_as_torch_normals_do() -> None:
    mean = torch.randn(6, 2, requires_grad=True)
    log_std = torch.tensor([0.3, -0.4], requires_grad=True)
    actions = torch.randn(6, 2)
    dist = DiagonalGaussian(mean, log_std)
    (dist.log_prob(actions).sum() + dist.entropy().sum()).backward()
    ours = (mean.grad.clone(), log_std.grad.clone())
    mean.grad, log_std.grad = None, None
    oracle = torch.distributions.Normal(mean, log_std.exp())
    (oracle.log_prob(actions).sum() + oracle.entropy().sum()).backward()
    torch.testing.assert_close(ours, (mean.grad, log_std.grad))


def test_samples_follow_the_normal_per_dimension_and_repeat_from_the_generator() -> None:
    mean, log_std = torch.tensor([1.5, -0.5]), torch.tensor([0.0, -1.0])
    dist = DiagonalGaussian(mean.expand(100_000, 2), log_std)
    draws = dist.sample(torch.Generator().manual_seed(4))
    for dim in range(2):
        scale = math.exp(log_std[dim].item())
        assert stats.kstest(draws[:, dim].double().numpy(), "norm", args=(mean[dim].item(), scale)).pvalue > 1e-3
    assert torch.equal(draws, dist.sample(torch.Generator().manual_seed(4)))
    torch.manual_seed(9)
    first = act_gaussian(mean, log_std, None)[0]
    torch.manual_seed(9)
    assert torch.equal(first, act_gaussian(mean, log_std, None)[0])


def test_mode_is_the_mean_and_scoring_keeps_given_actions() -> None:
    mean, log_std = torch.randn(4, 3), torch.zeros(3)
    chosen, log_prob, _ = act_gaussian(mean, log_std, None, deterministic=True)
    assert torch.equal(chosen, mean)
    given = torch.full((4, 3), 9.0)
    scored, given_log_prob, entropy = act_gaussian(mean, log_std, given)
    assert scored is given and given_log_prob.shape == entropy.shape == (4,)
    assert bool((given_log_prob < log_prob).all())


def test_a_log_std_of_the_wrong_size_is_one_line() -> None:
    with pytest.raises(ValueError, match=r"log_std shaped \(2,\), expected \[3\]"):
        DiagonalGaussian(torch.zeros(4, 3), torch.zeros(2))


# ------------------------------------------------------------------------------ policies
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_policies_act_with_a_gaussian_head_on_box_actions(kind: str) -> None:
    torch.manual_seed(0)
    policy = build_policy(kind, hidden_size=16)
    policy.initialize_to_environment(INFO, "cpu")
    assert isinstance(policy, MLPPolicy | LSTMPolicy) and policy.log_std is not None
    assert torch.equal(policy.log_std.detach(), torch.zeros(3)), "log-std starts at 0 (std 1), as CleanRL and SB3"
    spec = policy.get_agent_experience_spec()["actions"]
    assert (spec.shape, spec.dtype) == ((3,), torch.float32)
    obs, starts = torch.randn(5, 6, 4), torch.zeros(5, 6, dtype=torch.bool)
    starts[:, 0] = True
    sampled = policy(obs, starts)
    assert sampled.actions.dtype == torch.float32 and sampled.actions.shape == (5, 6, 3)
    assert sampled.logits is not None and sampled.logits.shape == (5, 6, 3), "logits hold the Gaussian's mean"
    memory = sampled.memory or None
    scored = policy(obs, starts, actions=sampled.actions, memory=memory)
    torch.testing.assert_close(scored.log_prob, sampled.log_prob)
    oracle = reference(scored.logits.detach(), policy.log_std.detach())
    torch.testing.assert_close(scored.log_prob.double(), oracle.log_prob(sampled.actions.double()).sum(-1),
                               rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(scored.entropy, torch.full((5, 6), 3 * (0.5 + 0.5 * math.log(2 * math.pi))))
    (scored.log_prob.sum() + scored.entropy.sum()).backward()
    assert policy.log_std.grad is not None and bool(policy.log_std.grad.ne(0).all())


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_greedy_acting_sends_the_mean(kind: str) -> None:
    policy: Policy = build_policy(kind, hidden_size=8)
    policy.initialize_to_environment(INFO, "cpu")
    obs, starts = torch.randn(3, 1, 4), torch.ones(3, 1, dtype=torch.bool)
    policy.reset_memory()
    greedy = policy(obs, starts, deterministic=True)
    assert greedy.logits is not None and torch.equal(greedy.actions, greedy.logits)


def test_categorical_policies_keep_no_log_std() -> None:
    policy = build_policy("mlp", hidden_size=8)
    policy.initialize_to_environment(PolicyEnvInfo(OBS, gym.spaces.Discrete(3)), "cpu")
    assert isinstance(policy, MLPPolicy) and policy.log_std is None
    assert "log_std" not in policy.state_dict()


def test_the_token_policy_refuses_box_actions_in_one_line() -> None:
    policy = build_policy("token", hidden_size=16)
    with pytest.raises(ValueError) as error:
        policy.initialize_to_environment(INFO, "cpu")
    message = str(error.value)
    assert "TokenPolicy acts with categorical heads" in message and "policy.kind=mlp or lstm" in message
    assert "\n" not in message


def test_an_integer_box_is_refused_by_the_gaussian_policies() -> None:
    info = PolicyEnvInfo(OBS, gym.spaces.Box(0, 5, (2,), dtype=np.int64))
    with pytest.raises(ValueError, match=r"holds integers; a Gaussian head needs a float Box"):
        build_policy("mlp").initialize_to_environment(info, "cpu")


def test_box_action_facts_of_the_contract() -> None:
    assert INFO.continuous_actions and INFO.action_width == 3 and INFO.action_dtype == np.float32
    assert INFO.action_layout == ("box", (3,))
    assert PolicyEnvInfo(OBS, gym.spaces.MultiDiscrete([3, 2])).action_layout == ("choices", (3, 2))
    with pytest.raises(ValueError, match=r"has no choices per head; read PolicyEnvInfo\.action_width"):
        _ = INFO.action_nvec


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_log_std_init_sets_the_first_std_and_survives_a_rebuild_from_the_spec(kind: str) -> None:
    policy = build_policy(kind, log_std_init=-1.5)
    policy.initialize_to_environment(INFO, "cpu")
    assert policy.log_std is not None
    assert policy.log_std.tolist() == [-1.5, -1.5, -1.5]
    obs = torch.zeros(2000, 1, 4)
    spread = policy(obs, torch.ones(2000, 1, dtype=torch.bool)).actions.std(dim=(0, 1))
    torch.testing.assert_close(spread, torch.full((3,), math.exp(-1.5)), rtol=0.1, atol=0.0)
    kwargs = policy.constructor_kwargs()
    assert kwargs["log_std_init"] == -1.5
    rebuilt = build_policy(kind, **kwargs)
    rebuilt.initialize_to_environment(INFO, "cpu")
    assert rebuilt.log_std is not None and rebuilt.log_std.tolist() == [-1.5, -1.5, -1.5]
    assert "log_std_init" not in build_policy(kind).constructor_kwargs(), "specs saved before it stay alike"


@pytest.mark.parametrize("value", [-25.0, 21, True, "low"])
def test_a_log_std_init_out_of_range_is_refused_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match=r"^log_std_init must be a number in \[-20, 20\]"):
        MLPPolicy(log_std_init=value)  # type: ignore[arg-type]
