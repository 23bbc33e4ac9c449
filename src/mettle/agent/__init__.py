"""Policies: the actor-critic contract and the built-in MLP and LSTM implementations."""

from mettle.agent.lstm import LSTMPolicy
from mettle.agent.mlp import MLPPolicy
from mettle.agent.policy import Policy, PolicyOutput, TensorSpec
from mettle.agent.registry import build_policy, policy_from_spec, policy_spec, register_policy

__all__ = [
    "LSTMPolicy",
    "MLPPolicy",
    "Policy",
    "PolicyOutput",
    "TensorSpec",
    "build_policy",
    "policy_from_spec",
    "policy_spec",
    "register_policy",
]
