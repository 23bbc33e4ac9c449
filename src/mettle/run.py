"""A training run built from a RunConfig: the one place env, policy, Trainer and components are wired.

`mettle train`, bench/ and tests build runs here, so they all train the same thing. Components are
registered in callback order: tuners (schedules, autotuner), measurements (monitor, gradients,
evaluator, profiler), reporters (stats, progress, heartbeat), then the signal handler and the
checkpointer last, so that a checkpoint taken at an epoch end holds every other component's state
after that epoch. A run without a directory (bench, quick experiments) gets no component that writes
files: no stats, heartbeat, profiler, signal handler or checkpointer.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import ValidationError

from mettle.agent.policy import Policy
from mettle.agent.registry import build_policy
from mettle.config import ConfigError, RunConfig, fit_run_config, format_validation_error
from mettle.contracts import INVALID_ACTIONS_KEY, PolicyEnvInfo, TrainingEnvironment
from mettle.envs.factory import check_trusted_env_name, make_environment
from mettle.envs.spaces import byte_box_part
from mettle.errors import one_line
from mettle.files import NotRegularFileError, open_regular
from mettle.rl.loss import Loss
from mettle.rl.policy_files import CheckpointError, newest_usable_policy
from mettle.rl.trainer import Trainer
from mettle.rl.training import ContextCheckpointer, DistributedHelper, TrainerComponent
from mettle.rl.training.analytic import analytic_refusal
from mettle.rl.training.components.gradients import GradientReporter
from mettle.rl.training.components.heartbeat import Heartbeat
from mettle.rl.training.components.monitor import Monitor
from mettle.rl.training.components.profiler import TorchProfiler
from mettle.rl.training.components.progress import ProgressLogger
from mettle.rl.training.components.signals import GracefulShutdown
from mettle.rl.training.components.stats import StatsReporter
from mettle.rl.training.components.task_curriculum import TaskCurriculum
from mettle.rl.training.curriculum import Curriculum, CurriculumConfig

if TYPE_CHECKING:
    from mettagrid.config.mettagrid_config import MettaGridConfig

    from mettle.envs.mettagrid_families import TaskFamily

RESUME_FIXED = ("env.name", "env.kwargs", "env.num_envs", "env.normalize_observations", "env.normalize_rewards",
                "policy", "trainer.optimizer.type", "trainer.bptt_horizon")
"""Config keys a resumed run must keep: the checkpoint's weights (a normaliser's statistics among them), optimizer
state, episodes and reward statistics depend on them."""
NORMALIZATION_OPTIONS = ("normalize_observations", "normalize_rewards")


@dataclass
class Run:
    """A wired run, restored from its newest usable checkpoint when it has one; close() releases the env."""

    config: RunConfig
    """The config as trained: batch sizes the user left unset are fitted to the env's agent rows."""
    env: TrainingEnvironment
    policy: Policy
    trainer: Trainer
    run_dir: Path | None
    shutdown: GracefulShutdown | None
    """The signal handler (runs with a directory only): which signal, if any, stopped the run."""
    resumed_from: Path | None
    """The checkpoint restored, or None for a fresh start."""

    def close(self) -> None:
        """Release the environment's worker processes."""
        self.env.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def build_run(
    cfg: RunConfig,
    run_dir: Path | None = None,
    distributed: DistributedHelper | None = None,
    run_name: str | None = None,
    components: Sequence[TrainerComponent] = (),
    losses: Sequence[Loss] = (),
) -> Run:
    """Env, policy and Trainer with the config's losses (then `losses`) and components (then `components`),
    restored; bad input: ConfigError."""
    check_devices_present(cfg)
    check_normalization_env(cfg)
    check_activation_kind(cfg)
    family = task_family_of(cfg)
    env = make_environment(cfg.env, seed=cfg.trainer.seed)
    try:
        check_policy_share(cfg, env.policy_env_info)
        check_log_std_init(cfg, env.policy_env_info)
        cfg = fit_run_config(cfg, env.batch_info.num_rows)
        policy = policy_for_config(cfg, env.policy_env_info)
        if cfg.env.normalize_observations:
            attach_observation_normalizer(cfg, policy, env.policy_env_info)
        device = distributed.local_device(cfg.device) if distributed is not None else cfg.device
        try:
            trainer = Trainer(cfg.trainer, env, policy, device, distributed, run_name)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if cfg.env.normalize_observations and policy.observation_normalizer is None:
            raise ConfigError(f"env.normalize_observations=true: policy.kind={cfg.policy.kind} "
                              f"({type(policy).__name__}) does not read its observations through a normaliser; "
                              "use policy.kind=mlp or lstm, or drop env.normalize_observations")
        check_action_masking(cfg, policy, env.policy_env_info)
        if cfg.env.normalize_rewards:
            trainer.core_loop.normalize_rewards()
        for loss in losses:
            trainer.add_loss(loss)
        if not trainer.losses:
            raise ConfigError("no loss to train on: losses.ppo_actor, losses.ppo_critic and losses.kickstarter are "
                              "all disabled; enable one (e.g. losses.ppo_actor.enabled=true)")
        refusal = analytic_refusal(cfg.trainer.gradient, policy, trainer.losses)
        if refusal is not None:  # the trainer would refuse too, but only once train() starts
            raise ConfigError(refusal)
        curriculum = [curriculum_component(cfg, family)] if family is not None else []
        for component in (*curriculum, *config_components(cfg, trainer, run_dir), *components):
            trainer.register(component)
        shutdown = register_run_dir_guards(trainer, cfg, run_dir)
        try:
            resumed = trainer.restore()
        except CheckpointError as error:
            raise ConfigError(str(error)) from None
    except BaseException:
        env.close()
        raise
    return Run(cfg, env, policy, trainer, run_dir, shutdown, resumed)


def check_policy_share(cfg: RunConfig, env_info: PolicyEnvInfo) -> None:
    """`policy.share=false` needs agent types to split by, and a kind that masks each type's choices."""
    if cfg.policy.share:
        return
    if cfg.policy.kind == "token":
        raise ConfigError("policy.share=false: policy.kind=token is MettaGrid's policy, whose agents share one type; "
                          "use policy.kind=mlp or lstm, or drop policy.share=false")
    if not env_info.extras.get("agent_types"):
        raise ConfigError(f"policy.share=false needs agents that differ in spaces, and {cfg.env.name} has one agent "
                          "type: drop policy.share=false")


def check_log_std_init(cfg: RunConfig, env_info: PolicyEnvInfo) -> None:
    """`policy.log_std_init` sets a Gaussian head, so on discrete actions it is refused (the token policy refuses
    Box actions itself)."""
    value = cfg.policy.log_std_init
    if value and not env_info.continuous_actions:
        raise ConfigError(f"policy.log_std_init={value:g} sets the Gaussian head of Box actions, and {cfg.env.name} "
                          "has discrete actions: drop policy.log_std_init")


def check_activation_kind(cfg: RunConfig) -> None:
    """`policy.activation` chooses the mlp's hidden layers; the lstm and token policies have their own."""
    if cfg.policy.activation != "tanh" and cfg.policy.kind != "mlp":
        raise ConfigError(f"policy.activation={cfg.policy.activation} applies to policy.kind=mlp, and the policy is "
                          f"{cfg.policy.kind}: drop policy.activation or use policy.kind=mlp")


def policy_for_config(cfg: RunConfig, env_info: PolicyEnvInfo) -> Policy:
    """The policy `cfg.policy` asks for: one of `kind`, or with `share=false` one per agent type."""
    options: dict[str, Any] = {"hidden_size": cfg.policy.hidden_size}
    if cfg.policy.log_std_init and cfg.policy.kind != "token":  # token has no Gaussian head: it refuses a Box
        options["log_std_init"] = cfg.policy.log_std_init
    if cfg.policy.activation != "tanh":
        options["activation"] = cfg.policy.activation
    if cfg.policy.share:
        return build_policy(cfg.policy.kind, **options)
    types = len(env_info.extras["agent_types"])
    return build_policy("per_type", kind=cfg.policy.kind, types=types, **options)


def check_normalization_env(cfg: RunConfig) -> None:
    """Normalisation options on MettaGrid are refused in one line: its token policy scales each token feature
    itself, and its rewards are set by the game's config."""
    chosen = [name for name in NORMALIZATION_OPTIONS if getattr(cfg.env, name)]
    if chosen and cfg.env.name.startswith("mettagrid:"):
        raise ConfigError(f"env.{chosen[0]}=true: observation and reward normalisation are for Gymnasium and "
                          f"PettingZoo feature envs, and {cfg.env.name} gives MettaGrid tokens (the token policy "
                          f"scales each feature itself; rewards are set in the game config); drop env.{chosen[0]}")


def check_action_masking(cfg: RunConfig, policy: Policy, env_info: PolicyEnvInfo) -> None:
    """Agents whose action spaces differ need a policy that masks the choices each type lacks."""
    table = env_info.extras.get(INVALID_ACTIONS_KEY)
    if table is not None and np.any(table) and not policy.action_masking:
        raise ConfigError(f"{cfg.env.name}: agents differ in action spaces, and policy.kind={cfg.policy.kind} "
                          f"({type(policy).__name__}) cannot mask the choices an agent lacks; use policy.kind=mlp "
                          "or lstm")


def attach_observation_normalizer(cfg: RunConfig, policy: Policy, env_info: PolicyEnvInfo) -> None:
    """Give the policy its observation normaliser, sized to the env's features. Byte observations (images, tokens)
    are refused in one line: their scale is known, so the policy should divide by it. A policy that cannot read a
    normaliser gets none here: the Trainer first says what else it cannot serve, then build_run refuses it."""
    source = env_info.extras.get("observation_source", env_info.observation_space)
    found = byte_box_part(source)
    if found is not None:
        path, part = found
        where = f" at {'.'.join(map(str, path))}" if path else ""
        raise ConfigError(f"env.normalize_observations=true: {cfg.env.name} observations hold uint8 values{where} "
                          f"(shape {part.shape}: images or tokens), and running mean/variance normalisation is for "
                          "real-valued features; scale them in the policy (divide images by 255) or drop "
                          "env.normalize_observations")
    if policy.observation_normalization:
        policy.attach_observation_normalizer(int(np.prod(env_info.observation_space.shape or (), dtype=np.int64)))


def task_family_of(cfg: RunConfig) -> TaskFamily | None:
    """The MettaGrid task family the env names (None for one task); curriculum options without one are refused."""
    family = None
    if cfg.env.name.startswith("mettagrid:"):
        from mettle.envs.mettagrid_families import family_named  # mettagrid is imported only for its envs

        try:
            family = family_named(cfg.env.name.partition(":")[2])
        except ValueError as error:
            raise ConfigError(one_line(error)) from None
    changed = sorted(key for key, value in cfg.curriculum if value != CurriculumConfig.model_fields[key].default)
    if family is None and changed:
        raise ConfigError(f"curriculum.{changed[0]}={getattr(cfg.curriculum, changed[0])!r}: curriculum options "
                          f"apply to MettaGrid task families, and env.name={cfg.env.name!r} is one task; train a "
                          "family (--env mettagrid:arena-family, mettagrid:navigation-family or "
                          "mettagrid:<family>.yaml) or drop the curriculum.* overrides")
    return family


def curriculum_component(cfg: RunConfig, family: TaskFamily) -> TaskCurriculum:
    """The curriculum over `family`'s variants that the config asks for, seeded alike on every rank."""
    curriculum = Curriculum(cfg.curriculum, seed=cfg.trainer.seed, num_agents=family.num_agents)
    return TaskCurriculum(curriculum, family.buckets, family.bucket_labels(), seed=cfg.trainer.seed,
                          family=f"task family {family.name}")


def check_devices_present(cfg: RunConfig) -> None:
    """Refuse before anything starts when `device` or `trainer.actor_device` names a GPU this machine lacks."""
    for field, value in (("device", cfg.device), ("trainer.actor_device", cfg.trainer.actor_device)):
        problem = missing_device(value)
        if problem is not None:
            raise ConfigError(f"{field}={value}: {problem}; use {field}=cpu")


def missing_device(value: str | None) -> str | None:
    """Why this machine cannot use the device `value` names (cpu, cuda, cuda:N), or None when it can."""
    if value is None or not value.startswith("cuda"):
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(value.partition(":")[2] or 0)
    if index < count:
        return None
    return f"this machine has only {count} CUDA device(s)" if count else "this machine has no CUDA device torch can use"


def config_components(cfg: RunConfig, trainer: Trainer, run_dir: Path | None) -> list[TrainerComponent]:
    """The components the config switches on, in callback order; those that write files need a run dir."""
    master = trainer.context.distributed.is_master()
    optional: list[TrainerComponent | None] = [
        cfg.schedules.build(),
        cfg.autotuner.build(),
        Monitor(cfg.monitor.interval) if cfg.monitor.enabled else None,
        GradientReporter(cfg.gradients.interval, cfg.gradients.per_layer) if cfg.gradients.enabled else None,
        cfg.evaluator.build(evaluation_envs(cfg), seed=cfg.trainer.seed + 12345, suites=evaluation_suites(cfg),
                            replay_dir=run_dir / "replays" if run_dir is not None else None),
    ]
    if run_dir is not None:
        optional += [
            TorchProfiler(run_dir / "profiles", cfg.profiler.interval, cfg.profiler.record_shapes)
            if cfg.profiler.enabled else None,
            StatsReporter.from_config(cfg.stats, run_dir, trainer.context.run_name or run_dir.name,
                                      cfg.model_dump(mode="json")) if master else None,
        ]
    optional.append(ProgressLogger(interval_s=cfg.progress_interval_s))
    if run_dir is not None and cfg.heartbeat.enabled:
        optional.append(Heartbeat(run_dir / "heartbeat.json", cfg.heartbeat.interval))
    return [component for component in optional if component is not None]


def register_run_dir_guards(trainer: Trainer, cfg: RunConfig, run_dir: Path | None) -> GracefulShutdown | None:
    """Last: the signal handler, then the checkpointer (so a checkpoint holds the others' state after the epoch)."""
    if run_dir is None:
        return None
    shutdown = GracefulShutdown()
    trainer.register(shutdown)
    trainer.register(ContextCheckpointer(run_dir / "checkpoints", epoch_interval=cfg.checkpoint_interval))
    return shutdown


def evaluation_envs(cfg: RunConfig) -> dict[str, Callable[[], TrainingEnvironment]]:
    """Factories for the Evaluator: the training env and any extra ones, in-process, with the evaluator's size."""

    def factory(name: str) -> Callable[[], TrainingEnvironment]:
        kwargs = cfg.env.kwargs if name == cfg.env.name else {}
        env_cfg = cfg.env.model_copy(update={"name": name, "vectorization": "serial", "kwargs": kwargs})
        return lambda: make_environment(env_cfg, seed=cfg.trainer.seed + 777, num_envs=cfg.evaluator.num_envs)

    names = [cfg.env.name, *(name for name in cfg.evaluator.envs if name != cfg.env.name)]
    factories = {name: factory(name) for name in names}
    for name, config in held_out_variants(cfg):
        factories[name] = held_out_factory(name, config, cfg.evaluator.num_envs, cfg.trainer.seed + 777)
    return factories


def held_out_factory(name: str, config: MettaGridConfig, num_envs: int, seed: int) -> Callable[[], TrainingEnvironment]:
    """Builds one held-out variant's environment when the evaluator first uses it."""

    def build() -> TrainingEnvironment:
        from mettle.envs.mettagrid import MettaGridEnvironment

        return MettaGridEnvironment(config, num_envs=num_envs, seed=seed, name=name)

    return build


def held_out_variants(cfg: RunConfig) -> list[tuple[str, MettaGridConfig]]:
    """The evaluator's suite as (env name, config) pairs, e.g. `mettagrid:arena-heldout/big-map`; bad: ConfigError."""
    if cfg.evaluator.suite is None:
        return []
    from mettle.envs.mettagrid_families import load_suite

    try:
        suite = load_suite(cfg.evaluator.suite)
    except ValueError as error:
        raise ConfigError(f"evaluator.suite={cfg.evaluator.suite}: {one_line(error)}") from None
    return [(f"mettagrid:{suite.name}/{variant}", config) for variant, config in suite.variants]


def evaluation_suites(cfg: RunConfig) -> dict[str, list[str]]:
    """The evaluator's suite name -> its variants' env names, so it reports their mean too."""
    variants = [name for name, _ in held_out_variants(cfg)]
    return {variants[0].rpartition("/")[0]: variants} if variants else {}


def load_run_config(path: Path, typed_envs: Collection[str] = (), env_name: str | None = None) -> RunConfig:
    """The config.json of a run directory (or of the run holding a checkpoint directory), checked as untrusted input.

    Damage is one ConfigError line; env names that would import a module must be trusted or in `typed_envs`.
    `env_name` (eval's --env, typed) replaces the saved env, and its kwargs unless it is the same env; nothing
    else from the file is then imported, so nothing else is checked.
    """
    for candidate in (path, *path.parents[:3]):
        file = candidate / "config.json"
        if file.is_file() or file.is_symlink():
            cfg = read_config_file(file)
            if env_name is not None:
                kwargs = cfg.env.kwargs if env_name == cfg.env.name else {}
                return cfg.model_copy(update={"env": cfg.env.model_copy(update={"name": env_name, "kwargs": kwargs})})
            check_trusted_env_name(cfg.env.name, f"{file}: env.name", typed_envs)
            for name in cfg.evaluator.envs:
                check_trusted_env_name(name, f"{file}: evaluator.envs", typed_envs,
                                       remedy=f"pass evaluator.envs='[\"{name}\"]'")
            return cfg
    raise ConfigError(f"no config.json found at or above {path}")


def read_config_file(file: Path) -> RunConfig:
    """Parse and validate one config.json; a link, an unreadable, truncated or invalid file is one line."""
    restore = "restore it from a backup, or start a new run with another --run name"
    try:
        with open_regular(file) as handle:
            text = handle.read().decode()
    except NotRegularFileError as error:
        raise ConfigError(f"{error}; {restore}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {file}: {one_line(error)}; {restore}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ConfigError(f"{file} is damaged: not valid JSON ({one_line(error)}); {restore}") from None
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{file} is damaged: {format_validation_error(error)}; {restore}") from None


def check_resumable(saved: RunConfig, new: RunConfig) -> None:
    """Refuse to resume into another environment, policy architecture or optimizer."""
    old, cur = saved.model_dump(mode="json"), new.model_dump(mode="json")
    for key in RESUME_FIXED:
        before, after = old, cur
        for part in key.split("."):
            before, after = before[part], after[part]
        if before != after:
            raise ConfigError(
                f"cannot resume: {key} was {before!r} in the saved run, now {after!r}; "
                "start a new run with another --run name"
            )


def load_newest_policy(path: Path, device: str) -> tuple[Policy, PolicyEnvInfo, Path]:
    """The newest intact checkpoint's policy under `path` (or `path` itself), named on stderr; flaws are one line."""
    try:
        policy, env_info, used = newest_usable_policy(path, device)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    print(f"using checkpoint {used}", file=sys.stderr, flush=True)
    return policy, env_info, used
