"""Choices an agent type lacks get no probability, are never drawn, and carry no gradient, acting and scoring alike."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gymnasium.spaces import Box, Discrete

from mettle.agent.registry import build_policy, policy_for_environment, policy_from_spec, policy_spec
from mettle.contracts import INVALID_ACTIONS_KEY, PolicyEnvInfo
from mettle.rl.training.analytic import analytic_problem

ROWS = 10_000
SPEAKER_LACKS = np.array([[False, False, False, True, True], [False] * 5])
"""Type 0 (a speaker) has 3 choices of the union's 5; type 1 has all 5."""


def typed_observations(rows: int) -> torch.Tensor:
    """[rows, 1, 5]: three random features, then the type one-hot: first half type 0, second half type 1."""
    obs = torch.randn(rows, 1, 5, generator=torch.Generator().manual_seed(0))
    obs[:, 0, 3:] = 0.0
    obs[: rows // 2, 0, 3] = 1.0
    obs[rows // 2:, 0, 4] = 1.0
    return obs


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_masked_choices_are_never_drawn_and_scored_as_drawn(kind: str) -> None:
    torch.manual_seed(0)
    info = PolicyEnvInfo(Box(-5, 5, (5,)), Discrete(5), num_agents=2, extras={INVALID_ACTIONS_KEY: SPEAKER_LACKS})
    policy = build_policy(kind)
    policy.initialize_to_environment(info, "cpu")
    obs, starts = typed_observations(ROWS), torch.ones(ROWS, 1, dtype=torch.bool)
    with torch.no_grad():
        acted = policy(obs, starts)
    speaker, listener = acted.actions[: ROWS // 2], acted.actions[ROWS // 2:]
    assert speaker.max() < 3 and listener.max() == 4
    scored = policy(obs, starts, actions=acted.actions, memory=acted.memory or None)
    torch.testing.assert_close(scored.log_prob, acted.log_prob)
    assert scored.entropy[: ROWS // 2].max() <= math.log(3) + 1e-5 < scored.entropy[ROWS // 2:].max()
    scored.log_prob[: ROWS // 2].sum().backward()
    assert policy.actor_head.bias.grad is not None
    assert not policy.actor_head.bias.grad[3:].any() and policy.actor_head.bias.grad[:3].any()


def test_a_dormant_all_zero_row_is_left_unmasked_and_finite() -> None:
    info = PolicyEnvInfo(Box(-5, 5, (5,)), Discrete(5), num_agents=2, extras={INVALID_ACTIONS_KEY: SPEAKER_LACKS})
    policy = build_policy("mlp")
    policy.initialize_to_environment(info, "cpu")
    out = policy(torch.zeros(4, 1, 5), torch.ones(4, 1, dtype=torch.bool))
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.entropy).all()


def test_an_environment_without_invalid_choices_adds_no_mask() -> None:
    info = PolicyEnvInfo(Box(-5, 5, (5,)), Discrete(5), extras={INVALID_ACTIONS_KEY: np.zeros((2, 5), dtype=bool)})
    policy = build_policy("mlp")
    policy.initialize_to_environment(info, "cpu")
    assert policy.invalid_actions is None and "invalid_actions" not in policy.state_dict()


def masked_mlp() -> tuple[torch.nn.Module, PolicyEnvInfo]:
    info = PolicyEnvInfo(Box(-5, 5, (5,)), Discrete(5), num_agents=2, extras={INVALID_ACTIONS_KEY: SPEAKER_LACKS})
    policy = build_policy("mlp")
    policy.initialize_to_environment(info, "cpu")
    return policy, info


def test_the_table_travels_in_the_policy_spec_so_a_saved_policy_masks_without_the_environment() -> None:
    policy, _ = masked_mlp()
    spec = policy_spec(policy)
    assert spec[INVALID_ACTIONS_KEY] == SPEAKER_LACKS.tolist()
    rebuilt = policy_for_environment(json.loads(json.dumps(spec)), PolicyEnvInfo(Box(-5, 5, (5,)), Discrete(5)), "cpu")
    assert rebuilt.invalid_actions is not None and torch.equal(rebuilt.invalid_actions, policy.invalid_actions)
    with pytest.raises(ValueError, match=r"table \[2, 5\] does not fit 4 action choices and 5 observation features"):
        policy_for_environment(spec, PolicyEnvInfo(Box(-5, 5, (5,)), Discrete(4)), "cpu")


@pytest.mark.parametrize("damaged", [[], [[True], [True, False]], [["yes"]], "all", [[]]])
def test_a_damaged_table_in_a_spec_is_refused_in_one_line(damaged: object) -> None:
    with pytest.raises(ValueError, match=r"^policy spec 'invalid_actions' must be equal-length lists of true/false"):
        policy_from_spec({"class": "mlp", INVALID_ACTIONS_KEY: damaged})


def test_the_hand_written_gradient_stands_aside_for_masked_heads() -> None:
    policy, _ = masked_mlp()
    assert "masks the choices" in str(analytic_problem(policy, []))
