"""`policy.share=false`: each agent type's rows are acted and scored by their own sub-policy, trained only on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.spaces import Box, Discrete

from mettle.agent.normalizer import batch_moments
from mettle.agent.per_type import PerTypePolicy
from mettle.agent.registry import build_policy, policy_spec
from mettle.contracts import INVALID_ACTIONS_KEY, PolicyEnvInfo
from mettle.rl.policy_files import load_policy, save_policy

ROWS = 2_000
SPEAKER_LACKS = np.array([[False, False, False, True, True], [False] * 5])
"""Type 0 (a speaker) has 3 choices of the union's 5; type 1 has all 5."""
INFO = PolicyEnvInfo(Box(-5, 5, (5,)), Discrete(5), num_agents=2,
                     extras={"agent_types": ("speaker", "listener"), INVALID_ACTIONS_KEY: SPEAKER_LACKS})


def typed_observations(rows: int, steps: int = 1) -> torch.Tensor:
    """[rows, steps, 5]: three random features, then the type one-hot: first half type 0, second half type 1."""
    obs = torch.randn(rows, steps, 5, generator=torch.Generator().manual_seed(0))
    obs[:, :, 3:] = 0.0
    obs[: rows // 2, :, 3] = 1.0
    obs[rows // 2:, :, 4] = 1.0
    return obs


def per_type(kind: str) -> PerTypePolicy:
    torch.manual_seed(0)
    policy = build_policy("per_type", kind=kind, types=2, hidden_size=16)
    assert isinstance(policy, PerTypePolicy)
    policy.initialize_to_environment(INFO, "cpu")
    return policy


def starts(rows: int, steps: int = 1) -> torch.Tensor:
    first = torch.zeros(rows, steps, dtype=torch.bool)
    first[:, 0] = True
    return first


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_a_loss_on_one_types_rows_trains_only_that_types_policy(kind: str) -> None:
    policy = per_type(kind)
    obs = typed_observations(ROWS, 4)
    acted = policy(obs, starts(ROWS, 4))
    scored = policy(obs, starts(ROWS, 4), actions=acted.actions, memory=acted.memory)
    loss = scored.log_prob[: ROWS // 2].sum() + scored.values[: ROWS // 2].sum() + scored.entropy[: ROWS // 2].sum()
    loss.backward()
    speaker, listener = policy.subpolicies
    assert all(p.grad is not None and p.grad.any() for p in speaker.parameters())
    assert all(p.grad is None or not p.grad.any() for p in listener.parameters())


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_each_rows_outputs_are_its_own_types_sub_policy_outputs_exactly(kind: str) -> None:
    policy = per_type(kind)
    obs, first = typed_observations(ROWS, 3), starts(ROWS, 3)
    with torch.no_grad():
        wrapped = policy(obs, first, deterministic=True)
        policy.reset_memory()
        own = [sub(obs, first, deterministic=True) for sub in policy.subpolicies]
    half = ROWS // 2
    for name in ("actions", "log_prob", "entropy", "values", "logits"):
        mine = torch.cat([getattr(own[0], name)[:half], getattr(own[1], name)[half:]])
        assert torch.equal(getattr(wrapped, name), mine), name
    assert not torch.equal(own[0].values[half:], own[1].values[half:]), "the two types' networks differ"


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_masked_choices_are_never_drawn(kind: str) -> None:
    policy = per_type(kind)
    with torch.no_grad():
        acted = policy(typed_observations(ROWS), starts(ROWS))
    speaker, listener = acted.actions[: ROWS // 2], acted.actions[ROWS // 2:]
    assert speaker.max() < 3 and listener.max() == 4


def test_lstm_memory_is_kept_per_type_and_round_trips() -> None:
    policy = per_type("lstm")
    assert policy.is_recurrent
    fields = {key for key in policy.get_agent_experience_spec() if key not in ("observations", "actions")}
    assert fields == {"type0.lstm_h", "type0.lstm_c", "type1.lstm_h", "type1.lstm_c"}
    obs = typed_observations(8, 3)
    with torch.no_grad():
        acted = policy(obs[:, :2], starts(8, 2))
        assert set(acted.memory) == fields
        saved = policy.memory_state()
        assert set(saved) == fields and not torch.equal(saved["type0.lstm_h"], saved["type1.lstm_h"])
        then = policy(obs[:, 2:], torch.zeros(8, 1, dtype=torch.bool), deterministic=True)
        policy.reset_memory()
        assert policy.memory_state() == {}
        policy.load_memory_state(saved)
        again = policy(obs[:, 2:], torch.zeros(8, 1, dtype=torch.bool), deterministic=True)
    assert torch.equal(then.values, again.values) and torch.equal(then.actions, again.actions)


def test_a_normaliser_is_the_wrappers_and_leaves_the_type_columns_raw_for_masking() -> None:
    policy = per_type("mlp")
    normalizer = policy.attach_observation_normalizer(5)
    assert all(sub.observation_normalizer is None for sub in policy.subpolicies)
    obs = typed_observations(ROWS)
    normalizer.merge(batch_moments(obs.view(ROWS, 5) + 3.0))  # standardised, the one-hot would read as no type
    with torch.no_grad():
        acted = policy(obs, starts(ROWS), deterministic=True)
        scaled = torch.cat([normalizer(obs.view(ROWS, 5))[:, :3], obs.view(ROWS, 5)[:, 3:]], dim=1).view(ROWS, 1, 5)
        speaker = policy.subpolicies[0](scaled, starts(ROWS), deterministic=True)
        sampled = policy(obs, starts(ROWS))
    assert torch.equal(acted.values[: ROWS // 2], speaker.values[: ROWS // 2])
    assert sampled.actions[: ROWS // 2].max() < 3
    assert [key for key in policy.state_dict() if "observation_normalizer" in key] == [
        "observation_normalizer.count", "observation_normalizer.mean", "observation_normalizer.m2"]


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_saved_and_rebuilt_through_the_registry_it_acts_identically(tmp_path: Path, kind: str) -> None:
    policy = per_type(kind)
    policy.attach_observation_normalizer(5)
    assert policy_spec(policy)["kwargs"] == {"kind": kind, "types": 2, **policy.subpolicies[0].constructor_kwargs()}
    save_policy(policy, INFO, tmp_path)
    rebuilt, _ = load_policy(tmp_path)
    assert isinstance(rebuilt, PerTypePolicy) and rebuilt.kind == kind and rebuilt.types == 2
    obs, first = typed_observations(64, 3), starts(64, 3)
    with torch.no_grad():
        policy.reset_memory()
        expected, got = policy(obs, first, deterministic=True), rebuilt(obs, first, deterministic=True)
    for name in ("actions", "log_prob", "values", "logits"):
        assert torch.equal(getattr(expected, name), getattr(got, name)), name


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "token"}, r"kind must be one of \['lstm', 'mlp'\]"),
    ({"types": 0}, r"types must be an integer in \[1, 1024\]"),
    ({"types": 10**9}, r"types must be an integer in \[1, 1024\]"),
])
def test_a_damaged_spec_is_refused_before_anything_is_built(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_policy("per_type", **kwargs)


def test_an_environment_with_another_number_of_types_is_refused() -> None:
    policy = build_policy("per_type", kind="mlp", types=3)
    with pytest.raises(ValueError, match="holds 3 sub-policies, and the environment has 2 agent types"):
        policy.initialize_to_environment(INFO, "cpu")
