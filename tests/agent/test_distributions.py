"""The sampler draws exactly from the heads' probabilities, reproducibly, and acting leaves the entropy for later."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from mettle.agent.distributions import MultiCategorical, act, sample
from mettle.agent.policy import PolicyOutput

DRAWS = 200_000


@pytest.mark.parametrize("nvec", [(2,), (7,), (5, 5), (3, 1, 6)])
def test_sample_frequencies_pass_a_chi_square_test_per_head(nvec: tuple[int, ...]) -> None:
    logits = torch.linspace(-3.0, 2.0, sum(nvec)).roll(2)
    samples = MultiCategorical(logits.expand(DRAWS, -1), nvec).sample(torch.Generator().manual_seed(3))
    for head, chunk in enumerate(logits.split(list(nvec))):
        counts = torch.bincount(samples[:, head], minlength=chunk.numel())
        assert counts.numel() == chunk.numel(), "an action outside the head was drawn"
        if chunk.numel() == 1:
            continue
        probs = chunk.double().softmax(-1).numpy()
        p_value = stats.chisquare(counts.double().numpy(), probs / probs.sum() * DRAWS).pvalue
        assert p_value > 1e-3, (head, counts, probs)


def test_a_wrong_sampler_fails_the_same_test() -> None:
    """The test above can fail: a sampler off by 1% in one action's probability is caught."""
    logits = torch.tensor([0.0, 1.0, -0.5])
    probs = logits.double().softmax(-1)
    biased = probs + torch.tensor([0.01, -0.01, 0.0], dtype=torch.float64)
    draws = torch.multinomial(biased, DRAWS, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=3).double().numpy()
    assert stats.chisquare(counts, probs.numpy() * DRAWS).pvalue < 1e-3


def test_padding_of_uneven_heads_is_never_drawn_even_where_logits_are_extreme() -> None:
    nvec = (2, 5)
    logits = torch.tensor([30.0, -30.0, -50.0, -50.0, 40.0, -50.0, -50.0]).expand(50_000, -1)
    samples = MultiCategorical(logits, nvec).sample(torch.Generator().manual_seed(0))
    assert int(samples[:, 0].max()) <= 1 and int(samples[:, 1].max()) <= 4
    assert bool((samples[:, 1] == 2).all())


def test_sampling_is_reproducible_from_the_generator_and_the_global_seed() -> None:
    logits = torch.randn(64, 1, 9)
    dist = MultiCategorical(logits, (4, 5))
    assert torch.equal(dist.sample(torch.Generator().manual_seed(7)), dist.sample(torch.Generator().manual_seed(7)))
    torch.manual_seed(11)
    first = act(logits, (4, 5), None)[0]
    torch.manual_seed(11)
    assert torch.equal(first, act(logits, (4, 5), None)[0])


def test_log_prob_and_entropy_of_one_head_keep_the_batch_shape() -> None:
    logits = torch.randn(6, 1, 3)
    dist = MultiCategorical(logits, (3,))
    actions = dist.sample()
    assert actions.shape == (6, 1, 1) and dist.log_prob(actions).shape == (6, 1) and dist.entropy().shape == (6, 1)
    torch.testing.assert_close(dist.log_prob(actions), logits.log_softmax(-1).gather(-1, actions)[..., 0])
    torch.testing.assert_close(dist.entropy(), torch.distributions.Categorical(logits=logits).entropy())


def test_acting_defers_the_entropy_until_it_is_read() -> None:
    logits = torch.randn(5, 2, 7)
    actions, log_prob, entropy = act(logits, (3, 4), None)
    assert callable(entropy) and not isinstance(entropy, torch.Tensor)
    output = PolicyOutput(actions, log_prob, entropy, torch.zeros(5, 2))
    want = MultiCategorical(logits, (3, 4)).entropy()
    torch.testing.assert_close(output.entropy, want)
    assert output.entropy is output.entropy  # computed once
    scored = act(logits, (3, 4), actions)[2]
    assert isinstance(scored, torch.Tensor)  # scoring given actions (training) computes it at once
    torch.testing.assert_close(scored, want)


@pytest.mark.parametrize("nvec", [(3,), (4, 4), (2, 5)])
def test_the_acting_sampler_draws_what_multicategorical_draws(nvec: tuple[int, ...]) -> None:
    logits = torch.randn(32, 2, sum(nvec))
    actions, log_prob, entropy = sample(logits, nvec, torch.Generator().manual_seed(5))
    dist = MultiCategorical(logits, nvec)
    assert torch.equal(actions, dist.sample(torch.Generator().manual_seed(5)))
    torch.testing.assert_close(log_prob, dist.log_prob(actions))
    torch.testing.assert_close(entropy(), dist.entropy())
