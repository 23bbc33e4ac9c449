"""TrainerConfig.torch_compile: the same training as eager, and an early, clear error without a compiler."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from mettle.agent.mlp import MLPPolicy
from mettle.envs.gymnasium import GymnasiumEnvironment
from mettle.envs.testing import BanditEnvironment
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig


@pytest.fixture(autouse=True)
def fresh_compiler_state() -> Iterator[None]:
    """One torch thread, compiled randomness drawn from torch's own generator (as eager draws it), clean caches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graph counts and breaks of earlier tests' compiles
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def train_bandit(torch_compile: bool) -> tuple[Trainer, MLPPolicy]:
    """Two epochs on the bandit, eager or compiled, from the same seed."""
    cfg = TrainerConfig(total_timesteps=2 * 64, batch_size=64, minibatch_size=32, bptt_horizon=4, update_epochs=2,
                        seed=3, torch_compile=torch_compile)
    policy = MLPPolicy(hidden_size=16)
    trainer = Trainer(cfg, BanditEnvironment(num_envs=4), policy, "cpu")
    trainer.train()
    return trainer, policy


def test_compiled_mlp_policy_trains_exactly_like_eager() -> None:
    eager_trainer, eager = train_bandit(torch_compile=False)
    compiled_trainer, compiled = train_bandit(torch_compile=True)
    assert compiled._compiled_call_impl is not None and eager._compiled_call_impl is None
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] > 0  # the compiled graph really ran
    assert not counters["graph_break"], f"the policy's forward should compile whole: {dict(counters['graph_break'])}"
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=f"{name} differs after compiled training")
    eager_actions = eager_trainer.context.experience.buffers["actions"]
    assert torch.equal(compiled_trainer.context.experience.buffers["actions"], eager_actions)


def test_compiled_mlp_policy_trains_cartpole_with_inductors_own_randomness() -> None:
    cfg = TrainerConfig(total_timesteps=2 * 64, batch_size=64, minibatch_size=32, bptt_horizon=4, torch_compile=True)
    policy = MLPPolicy(hidden_size=16)
    with GymnasiumEnvironment("CartPole-v1", 8) as env, torch._inductor.config.patch(fallback_random=False):
        trainer = Trainer(cfg, env, policy, "cpu")  # the default above: compiled code draws its own numbers
        trainer.train()
    assert trainer.context.state.agent_step == 2 * 64
    assert not torch._dynamo.utils.counters["graph_break"]
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_torch_compile_without_a_cpp_compiler_fails_before_training() -> None:
    cfg = TrainerConfig(total_timesteps=64, batch_size=64, minibatch_size=32, bptt_horizon=4, torch_compile=True)
    no_compiler = torch._inductor.config.patch({"cpp.cxx": ("no-such-c++-compiler",)})
    with no_compiler, pytest.raises(ValueError, match=r"needs a C\+\+ compiler.*torch_compile=false"):
        Trainer(cfg, BanditEnvironment(num_envs=4), MLPPolicy(), "cpu")
