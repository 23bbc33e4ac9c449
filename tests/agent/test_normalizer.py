"""Running observation statistics against numpy, their merges (batches, ranks), and the normaliser a policy owns."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from mettle.agent import LSTMPolicy, MLPPolicy, Policy, policy_from_spec, policy_spec
from mettle.agent.normalizer import (
    CLIP,
    EPSILON,
    ObservationNormalizer,
    batch_moments,
    empty_moments,
    merge_moments,
    moments_from_sums,
    shifted_sums,
)
from mettle.agent.token import TokenPolicy
from mettle.contracts import PolicyEnvInfo

FEATURES = 3


def stream(seed: int, rows: int) -> np.ndarray:
    """Features on different scales and far from zero, as raw observations are."""
    rng = np.random.default_rng(seed)
    return rng.normal([100.0, -3.0, 0.0], [5.0, 0.01, 40.0], size=(rows, FEATURES))


def assert_moments(moments, data: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """count, mean and population variance equal numpy's over `data`."""
    assert float(moments.count) == len(data)
    np.testing.assert_allclose(moments.mean.numpy(), data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.var.numpy(), data.var(axis=0), rtol=1e-9)


def test_batch_moments_are_numpys_mean_and_variance() -> None:
    data = stream(0, 257)
    assert_moments(batch_moments(torch.from_numpy(data)), data)
    assert float(batch_moments(torch.zeros(0, FEATURES)).count) == 0


def test_merging_batches_one_by_one_equals_the_whole_stream() -> None:
    data = stream(1, 300)
    running = empty_moments(FEATURES)
    for lo, hi in [(0, 1), (1, 1), (1, 40), (40, 41), (41, 300)]:  # an empty batch and one-row batches too
        running = merge_moments(running, batch_moments(torch.from_numpy(data[lo:hi])))
    assert_moments(running, data)


def test_two_ranks_summing_their_shifted_sums_equal_one_rank_seeing_both_streams() -> None:
    """What the all-reduce does: each rank's sums about the shared running mean, added, then turned back."""
    first, second = stream(2, 90), stream(3, 35)
    for shift in (torch.zeros(FEATURES, dtype=torch.float64), torch.tensor([99.0, -3.0, 1.0], dtype=torch.float64)):
        sums = shifted_sums(batch_moments(torch.from_numpy(first)), shift) + \
            shifted_sums(batch_moments(torch.from_numpy(second)), shift)
        assert_moments(moments_from_sums(sums, shift), np.concatenate([first, second]))
    empty = shifted_sums(empty_moments(FEATURES), torch.zeros(FEATURES, dtype=torch.float64))
    assert float(moments_from_sums(empty + empty, torch.zeros(FEATURES)).count) == 0, "no rank saw anything"


def test_the_normaliser_passes_input_through_until_it_has_statistics_then_standardises_and_clips() -> None:
    normalizer = ObservationNormalizer(FEATURES)
    x = torch.tensor([[250.0, -3.0, 5.0], [100.0, -2.5, -900.0]])
    assert torch.equal(normalizer(x), x), "count 0: nothing to apply yet"
    data = stream(4, 500)
    normalizer.merge(batch_moments(torch.from_numpy(data)))
    expected = np.clip((x.numpy() - data.mean(axis=0)) / np.sqrt(data.var(axis=0) + EPSILON), -CLIP, CLIP)
    np.testing.assert_allclose(normalizer(x).numpy(), expected, atol=1e-4)  # float32 input
    assert normalizer(x).abs().max() == CLIP, "far outliers are clipped"


def test_loaded_statistics_take_effect_at_once() -> None:
    """A checkpoint's (or the actor's received) statistics work out forward's offset and scale as they load."""
    trained = ObservationNormalizer(FEATURES)
    trained.merge(batch_moments(torch.from_numpy(stream(5, 64))))
    fresh = ObservationNormalizer(FEATURES)
    fresh.load_state_dict(trained.state_dict())
    x = torch.from_numpy(stream(6, 8)).float()
    assert torch.equal(fresh(x), trained(x))
    assert set(trained.state_dict()) == {"count", "mean", "m2"}, "only the statistics are saved"


def box_info(features: int = FEATURES) -> PolicyEnvInfo:
    return PolicyEnvInfo(gym.spaces.Box(-np.inf, np.inf, (features,), np.float32), gym.spaces.Discrete(2))


@pytest.mark.parametrize("cls", [MLPPolicy, LSTMPolicy])
def test_a_policy_reads_its_input_through_the_normaliser_and_its_spec_rebuilds_it(cls: type[Policy]) -> None:
    torch.manual_seed(0)
    plain = cls(hidden_size=8)  # type: ignore[call-arg]
    plain.initialize_to_environment(box_info(), "cpu")
    normalized = cls(hidden_size=8)  # type: ignore[call-arg]
    normalizer = normalized.attach_observation_normalizer(FEATURES)
    normalized.initialize_to_environment(box_info(), "cpu")
    normalized.load_state_dict({**plain.state_dict(), **{f"observation_normalizer.{k}": v for k, v in
                                                        normalizer.state_dict().items()}})
    normalizer.merge(batch_moments(torch.from_numpy(stream(7, 100))))
    obs = torch.from_numpy(stream(8, 6)).float().view(2, 3, FEATURES)
    starts = torch.zeros(2, 3, dtype=torch.bool)
    actions = torch.zeros(2, 3, 1, dtype=torch.int64)
    ours = normalized(obs, starts, actions=actions)
    theirs = plain(normalizer(obs.view(-1, FEATURES)).view(2, 3, FEATURES), starts, actions=actions)
    assert torch.equal(ours.log_prob, theirs.log_prob) and torch.equal(ours.values, theirs.values)

    spec = json.loads(json.dumps(policy_spec(normalized)))
    assert spec["observation_normalizer"] == {"features": FEATURES}
    assert "observation_normalizer" not in policy_spec(plain), "a spec without one is unchanged"
    clone = policy_from_spec(spec)
    clone.initialize_to_environment(box_info(), "cpu")
    clone.load_state_dict(normalized.state_dict())
    assert torch.equal(clone(obs, starts, actions=actions).log_prob, ours.log_prob)


@pytest.mark.parametrize("described", [True, {"features": 0}, {"features": "3"}, {"features": 3, "clip": 5}])
def test_a_damaged_normaliser_entry_in_a_spec_is_refused(described: object) -> None:
    with pytest.raises(ValueError, match="observation_normalizer"):
        policy_from_spec({"class": "mlp", "observation_normalizer": described})


def test_a_policy_that_does_not_read_the_normaliser_refuses_one() -> None:
    with pytest.raises(ValueError, match="TokenPolicy does not read its observations through normalize_observations"):
        TokenPolicy().attach_observation_normalizer(FEATURES)
