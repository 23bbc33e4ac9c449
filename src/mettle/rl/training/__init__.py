"""The parts the Trainer coordinates, importable from one place."""

from mettle.rl.training.checkpointer import ContextCheckpointer
from mettle.rl.training.component import TrainerCallback, TrainerComponent
from mettle.rl.training.context import ComponentContext, EpochStats, TrainerState
from mettle.rl.training.core import CoreTrainingLoop
from mettle.rl.training.distributed import DistributedHelper
from mettle.rl.training.environment import BatchInfo, EnvBatch, PolicyEnvInfo, TrainingEnvironment
from mettle.rl.training.experience import Experience

__all__ = [
    "BatchInfo",
    "ComponentContext",
    "ContextCheckpointer",
    "CoreTrainingLoop",
    "DistributedHelper",
    "EnvBatch",
    "EpochStats",
    "Experience",
    "PolicyEnvInfo",
    "TrainerCallback",
    "TrainerComponent",
    "TrainerState",
    "TrainingEnvironment",
]
