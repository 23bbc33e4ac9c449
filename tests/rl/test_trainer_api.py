"""The Trainer keeps exactly the seed's public surface (shared/seed/rl.trainer.md)."""

from __future__ import annotations

import enum
import importlib
import inspect
import typing
from typing import Any

import pytest
import torch

from mettle.agent.mlp import MLPPolicy
from mettle.agent.policy import Policy
from mettle.envs.testing import BanditEnvironment
from mettle.profiling.stopwatch import Stopwatch
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import OptimizerConfig, TrainerConfig
from mettle.rl.training import (
    ComponentContext,
    ContextCheckpointer,
    CoreTrainingLoop,
    DistributedHelper,
    Experience,
    TrainerCallback,
    TrainerComponent,
    TrainerState,
    TrainingEnvironment,
)
from mettle.rl.training.optimizer import FlatOptimizer, create_optimizer

REQUIRED = inspect.Parameter.empty
SEED_SIGNATURES: dict[str, list[tuple[str, Any, Any]]] = {
    "__init__": [("cfg", TrainerConfig, REQUIRED), ("env", TrainingEnvironment, REQUIRED),
                 ("policy", Policy, REQUIRED), ("device", Any, REQUIRED),
                 ("distributed_helper", DistributedHelper | None, None), ("run_name", str | None, None)],
    "train": [],
    "load_or_create": [("checkpoint_path", str, REQUIRED), ("cfg", TrainerConfig, REQUIRED),
                       ("training_env", TrainingEnvironment, REQUIRED), ("policy", Policy, REQUIRED),
                       ("device", Any, REQUIRED), ("distributed_helper", DistributedHelper | None, None),
                       ("run_name", str | None, None)],
    "register": [("component", TrainerComponent, REQUIRED)],
    "restore": [],
}
"""The seed's signatures (shared/seed/rl.trainer.md): (name, annotation, default) after `self`, `Optional[X] = ...`
read as `X | None = None`. Return types are left out: the seed's `-> Any` may become the real types."""


def seed_method(name: str) -> Any:
    """The plain function behind a Trainer method or static method."""
    raw = inspect.getattr_static(Trainer, name)
    return raw.__func__ if isinstance(raw, staticmethod) else raw


@pytest.mark.parametrize("name", sorted(SEED_SIGNATURES))
def test_method_parameters_match_the_seed(name: str) -> None:
    function = seed_method(name)
    params = list(inspect.signature(function).parameters.values())
    if name != "load_or_create":
        assert params[0].name == "self", name
        params = params[1:]
    hints = typing.get_type_hints(function)
    actual = [(p.name, hints.get(p.name, Any), p.default) for p in params]
    assert actual == SEED_SIGNATURES[name]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params), "callable as the seed calls it"


def test_load_or_create_is_static_and_context_is_a_property() -> None:
    assert isinstance(inspect.getattr_static(Trainer, "load_or_create"), staticmethod)
    context = inspect.getattr_static(Trainer, "context")
    assert isinstance(context, property) and context.fset is None
    assert typing.get_type_hints(context.fget)["return"] is ComponentContext, "seed: context(self) -> ComponentContext"


SEED_IMPORTS = [
    ("mettle.agent.policy", "Policy"),
    ("mettle.profiling.stopwatch", "Stopwatch"),
    ("mettle.rl.trainer_config", "TrainerConfig"),
    *[("mettle.rl.training", name) for name in (
        "ComponentContext", "ContextCheckpointer", "CoreTrainingLoop", "DistributedHelper", "Experience",
        "TrainerCallback", "TrainerComponent", "TrainerState", "TrainingEnvironment")],
    ("mettle.rl.training.optimizer", "create_optimizer"),
]
"""Where a reader of the seed looks for each name it imports (metta.X -> mettle.X), per DESIGN.md."""


@pytest.mark.parametrize(("module", "name"), SEED_IMPORTS, ids=[f"{m}.{n}" for m, n in SEED_IMPORTS])
def test_seed_imports_resolve(module: str, name: str) -> None:
    """Each name resolves where the seed imports it from: a class, except the optimizer factory."""
    value = getattr(importlib.import_module(module), name)
    assert inspect.isfunction(value) if name == "create_optimizer" else inspect.isclass(value)


def test_seed_names_are_the_classes_the_trainer_uses() -> None:
    """A live trainer's parts are instances of the classes at the seed's import paths; callbacks are hooks."""
    env, policy = BanditEnvironment(num_envs=2), MLPPolicy()
    cfg = TrainerConfig(total_timesteps=64, batch_size=32, minibatch_size=16, bptt_horizon=4)
    trainer = Trainer(cfg, env, policy, "cpu")
    ctx = trainer.context
    assert isinstance(ctx, ComponentContext) and ctx.config is cfg and ctx.policy is policy and ctx.env is env
    assert isinstance(env, TrainingEnvironment) and inspect.isabstract(TrainingEnvironment)
    assert isinstance(policy, Policy) and issubclass(Policy, torch.nn.Module) and inspect.isabstract(Policy)
    assert isinstance(ctx.state, TrainerState) and isinstance(ctx.experience, Experience)
    assert isinstance(ctx.stopwatch, Stopwatch) and isinstance(ctx.distributed, DistributedHelper)
    assert isinstance(trainer.core_loop, CoreTrainingLoop)
    assert isinstance(ctx.optimizer, torch.optim.Optimizer)
    assert isinstance(ctx.optimizer, FlatOptimizer)  # the Trainer flattened the policy's parameters, explicitly
    sgd = create_optimizer(OptimizerConfig(type="sgd", learning_rate=0.125), policy)
    assert type(sgd) is torch.optim.SGD  # the seed's call: a plain optimizer, the policy left as it was
    assert sgd.param_groups[0]["lr"] == 0.125
    assert issubclass(ContextCheckpointer, TrainerComponent)
    assert issubclass(TrainerCallback, enum.Enum)
    assert {c.name for c in TrainerCallback} == {"STEP", "ROLLOUT_END", "EPOCH_END", "TRAINING_COMPLETE", "FAILURE"}
    for callback in TrainerCallback:
        assert callable(getattr(TrainerComponent, callback.value)), callback


def test_design_map_names_resolve() -> None:
    from mettle.envs.vector import VectorEnvironment, VectorizedTrainingEnvironment
    from mettle.rl.training.environment import TrainingEnvironment

    assert VectorizedTrainingEnvironment is VectorEnvironment and issubclass(VectorEnvironment, TrainingEnvironment)
