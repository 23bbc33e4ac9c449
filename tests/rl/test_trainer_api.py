"""The Trainer keeps exactly the seed's public surface (shared/seed/rl.trainer.md)."""

from __future__ import annotations

import inspect

from mettle.rl.trainer import Trainer

SEED_SIGNATURES = {
    "__init__": ["self", "cfg", "env", "policy", "device", "distributed_helper", "run_name"],
    "train": ["self"],
    "load_or_create": ["checkpoint_path", "cfg", "training_env", "policy", "device", "distributed_helper",
                       "run_name"],
    "register": ["self", "component"],
    "restore": ["self"],
}


def test_method_parameters_match_the_seed() -> None:
    for name, expected in SEED_SIGNATURES.items():
        params = inspect.signature(inspect.getattr_static(Trainer, name).__func__
                                   if isinstance(inspect.getattr_static(Trainer, name), staticmethod)
                                   else getattr(Trainer, name)).parameters
        assert list(params) == expected, name


def test_optional_arguments_default_to_none() -> None:
    for name in ("__init__", "load_or_create"):
        params = inspect.signature(getattr(Trainer, name)).parameters
        assert params["distributed_helper"].default is None
        assert params["run_name"].default is None
        required = [p for p in params.values() if p.default is inspect.Parameter.empty]
        assert "distributed_helper" not in [p.name for p in required]


def test_load_or_create_is_static_and_context_is_a_property() -> None:
    assert isinstance(inspect.getattr_static(Trainer, "load_or_create"), staticmethod)
    assert isinstance(inspect.getattr_static(Trainer, "context"), property)


def test_seed_imports_resolve() -> None:
    from mettle.agent.policy import Policy
    from mettle.profiling.stopwatch import Stopwatch
    from mettle.rl.trainer_config import TrainerConfig
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
    from mettle.rl.training.optimizer import create_optimizer

    assert {c.name for c in TrainerCallback} == {"STEP", "ROLLOUT_END", "EPOCH_END", "TRAINING_COMPLETE", "FAILURE"}
    assert all([Policy, Stopwatch, TrainerConfig, ComponentContext, ContextCheckpointer, CoreTrainingLoop,
                DistributedHelper, Experience, TrainerComponent, TrainerState, TrainingEnvironment,
                create_optimizer])


def test_design_map_names_resolve() -> None:
    from mettle.envs.vector import VectorEnvironment, VectorizedTrainingEnvironment
    from mettle.rl.training.environment import TrainingEnvironment

    assert VectorizedTrainingEnvironment is VectorEnvironment and issubclass(VectorEnvironment, TrainingEnvironment)
