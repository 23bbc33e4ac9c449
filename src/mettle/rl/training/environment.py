"""The environment contract, re-exported where a reader of the seed looks for `TrainingEnvironment`."""

from mettle.contracts import (
    BatchInfo,
    EnvBatch,
    EnvStateError,
    PolicyEnvInfo,
    TrainingEnvironment,
    check_all_rows,
    random_actions,
)

__all__ = [
    "BatchInfo",
    "EnvBatch",
    "EnvStateError",
    "PolicyEnvInfo",
    "TrainingEnvironment",
    "check_all_rows",
    "random_actions",
]
