"""Behaviour of the action distribution, the MLP and LSTM policies, and the policy registry."""

from __future__ import annotations

import copy
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Categorical

from mettle.agent import LSTMPolicy, MLPPolicy, Policy, TensorSpec, build_policy, policy_from_spec, policy_spec
from mettle.agent.distributions import MultiCategorical
from mettle.agent.lstm import chunk_bounds
from mettle.rl.training.environment import PolicyEnvInfo

NVECS = [(3,), (3, 2, 4)]
OBS_SHAPES = [(4,), (2, 3)]


def make_info(obs_shape: tuple[int, ...] = (4,), nvec: tuple[int, ...] = (3,)) -> PolicyEnvInfo:
    """Spaces for a policy: Discrete for one head, MultiDiscrete otherwise."""
    obs = gym.spaces.Box(-1.0, 1.0, obs_shape, np.float32)
    action = gym.spaces.Discrete(nvec[0]) if len(nvec) == 1 else gym.spaces.MultiDiscrete(list(nvec))
    return PolicyEnvInfo(observation_space=obs, action_space=action)


def make_lstm(seed: int = 0, nvec: tuple[int, ...] = (3, 2)) -> LSTMPolicy:
    """A small initialised LSTM policy with reproducible weights."""
    torch.manual_seed(seed)
    policy = LSTMPolicy(hidden_size=16)
    policy.initialize_to_environment(make_info((4,), nvec), "cpu")
    return policy


def reference(logits: torch.Tensor, nvec: tuple[int, ...], actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Joint log-prob and entropy from torch's Categorical, one per head, summed."""
    heads = [Categorical(logits=chunk) for chunk in logits.split(list(nvec), dim=-1)]
    log_prob = sum(d.log_prob(actions[..., i]) for i, d in enumerate(heads))
    entropy = sum(d.entropy() for d in heads)
    return log_prob, entropy


def random_actions(nvec: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform valid actions [*shape, heads]."""
    return torch.stack([torch.randint(0, n, shape) for n in nvec], dim=-1)


# --------------------------------------------------------------------------- MultiCategorical


@pytest.mark.parametrize("nvec", NVECS)
def test_multicategorical_matches_per_head_categorical(nvec: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 7, sum(nvec)) * 3
    actions = random_actions(nvec, (5, 7))
    dist = MultiCategorical(logits, nvec)
    want_log_prob, want_entropy = reference(logits, nvec, actions)
    torch.testing.assert_close(dist.log_prob(actions), want_log_prob)
    torch.testing.assert_close(dist.entropy(), want_entropy)
    assert dist.sample().shape == (5, 7, len(nvec))


@pytest.mark.parametrize("nvec", NVECS)
def test_multicategorical_mode_is_argmax(nvec: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, sum(nvec))
    want = torch.stack([chunk.argmax(-1) for chunk in logits.split(list(nvec), dim=-1)], dim=-1)
    assert torch.equal(MultiCategorical(logits, nvec).mode(), want)


def test_multicategorical_sample_frequencies_follow_probs() -> None:
    nvec = (3, 2, 4)
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.0, 0.5, -0.5, 1.5, 0.0])
    samples = MultiCategorical(logits.expand(40_000, -1), nvec).sample(torch.Generator().manual_seed(0))
    for head, chunk in enumerate(logits.split(list(nvec))):
        freq = torch.bincount(samples[:, head], minlength=chunk.numel()).float() / samples.shape[0]
        torch.testing.assert_close(freq, chunk.softmax(-1), atol=0.015, rtol=0)


def test_multicategorical_uneven_heads_have_finite_gradients() -> None:
    logits = torch.randn(4, 9, requires_grad=True)
    dist = MultiCategorical(logits, (3, 2, 4))
    (dist.entropy().sum() + dist.log_prob(random_actions((3, 2, 4), (4,))).sum()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_multicategorical_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="nvec"):
        MultiCategorical(torch.zeros(2, 5), (3, 3))


# --------------------------------------------------------------------------- MLP


def make_mlp(obs_shape: tuple[int, ...], nvec: tuple[int, ...], **kwargs: object) -> MLPPolicy:
    """An initialised MLP policy with reproducible weights."""
    torch.manual_seed(0)
    policy = MLPPolicy(hidden_size=32, **kwargs)  # type: ignore[arg-type]
    policy.initialize_to_environment(make_info(obs_shape, nvec), "cpu")
    return policy


@pytest.mark.parametrize("obs_shape", OBS_SHAPES)
@pytest.mark.parametrize("nvec", NVECS)
def test_mlp_output_shapes_and_dtypes(obs_shape: tuple[int, ...], nvec: tuple[int, ...]) -> None:
    policy = make_mlp(obs_shape, nvec)
    out = policy(torch.randn(5, 3, *obs_shape), torch.zeros(5, 3, dtype=torch.bool), rows=slice(0, 5))
    assert out.actions.shape == (5, 3, len(nvec)) and out.actions.dtype == torch.int64
    assert (out.actions >= 0).all() and (out.actions < torch.tensor(nvec)).all()
    for field in (out.log_prob, out.entropy, out.values):
        assert field.shape == (5, 3) and field.dtype == torch.float32
    assert out.memory == {}
    assert policy.get_agent_experience_spec() == {
        "observations": TensorSpec(obs_shape, torch.float32),
        "actions": TensorSpec((len(nvec),), torch.int64),
    }


@pytest.mark.parametrize("shared_torso", [False, True])
@pytest.mark.parametrize("nvec", NVECS)
def test_mlp_scoring_sampled_actions_reproduces_log_prob(nvec: tuple[int, ...], shared_torso: bool) -> None:
    policy = make_mlp((2, 3), nvec, shared_torso=shared_torso)
    obs, starts = torch.randn(6, 4, 2, 3), torch.zeros(6, 4, dtype=torch.bool)
    rollout = policy(obs, starts, rows=slice(0, 6))
    scored = policy(obs, starts, actions=rollout.actions, memory={})
    assert torch.equal(scored.actions, rollout.actions)
    torch.testing.assert_close(scored.log_prob, rollout.log_prob)
    torch.testing.assert_close(scored.entropy, rollout.entropy)
    torch.testing.assert_close(scored.values, rollout.values)


@pytest.mark.parametrize("nvec", NVECS)
def test_mlp_deterministic_takes_argmax(nvec: tuple[int, ...]) -> None:
    policy = make_mlp((4,), nvec)
    obs = torch.randn(8, 1, 4)
    out = policy(obs, torch.zeros(8, 1, dtype=torch.bool), deterministic=True)
    with torch.no_grad():
        logits = policy.actor_head(policy.actor_torso(obs.reshape(8, 4))).view(8, 1, -1)
    assert torch.equal(out.actions, MultiCategorical(logits, nvec).mode())


def test_mlp_init_scheme_and_shared_torso() -> None:
    separate, shared = make_mlp((4,), (3,)), make_mlp((4,), (3,), shared_torso=True)
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in separate.parameters())
    assert all((layer.bias == 0).all() for layer in separate.modules() if isinstance(layer, torch.nn.Linear))
    weight = separate.actor_torso[2].weight  # square hidden-to-hidden layer
    torch.testing.assert_close(weight @ weight.T, 2.0 * torch.eye(32), atol=1e-4, rtol=0)
    assert separate.actor_head.weight.abs().max() <= 0.01 + 1e-6


@pytest.mark.parametrize("policy_cls", [MLPPolicy, LSTMPolicy])
def test_non_box_observation_space_is_rejected(policy_cls: type[Policy]) -> None:
    info = PolicyEnvInfo(observation_space=gym.spaces.Discrete(5), action_space=gym.spaces.Discrete(2))
    with pytest.raises(ValueError, match=r"Box observation space.*Discrete"):
        policy_cls().initialize_to_environment(info, "cpu")


def test_mlp_policy_spec_round_trip() -> None:
    policy = make_mlp((4,), (3, 2, 4), num_layers=3)
    spec = json.loads(json.dumps(policy_spec(policy)))
    assert spec == {
        "class": "mlp",
        "kwargs": {"hidden_size": 32, "num_layers": 3, "shared_torso": False},
    }
    clone = policy_from_spec(spec)
    clone.initialize_to_environment(make_info((4,), (3, 2, 4)), "cpu")
    clone.load_state_dict(policy.state_dict())
    obs, starts = torch.randn(3, 2, 4), torch.zeros(3, 2, dtype=torch.bool)
    torch.testing.assert_close(clone(obs, starts).values, policy(obs, starts).values)


# --------------------------------------------------------------------------- LSTM


def rollout_steps(
    policy: LSTMPolicy, obs: torch.Tensor, starts: torch.Tensor, rows: slice, actions: torch.Tensor | None = None
) -> list:
    """Step `rows` one time step at a time, deterministically (or scoring `actions`)."""
    outputs = []
    for t in range(obs.shape[1]):
        given = None if actions is None else actions[:, t : t + 1]
        step = slice(t, t + 1)
        outputs.append(policy(obs[:, step], starts[:, step], actions=given, rows=rows, deterministic=True))
    return outputs


def test_lstm_rows_keep_separate_memory() -> None:
    policy = make_lstm()
    together = copy.deepcopy(policy)
    torch.manual_seed(3)
    obs = torch.randn(4, 5, 4)
    starts = torch.zeros(4, 5, dtype=torch.bool)
    starts[:, 0] = True
    first = rollout_steps(policy, obs[:2], starts[:2], slice(0, 2))
    second = rollout_steps(policy, obs[2:], starts[2:], slice(2, 4))
    both = rollout_steps(together, obs, starts, slice(0, 4))
    for a, b, ab in zip(first, second, both, strict=True):
        torch.testing.assert_close(torch.cat([a.values, b.values]), ab.values)
        torch.testing.assert_close(torch.cat([a.log_prob, b.log_prob]), ab.log_prob)
        assert torch.equal(torch.cat([a.actions, b.actions]), ab.actions)
        torch.testing.assert_close(torch.cat([a.memory["lstm_h"], b.memory["lstm_h"]]), ab.memory["lstm_h"])


def test_lstm_start_resets_a_rows_memory() -> None:
    policy = make_lstm()
    fresh = copy.deepcopy(policy)
    torch.manual_seed(4)
    history, obs = torch.randn(3, 4, 4), torch.randn(3, 1, 4)
    rollout_steps(policy, history, torch.zeros(3, 4, dtype=torch.bool), slice(0, 3))
    starts = torch.tensor([[False], [True], [False]])
    after = policy(obs, starts, rows=slice(0, 3), deterministic=True)
    baseline = fresh(obs, starts, rows=slice(0, 3), deterministic=True)
    torch.testing.assert_close(after.values[1], baseline.values[1])
    torch.testing.assert_close(after.log_prob[1], baseline.log_prob[1])
    assert not torch.allclose(after.values[0], baseline.values[0])
    assert after.memory["lstm_h"][1].abs().sum() > 0, "memory is the state before this call"


def test_lstm_training_window_reproduces_rollout() -> None:
    policy = make_lstm(seed=5, nvec=(3, 2, 4))
    b, t = 4, 8
    torch.manual_seed(6)
    obs = torch.randn(b, t, 4)
    starts = torch.zeros(b, t, dtype=torch.bool)
    starts[:, 0] = True
    starts[2, 3] = starts[0, 5] = starts[3, 6] = True
    steps = [policy(obs[:, i : i + 1], starts[:, i : i + 1], rows=slice(0, b)) for i in range(t)]
    actions = torch.cat([s.actions for s in steps], dim=1)
    log_probs = torch.cat([s.log_prob for s in steps], dim=1)
    values = torch.cat([s.values for s in steps], dim=1)
    state_after_rollout = policy._h.clone()
    for lo, hi in [(0, t), (3, t), (2, 5)]:
        memory = {key: steps[lo].memory[key] for key in ("lstm_h", "lstm_c")}
        window = slice(lo, hi)
        out = policy(obs[:, window], starts[:, window], actions=actions[:, window], memory=memory)
        assert torch.equal(out.actions, actions[:, window])
        torch.testing.assert_close(out.log_prob, log_probs[:, window], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.values, values[:, window], atol=1e-5, rtol=1e-5)
    assert torch.equal(policy._h, state_after_rollout), "training must not touch rollout memory"


def test_lstm_multi_step_rollout_call_equals_single_steps() -> None:
    policy = make_lstm()
    stepwise = copy.deepcopy(policy)
    obs = torch.randn(3, 6, 4)
    starts = torch.zeros(3, 6, dtype=torch.bool)
    starts[1, 2] = True
    whole = policy(obs, starts, rows=slice(0, 3), deterministic=True)
    steps = rollout_steps(stepwise, obs, starts, slice(0, 3))
    torch.testing.assert_close(whole.values, torch.cat([s.values for s in steps], dim=1))
    torch.testing.assert_close(policy._h, stepwise._h)


@pytest.mark.parametrize("inner_start", [False, True])
def test_lstm_chunked_unroll_equals_per_step(inner_start: bool) -> None:
    policy = make_lstm()
    b, t, hidden = 5, 7, policy.hidden_size
    x, h, c = torch.randn(b, t, hidden), torch.randn(b, hidden), torch.randn(b, hidden)
    starts = torch.zeros(b, t, dtype=torch.bool)
    starts[1, 0] = True
    if inner_start:
        starts[3, 4] = starts[0, 4] = starts[2, 6] = True
    fast = policy.unroll(x, h, c, starts)
    slow = policy.unroll(x, h, c, starts, per_step=True)
    for got, want in zip(fast, slow, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert len(chunk_bounds(starts)) == (4 if inner_start else 2)


def test_chunk_bounds_split_at_inner_starts() -> None:
    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[0, 0] = starts[1, 2] = starts[0, 4] = starts[1, 4] = True
    assert chunk_bounds(starts) == [0, 2, 4, 6]
    assert chunk_bounds(starts, per_step=True) == list(range(7))
    assert chunk_bounds(starts[:, :1]) == [0, 1]


def test_lstm_gradients_flow_back_through_time() -> None:
    policy = make_lstm()
    obs = torch.randn(3, 6, 4, requires_grad=True)
    starts = torch.zeros(3, 6, dtype=torch.bool)
    memory = {"lstm_h": torch.zeros(3, 16), "lstm_c": torch.zeros(3, 16)}
    out = policy(obs, starts, actions=torch.zeros(3, 6, 2, dtype=torch.int64), memory=memory)
    (out.log_prob[:, -1].sum() + out.values[:, -1].sum()).backward()
    for param in (policy.encoder[0].weight, policy.lstm.weight_hh_l0, policy.lstm.weight_ih_l0):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert obs.grad is not None and obs.grad[:, 0].abs().sum() > 0, "BPTT must reach the window's first step"


def test_lstm_reset_memory_zeroes_state() -> None:
    policy = make_lstm()
    obs, starts = torch.randn(2, 1, 4), torch.zeros(2, 1, dtype=torch.bool)
    policy(obs, starts, rows=slice(0, 2))
    assert policy(obs, starts, rows=slice(0, 2)).memory["lstm_h"].abs().sum() > 0
    policy.reset_memory()
    memory = policy(obs, starts, rows=slice(0, 2)).memory
    assert not memory["lstm_h"].any() and not memory["lstm_c"].any()


def test_lstm_memory_grows_and_defaults_to_leading_rows() -> None:
    policy = make_lstm()
    policy(torch.randn(2, 1, 4), torch.zeros(2, 1, dtype=torch.bool), rows=slice(4, 6))
    assert policy._h is not None and policy._h.shape == (6, 16)
    assert not policy._h[:4].any() and policy._h[4:].abs().sum() > 0
    policy(torch.randn(3, 1, 4), torch.zeros(3, 1, dtype=torch.bool))
    assert policy._h[:3].abs().sum() > 0 and not policy._h[3].any()
    with pytest.raises(ValueError, match="rows"):
        policy(torch.randn(3, 1, 4), torch.zeros(3, 1, dtype=torch.bool), rows=slice(0, 2))


def test_lstm_state_from_inference_mode_is_usable_after() -> None:
    policy = make_lstm()
    obs, starts = torch.randn(2, 1, 4), torch.zeros(2, 1, dtype=torch.bool)
    with torch.inference_mode():
        policy(obs, starts, rows=slice(0, 2))
    out = policy(obs, starts, rows=slice(0, 2))
    out.values.sum().backward()
    assert out.memory["lstm_h"].abs().sum() > 0


def test_lstm_experience_spec_and_bad_memory() -> None:
    policy = make_lstm()
    spec = policy.get_agent_experience_spec()
    assert spec["lstm_h"] == spec["lstm_c"] == TensorSpec((16,), torch.float32)
    assert spec["actions"] == TensorSpec((2,), torch.int64) and spec["observations"].shape == (4,)
    assert policy.is_recurrent and not MLPPolicy().is_recurrent
    with pytest.raises(ValueError, match="lstm_c"):
        policy(torch.randn(2, 1, 4), torch.zeros(2, 1, dtype=torch.bool), memory={"lstm_h": torch.zeros(2, 16)})


def test_lstm_rebuild_gives_identical_outputs() -> None:
    policy = make_lstm(seed=7)
    spec = json.loads(json.dumps(policy_spec(policy)))
    clone = policy_from_spec(spec)
    assert isinstance(clone, LSTMPolicy)
    clone.initialize_to_environment(make_info((4,), (3, 2)), "cpu")
    clone.load_state_dict(policy.state_dict())
    obs = torch.randn(3, 4, 4)
    starts = torch.zeros(3, 4, dtype=torch.bool)
    want = rollout_steps(policy, obs, starts, slice(0, 3))
    got = rollout_steps(clone, obs, starts, slice(0, 3))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.actions, b.actions)
        torch.testing.assert_close(a.values, b.values)
        torch.testing.assert_close(a.log_prob, b.log_prob)


# --------------------------------------------------------------------------- registry


def test_build_policy_by_kind() -> None:
    assert isinstance(build_policy("mlp", hidden_size=8), MLPPolicy)
    lstm = build_policy("lstm", hidden_size=8, encoder_layers=2)
    assert isinstance(lstm, LSTMPolicy) and lstm.encoder_layers == 2


def test_build_policy_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match=r"'transformer'.*valid kinds: \['lstm', 'mlp'"):
        build_policy("transformer")


@pytest.mark.parametrize(
    "spec",
    [{"class": "torch.nn:Linear", "kwargs": {}}, {"class": "mettle.agent.mlp.MLPPolicy"}, {"class": "nope:X"}],
)
def test_policy_from_spec_rejects_non_policies(spec: dict) -> None:
    with pytest.raises(ValueError):
        policy_from_spec(spec)
