"""Behaviour of the token policy: padding, permutation invariance, recurrence, rebuild and learning."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch._dynamo

from mettle.agent import TensorSpec, build_policy, policy_from_spec, policy_spec
from mettle.agent.token import TokenEncoder, TokenPolicy, feature_normalizations, max_pool_distinct
from mettle.rl.training.environment import PolicyEnvInfo

NUM_TOKENS = 12
POOLINGS = ["max", "mean", "attention"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_info(num_tokens: int = NUM_TOKENS, nvec: tuple[int, ...] = (4,), extras: dict | None = None) -> PolicyEnvInfo:
    """A token observation space with Discrete (one head) or MultiDiscrete actions."""
    obs = gym.spaces.Box(0, 255, (num_tokens, 3), np.uint8)
    action = gym.spaces.Discrete(nvec[0]) if len(nvec) == 1 else gym.spaces.MultiDiscrete(list(nvec))
    return PolicyEnvInfo(observation_space=obs, action_space=action, extras=extras or {})


def make_policy(seed: int = 0, nvec: tuple[int, ...] = (4,), **kwargs: object) -> TokenPolicy:
    """A small initialised token policy with reproducible weights."""
    torch.manual_seed(seed)
    options = {"hidden_size": 16, "embed_size": 8, "num_heads": 2, **kwargs}
    policy = TokenPolicy(**options)  # type: ignore[arg-type]
    policy.initialize_to_environment(make_info(nvec=nvec), "cpu")
    return policy


def random_tokens(b: int, t: int, num_valid: int, num_tokens: int = NUM_TOKENS, seed: int = 0) -> torch.Tensor:
    """[b, t, num_tokens, 3] uint8: `num_valid` random real tokens, then 0xFF padding."""
    gen = torch.Generator().manual_seed(seed)
    obs = torch.full((b, t, num_tokens, 3), 255, dtype=torch.uint8)
    obs[..., :num_valid, 0] = torch.randint(0, 0xEF, (b, t, num_valid), generator=gen, dtype=torch.uint8)
    obs[..., :num_valid, 1] = torch.randint(0, 40, (b, t, num_valid), generator=gen, dtype=torch.uint8)
    obs[..., :num_valid, 2] = torch.randint(0, 256, (b, t, num_valid), generator=gen, dtype=torch.uint8)
    return obs


def no_starts(b: int, t: int) -> torch.Tensor:
    """[b, t] starts, all False."""
    return torch.zeros(b, t, dtype=torch.bool)


def evaluate(policy: TokenPolicy, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_prob, values) of `actions` from zero memory: a pure function of the observations."""
    b, t = obs.shape[:2]
    memory = {key: torch.zeros(b, policy.hidden_size) for key in ("lstm_h", "lstm_c")}
    out = policy(obs, no_starts(b, t), actions=actions, memory=memory if policy.is_recurrent else None)
    return out.log_prob, out.values


@pytest.mark.parametrize("core", ["lstm", "none"])
def test_output_shapes_dtypes_and_spec(core: str) -> None:
    policy = make_policy(nvec=(4, 3), core=core)
    out = policy(random_tokens(5, 3, 7), no_starts(5, 3), rows=slice(0, 5))
    assert out.actions.shape == (5, 3, 2) and out.actions.dtype == torch.int64
    assert (out.actions >= 0).all() and (out.actions < torch.tensor([4, 3])).all()
    for field in (out.log_prob, out.entropy, out.values):
        assert field.shape == (5, 3) and field.dtype == torch.float32 and torch.isfinite(field).all()
    spec = policy.get_agent_experience_spec()
    assert spec["observations"] == TensorSpec((NUM_TOKENS, 3), torch.uint8)
    assert spec["actions"] == TensorSpec((2,), torch.int64)
    assert policy.is_recurrent == (core == "lstm")
    if core == "lstm":
        assert spec["lstm_h"] == spec["lstm_c"] == TensorSpec((16,), torch.float32)
        assert out.memory["lstm_h"].shape == (5, 16)
    else:
        assert set(spec) == {"observations", "actions"} and out.memory == {}


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_does_not_affect_outputs(pooling: str) -> None:
    policy = make_policy(pooling=pooling, token_layers=1)
    obs = random_tokens(4, 2, 5)
    actions = torch.randint(0, 4, (4, 2, 1))
    want = evaluate(policy, obs, actions)
    longer = torch.cat([obs, torch.full((4, 2, 6, 3), 255, dtype=torch.uint8)], dim=2)
    scribbled = obs.clone()
    scribbled[..., 5:8, 1:] = torch.randint(0, 200, (4, 2, 3, 2), dtype=torch.uint8)  # location still 0xFF
    scribbled[..., 8:, 0] = 17  # a real location, but feature 0xFF: still padding
    scribbled[..., 8:, 2] = 99
    for variant in (longer, scribbled):
        for got, expected in zip(evaluate(policy, variant, actions), want, strict=True):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_all_padding_gives_finite_outputs_and_gradients(pooling: str) -> None:
    policy = make_policy(pooling=pooling)
    obs = torch.full((3, 2, NUM_TOKENS, 3), 255, dtype=torch.uint8)
    obs[0, 0, :2] = random_tokens(1, 1, 2)[0, 0, :2]  # one step with real tokens beside all-padding ones
    log_prob, values = evaluate(policy, obs, torch.zeros(3, 2, 1, dtype=torch.int64))
    assert torch.isfinite(log_prob).all() and torch.isfinite(values).all()
    (log_prob.sum() + values.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_token_order_does_not_matter(pooling: str) -> None:
    policy = make_policy(pooling=pooling, token_layers=1)
    obs = random_tokens(3, 2, 9)
    shuffled = obs.clone()
    shuffled[..., :9, :] = obs[..., torch.randperm(9, generator=torch.Generator().manual_seed(1)), :]
    actions = torch.randint(0, 4, (3, 2, 1))
    for got, want in zip(evaluate(policy, shuffled, actions), evaluate(policy, obs, actions), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tokens_are_told_apart_by_location_feature_and_value() -> None:
    policy = make_policy()
    obs = random_tokens(1, 1, 1)
    actions = torch.zeros(1, 1, 1, dtype=torch.int64)
    base = evaluate(policy, obs, actions)[1]
    for channel in range(3):
        changed = obs.clone()
        changed[0, 0, 0, channel] += 1
        assert not torch.allclose(evaluate(policy, changed, actions)[1], base), f"channel {channel} is ignored"


def test_training_window_reproduces_stepwise_rollout() -> None:
    policy = make_policy(seed=5, nvec=(4, 3))
    b, t = 4, 8
    obs = random_tokens(b, t, 6, seed=6)
    starts = no_starts(b, t)
    starts[:, 0] = True
    starts[2, 3] = starts[0, 5] = starts[3, 6] = True
    steps = [policy(obs[:, i : i + 1], starts[:, i : i + 1], rows=slice(0, b)) for i in range(t)]
    actions, log_probs, values = (
        torch.cat([getattr(s, f) for s in steps], dim=1) for f in ("actions", "log_prob", "values")
    )
    state_after_rollout = policy._h.clone()
    for lo, hi in [(0, t), (3, t), (2, 5)]:
        memory = {key: steps[lo].memory[key] for key in ("lstm_h", "lstm_c")}
        window = slice(lo, hi)
        out = policy(obs[:, window], starts[:, window], actions=actions[:, window], memory=memory)
        torch.testing.assert_close(out.log_prob, log_probs[:, window], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.values, values[:, window], atol=1e-5, rtol=1e-5)
    assert torch.equal(policy._h, state_after_rollout), "training must not touch rollout memory"


def test_rows_keep_separate_memory() -> None:
    policy = make_policy()
    together = copy.deepcopy(policy)
    obs = random_tokens(4, 3, 5)
    starts = no_starts(4, 3)
    for t in range(3):
        step = slice(t, t + 1)
        first = policy(obs[:2, step], starts[:2, step], rows=slice(0, 2), deterministic=True)
        second = policy(obs[2:, step], starts[2:, step], rows=slice(2, 4), deterministic=True)
        both = together(obs[:, step], starts[:, step], rows=slice(0, 4), deterministic=True)
        torch.testing.assert_close(torch.cat([first.values, second.values]), both.values)


@pytest.mark.parametrize("core", ["lstm", "none"])
def test_rebuild_gives_identical_outputs(core: str) -> None:
    extras = {"feature_normalizations": [10.0, 100.0, 1.0]}
    torch.manual_seed(7)
    policy = TokenPolicy(hidden_size=16, embed_size=8, core=core, pooling="attention", num_heads=2, token_layers=1)
    policy.initialize_to_environment(make_info(nvec=(4, 3), extras=extras), "cpu")
    spec = json.loads(json.dumps(policy_spec(policy)))
    assert spec["class"] == "token" and spec["kwargs"]["core"] == core
    clone = policy_from_spec(spec)
    assert isinstance(clone, TokenPolicy)
    clone.initialize_to_environment(make_info(nvec=(4, 3)), "cpu")  # scales come back with the state dict
    clone.load_state_dict(policy.state_dict())
    obs = random_tokens(3, 4, 6)
    starts = no_starts(3, 4)
    for t in range(4):
        step = slice(t, t + 1)
        want = policy(obs[:, step], starts[:, step], rows=slice(0, 3), deterministic=True)
        got = clone(obs[:, step], starts[:, step], rows=slice(0, 3), deterministic=True)
        assert torch.equal(got.actions, want.actions)
        torch.testing.assert_close(got.values, want.values)
        torch.testing.assert_close(got.log_prob, want.log_prob)


def test_feature_normalizations_from_extras() -> None:
    as_list = feature_normalizations({"feature_normalizations": [10.0, 0.0, 256.0]})
    assert as_list[:3].tolist() == [10.0, 255.0, 256.0] and as_list[3] == 255.0
    as_dict = feature_normalizations({"feature_normalizations": {"5": 2.0}})
    assert as_dict[5] == 2.0 and as_dict[0] == 255.0
    given = [{"id": 2, "normalization": 100.0}, {"name": "x"}, SimpleNamespace(id=4, normalization=7.0)]
    specs = feature_normalizations({"obs_features": given})
    assert specs[2] == 100.0 and specs[4] == 7.0
    junk = feature_normalizations({"feature_normalizations": [None, "a", float("nan"), -1.0, 3.0]})
    assert junk[:5].tolist() == [255.0, 255.0, 255.0, 255.0, 3.0]
    assert (feature_normalizations({}) == 255.0).all()
    policy = TokenPolicy(hidden_size=8, embed_size=4)
    policy.initialize_to_environment(make_info(extras={"feature_normalizations": [10.0]}), "cpu")
    assert policy.encoder.value_scale[0] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("space", "match"),
    [
        (gym.spaces.Box(0, 255, (12, 4), np.uint8), r"\(12, 4\)"),
        (gym.spaces.Box(0, 255, (36,), np.uint8), r"\(36,\)"),
        (gym.spaces.Box(0, 1, (12, 3), np.float32), "uint8"),
        (gym.spaces.Discrete(3), "Box observation space"),
    ],
)
def test_rejects_other_observation_spaces(space: gym.spaces.Space, match: str) -> None:
    info = PolicyEnvInfo(observation_space=space, action_space=gym.spaces.Discrete(2))
    with pytest.raises(ValueError, match=match):
        TokenPolicy().initialize_to_environment(info, "cpu")


@pytest.mark.parametrize(
    "kwargs", [{"core": "gru"}, {"pooling": "sum"}, {"embed_size": 10, "num_heads": 4, "pooling": "attention"}]
)
def test_rejects_bad_config(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"core|pooling|divisible"):
        TokenPolicy(**kwargs)


def test_registered_as_token_kind() -> None:
    policy = build_policy("token", hidden_size=8, core="none")
    assert isinstance(policy, TokenPolicy) and not policy.is_recurrent


def test_learns_action_from_single_token_feature() -> None:
    """The target action is the feature id of the one real token, wherever it sits and whatever its value."""
    policy = make_policy(seed=0, hidden_size=32, embed_size=16)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        obs = torch.full((n, 1, NUM_TOKENS, 3), 255, dtype=torch.uint8)
        slot = torch.randint(0, NUM_TOKENS, (n,), generator=gen)
        token = torch.stack(
            [
                torch.randint(0, 0xEF, (n,), generator=gen),
                torch.randint(0, 4, (n,), generator=gen),
                torch.randint(0, 256, (n,), generator=gen),
            ],
            dim=-1,
        ).to(torch.uint8)
        obs[torch.arange(n), 0, slot] = token
        return obs, token[:, 1].long().view(n, 1, 1)

    for _ in range(200):
        obs, target = batch(64)
        loss = -evaluate(policy, obs, target)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    obs, target = batch(512)
    memory = {key: torch.zeros(512, policy.hidden_size) for key in ("lstm_h", "lstm_c")}
    with torch.no_grad():
        chosen = policy(obs, no_starts(512, 1), memory=memory, deterministic=True).actions
    assert (chosen == target).float().mean() > 0.9


def test_distinct_token_max_pooling_matches_dense_max_pooling_and_its_gradients() -> None:
    from mettle.agent.token import TokenEncoder, padding_mask, trim_padding

    torch.manual_seed(0)
    tokens = torch.randint(0, 6, (64, 40, 3), dtype=torch.uint8)  # few distinct ids: many repeated tokens
    tokens[:, 30:] = 255  # padding tail
    tokens[:, 5, 0] = 255  # and padding between real tokens
    tokens[:3] = 255  # rows with no real token pool to zeros
    encoder = TokenEncoder(16, 32, "max", 4, 0)
    valid = padding_mask(tokens)
    ids, trimmed = trim_padding(tokens.long(), valid)
    dense = encoder.pool(encoder.embed(ids, trimmed), trimmed)
    distinct = max_pool_distinct(encoder, tokens, valid)
    torch.testing.assert_close(distinct, dense, rtol=0, atol=0)
    assert distinct[:3].abs().sum() == 0 and (dense[3:] > 0).any()
    params = [encoder.location_embed.weight, encoder.feature_bias.weight, encoder.feature_direction.weight]
    weights = torch.randn_like(dense)
    dense_grads = torch.autograd.grad((dense * weights).sum(), params)
    distinct_grads = torch.autograd.grad((distinct * weights).sum(), params)
    for got, want in zip(distinct_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_token_policy_compiles_its_encoder_and_keeps_values_and_gradients() -> None:
    torch._dynamo.reset()
    eager = make_policy(seed=1)
    compiled = copy.deepcopy(eager)
    compiled.compile_hot_path()
    assert isinstance(compiled, TokenPolicy)
    assert compiled.encoder._compiled_call_impl is not None and compiled._compiled_call_impl is None
    for num_valid in (5, 9):  # trimming changes the token count: one dynamic-shape graph serves both
        obs = random_tokens(6, 3, num_valid, seed=num_valid)
        actions = torch.randint(0, 4, (6, 3, 1), generator=torch.Generator().manual_seed(num_valid))
        memory = {key: torch.zeros(6, eager.hidden_size) for key in ("lstm_h", "lstm_c")}
        outputs = []
        for policy in (eager, compiled):
            policy.zero_grad()
            out = policy(obs, no_starts(6, 3), actions=actions, memory=memory)
            (out.log_prob.sum() + out.values.sum()).backward()
            outputs.append((out, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))
        (want, want_grads), (got, got_grads) = outputs
        torch.testing.assert_close(got.log_prob, want.log_prob, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-4)
        assert got_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("token_layers", [0, 1])
def test_static_encoder_path_gives_the_same_features(pooling: str, token_layers: int) -> None:
    """The export's path (every slot embedded, no shape from the data) pools as the default path does."""
    torch.manual_seed(0)
    encoder = TokenEncoder(16, 32, pooling, 4, token_layers)  # type: ignore[arg-type]
    tokens = random_tokens(6, 1, num_valid=9)[:, 0]
    tokens[0] = 255  # a row with no real token
    tokens[1, 3] = 255  # padding between real tokens
    torch.testing.assert_close(encoder(tokens, static=True), encoder(tokens), rtol=1e-6, atol=1e-6)
