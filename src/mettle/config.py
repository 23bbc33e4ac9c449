"""RunConfig: what `mettle train` resolves and writes to config.json (env, policy, trainer, run)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mettle.agent.layers import MAX_WIDTH
from mettle.errors import ConfigError

__all__ = ["ConfigError", "EnvConfig", "PolicyConfig", "RunConfig", "build_run_config", "fit_run_config"]
from mettle.rl.trainer_config import DEFER_SIZE_CHECK, TrainerConfig, check_device_name, fit_sizes_to_rows
from mettle.rl.training.components.autotuner import AutotunerConfig
from mettle.rl.training.components.evaluator import EvaluatorConfig
from mettle.rl.training.components.gradients import GradientConfig
from mettle.rl.training.components.heartbeat import HeartbeatConfig
from mettle.rl.training.components.monitor import MonitorConfig
from mettle.rl.training.components.profiler import ProfilerConfig
from mettle.rl.training.components.scheduler import SchedulesConfig
from mettle.rl.training.components.stats import StatsConfig
from mettle.rl.training.curriculum import CurriculumConfig


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class EnvConfig(_Config):
    """Which environment to train on and how it is vectorised."""

    name: str = "gym:CartPole-v1"
    """mettagrid:<task or config file>, gym:<registered id>, or pettingzoo:<module>:<callable>."""
    num_envs: int = Field(8, gt=0, le=4096)
    """Environment instances stepped together (per rank)."""
    vectorization: Literal["serial", "multiprocess", "gymnasium_sync", "gymnasium_async"] = "serial"
    """serial: in this process (a Gymnasium id's own vectorised class where it has one, e.g. CartPole, else
    SyncVectorEnv); multiprocess: mettle's shared-memory workers; gymnasium_sync/async: Gymnasium's
    Sync/AsyncVectorEnv over single envs."""
    num_workers: int = Field(1, gt=0, le=1024)
    """Worker processes for multiprocess vectorisation (num_envs must divide evenly)."""
    async_factor: int = Field(1, gt=0, le=16)
    """Groups of workers stepped in turn, so env stepping overlaps policy inference (1: no overlap)."""
    worker_timeout_s: float = Field(30.0, gt=0, le=3600)
    """Seconds a multiprocess env worker may take to answer before the run fails naming it."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the environment constructor."""
    normalize_observations: bool = False
    """Standardise each observation feature by its running mean and variance over the live observations of every
    rank's rollouts, clipped to +-10: the statistics live in the policy's weights (evaluation and play apply them)
    and are updated once per epoch, after the update. Float features only (Gymnasium and PettingZoo)."""
    normalize_rewards: bool = False
    """Divide the rewards PPO trains on by the running standard deviation of each row's discounted return
    (trainer.advantage.gamma), clipped to +-10; reported episode returns stay the environment's own."""


class PolicyConfig(_Config):
    """Which policy architecture to build."""

    kind: Literal["mlp", "lstm", "token"] = "mlp"
    """mlp: feed-forward; lstm: recurrent (BPTT over bptt_horizon); token: MettaGrid token encoder + LSTM."""
    hidden_size: int = Field(64, gt=0, le=MAX_WIDTH)
    """Width of hidden layers (and of the LSTM state)."""
    log_std_init: float = Field(0.0, ge=-20.0, le=20.0)
    """Initial log standard deviation of the Gaussian head of Box actions (0: std 1); mlp and lstm policies only."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Hidden-layer activation of the mlp policy (and of per-type mlp policies)."""
    share: bool = True
    """false: one policy of `kind` per agent type (agents that differ in spaces), each trained only on its own
    type's rows, all in one update."""


class RunConfig(_Config):
    """Everything one training run needs; saved as the run's config.json."""

    env: EnvConfig = Field(default_factory=EnvConfig)
    """Environment."""
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """Policy architecture."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    """Trainer hyperparameters."""
    device: str = "cpu"
    """Torch device (cpu, or cuda: under torchrun each rank takes the GPU of its LOCAL_RANK)."""
    global_batch: bool = False
    """Treat trainer.batch_size and minibatch_size as totals over all ranks (each rank gets its share)."""
    torch_threads: int = Field(1, ge=0, le=256)
    """Intra-op threads for torch (0: torch's default); small policies run fastest on one."""
    checkpoint_interval: int = Field(50, gt=0)
    """Epochs between checkpoints (one is always written at the end)."""
    progress_interval_s: float = Field(5.0, gt=0)
    """Seconds between progress updates (dashboard refreshes on a terminal, plain lines otherwise)."""
    stats: StatsConfig = Field(default_factory=StatsConfig)
    """Metrics to TensorBoard, metrics.jsonl and optionally Weights & Biases."""
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)
    """Periodic evaluation episodes (off by default)."""
    schedules: SchedulesConfig = Field(default_factory=SchedulesConfig)
    """Learning-rate, entropy and clip schedules over agent steps (none by default)."""
    autotuner: AutotunerConfig = Field(default_factory=AutotunerConfig)
    """update_epochs tuned from approx-KL and clip fraction (off by default)."""
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig)
    """heartbeat.json in the run dir, rewritten every epoch (on by default)."""
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    """CPU, memory and GPU memory sampling (off by default)."""
    gradients: GradientConfig = Field(default_factory=GradientConfig)
    """Gradient norm, mean and variance per epoch (off by default)."""
    profiler: ProfilerConfig = Field(default_factory=ProfilerConfig)
    """torch.profiler traces every N epochs (off by default)."""
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    """How a MettaGrid task family's variants are chosen (learning progress by default); task families only."""

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        """A device Mettle trains on (whether this machine has it is checked when the run is built)."""
        return check_device_name(value, "device")


def parse_value(text: str) -> Any:
    """Read an override's value as JSON when it parses (numbers, booleans, lists), else as a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted `key=value` pairs in a config dict; keys not under env/policy/run go to `trainer`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. trainer.batch_size=4096)")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        if path[0] not in RunConfig.model_fields and path[0] in TrainerConfig.model_fields:
            path = ["trainer", *path]
        _set_path(data, RunConfig, path, parse_value(raw), key)
    return data


def _set_path(data: dict[str, Any], model: type[BaseModel], path: list[str], value: Any, key: str) -> None:
    name, rest = path[0], path[1:]
    fields = model.model_fields
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
        raise ConfigError(f"unknown config key {key!r}{hint}")
    if not rest:
        data[name] = value
        return
    sub = fields[name].annotation
    if isinstance(sub, type) and issubclass(sub, BaseModel):
        _set_path(data.setdefault(name, {}), sub, rest, value, key)
    elif sub is not None and "dict" in str(sub):
        data.setdefault(name, {})[".".join(rest)] = value
    else:
        raise ConfigError(f"config key {key!r}: {name!r} has no sub-keys")


def format_validation_error(error: ValidationError) -> str:
    """One line naming each bad field, its value and what is expected."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    return "invalid config: " + "; ".join(parts)


def build_run_config(
    overrides: list[str], base: dict[str, Any] | None = None, defaults: Sequence[str] = ()
) -> RunConfig:
    """Validate base, then `defaults` (a recipe), then the user's overrides, raising a one-line ConfigError.

    The batch-size rules wait for `fit_run_config`, which knows the env's agent rows; only the trainer fields in
    `base` or `overrides` count as set (`model_fields_set`), so sizes from defaults may be fitted to the rows.
    """
    start = json.loads(json.dumps(base or {}))
    data = apply_overrides(apply_overrides(json.loads(json.dumps(start)), list(defaults)), overrides)
    try:
        cfg = RunConfig.model_validate(data, context={DEFER_SIZE_CHECK: True})
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None
    explicit = set(start.get("trainer", {})) | set(apply_overrides({}, overrides).get("trainer", {}))
    trainer = TrainerConfig.model_construct(_fields_set=explicit, **dict(cfg.trainer))
    return cfg.model_copy(update={"trainer": trainer})


def fit_run_config(cfg: RunConfig, num_rows: int) -> RunConfig:
    """cfg with the batch sizes the user did not set fitted to the env's `num_rows`; ConfigError if set ones can't."""
    try:
        trainer = fit_sizes_to_rows(cfg.trainer, num_rows, cfg.trainer.model_fields_set)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return cfg if trainer is cfg.trainer else cfg.model_copy(update={"trainer": trainer})
