"""Checkpoints on disk: policy weights (safetensors + rebuild JSON) and trainer state, written atomically."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mettle import errors
from mettle.files import atomic_write, fsync_dir
from mettle.rl.training.component import TrainerComponent
from mettle.rl.training.environment import PolicyEnvInfo

__all__ = ["CheckpointError", "ContextCheckpointer", "atomic_write", "fsync_dir", "list_checkpoints", "load_policy",
           "newest_usable_policy", "save_policy"]

if TYPE_CHECKING:
    from mettle.agent.policy import Policy

logger = logging.getLogger(__name__)

POLICY_WEIGHTS = "policy.safetensors"
POLICY_SPEC = "policy.json"
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
DAMAGED_DIR = "damaged"
"""Where restore moves damaged checkpoints: out of the listing, so pruning never counts them."""


def one_line(error: BaseException) -> str:
    """An exception as `Type: first line`, so every checkpoint error stays one line."""
    return errors.one_line(error, with_type=True, first_line=True)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; `reason` is a short slug that names its damaged/ directory."""

    def __init__(self, message: str, reason: str = "unusable") -> None:
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------ spaces as JSON
def space_to_json(space: gym.spaces.Space[Any]) -> dict[str, Any]:
    """Describe a Box, Discrete or MultiDiscrete space in plain JSON."""
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "low": space.low.tolist(), "high": space.high.tolist(), "dtype": str(space.dtype)}
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": np.asarray(space.nvec).tolist()}
    raise ValueError(f"cannot describe observation/action space {space} in a checkpoint")


def space_from_json(data: dict[str, Any]) -> gym.spaces.Space[Any]:
    """Inverse of `space_to_json`."""
    kind = data["type"]
    if kind == "Box":
        dtype = np.dtype(data["dtype"])
        return gym.spaces.Box(np.array(data["low"], dtype=dtype), np.array(data["high"], dtype=dtype), dtype=dtype)
    if kind == "Discrete":
        return gym.spaces.Discrete(data["n"], start=data.get("start", 0))
    if kind == "MultiDiscrete":
        return gym.spaces.MultiDiscrete(data["nvec"])
    raise CheckpointError(f"unknown space type {kind!r} in policy spec")


# ------------------------------------------------------------------ policy files
def save_policy(policy: Policy, env_info: PolicyEnvInfo, directory: Path, manifest: bool = True,
                **metadata: Any) -> None:
    """Write `policy.safetensors`, the JSON that says how to rebuild it and (unless the caller will) a manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # copies: parameters may be views of one buffer (FlatOptimizer), and safetensors refuses shared storage
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in policy.state_dict().items()}
    spec = {
        "policy": policy.rebuild_spec(),
        "observation_space": space_to_json(env_info.observation_space),
        "action_space": space_to_json(env_info.action_space),
        "num_agents": env_info.num_agents,
        **metadata,
    }
    atomic_write(directory / POLICY_WEIGHTS, lambda f: f.write(save_safetensors(tensors)))
    atomic_write(directory / POLICY_SPEC, lambda f: f.write(json.dumps(spec, indent=2).encode()))
    if manifest:
        write_manifest(directory, (POLICY_WEIGHTS, POLICY_SPEC))


def load_policy(directory: Path, device: torch.device | str = "cpu") -> tuple[Policy, PolicyEnvInfo]:
    """Rebuild a policy from `save_policy`'s files, without the environment; any flaw is one CheckpointError."""
    directory = Path(directory)
    policy, env_info = read_policy_spec(directory / POLICY_SPEC, device)
    weights = read_weights(directory / POLICY_WEIGHTS)
    check_weights_fit(policy, weights, directory / POLICY_WEIGHTS)
    policy.load_state_dict(weights)
    return policy, env_info


def read_policy_spec(path: Path, device: torch.device | str = "cpu") -> tuple[Policy, PolicyEnvInfo]:
    """An initialised (untrained) policy built from a policy.json; the spec names a registered class only."""
    from mettle.agent.registry import policy_from_spec

    try:
        spec = json.loads(path.read_text())
        action_space = space_from_json(spec["action_space"])
        if not isinstance(action_space, gym.spaces.Discrete | gym.spaces.MultiDiscrete):
            raise ValueError(f"action space {action_space} is neither Discrete nor MultiDiscrete")
        env_info = PolicyEnvInfo(space_from_json(spec["observation_space"]), action_space, int(spec["num_agents"]))
        policy = policy_from_spec(spec["policy"])
        policy.initialize_to_environment(env_info, device)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, CheckpointError) as error:
        raise CheckpointError(f"{path}: {one_line(error)}", "bad-spec") from None
    return policy, env_info


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a damaged header or a missing file is a CheckpointError."""
    try:
        return load_safetensors(path.read_bytes())
    except Exception as error:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path}: {one_line(error)}", "bad-weights") from None


def check_weights_fit(policy: Policy, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Same names and shapes as the policy's own, so loading cannot fail halfway or load a misfit."""
    expected = policy.state_dict()
    problems = [f"missing {name}" for name in expected if name not in weights]
    problems += [f"unexpected {name}" for name in weights if name not in expected]
    problems += [f"{name} is {tuple(weights[name].shape)}, the policy's {tuple(tensor.shape)}"
                 for name, tensor in expected.items() if name in weights and weights[name].shape != tensor.shape]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{source} does not fit the policy: {'; '.join(problems[:3])}{more}; it was written "
                              "for another architecture or environment", "does-not-fit")


def policy_candidates(path: Path) -> list[Path]:
    """Checkpoint directories newest first, or `path` itself when it is one checkpoint."""
    checkpoints = list_checkpoints(resolve_checkpoint_dir(path))
    if checkpoints:
        return checkpoints[::-1]
    if (path / POLICY_SPEC).exists() or (path / MANIFEST).exists():
        return [path]
    raise CheckpointError(f"{path} holds no checkpoint; pass a run directory made by `mettle train` "
                          "or one of its checkpoints/<epoch> directories", "missing")


def newest_usable_policy(path: Path, device: torch.device | str = "cpu") -> tuple[Policy, PolicyEnvInfo, Path]:
    """The newest checkpoint's policy whose manifest verifies and whose weights fit; skipped ones are named.

    Read-only (nothing is moved aside). When none is usable, only the one-line error is raised.
    """
    problems: list[str] = []
    for candidate in policy_candidates(Path(path)):
        try:
            verify_manifest(candidate)
            policy, env_info = load_policy(candidate, device)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        for problem in problems:
            logger.warning("skipping damaged checkpoint: %s", problem)
        return policy, env_info, candidate
    raise CheckpointError(f"no usable checkpoint in {path}: {len(problems)} damaged (newest: {problems[0]}); "
                          "evaluate another run or restore this one from a backup", "none")


# ------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain containers and tensors."""
    numpy_state = np.random.get_state()
    assert isinstance(numpy_state, tuple), "the global numpy generator is the legacy MT19937, whose state is a tuple"
    kind, keys, pos, has_gauss, gauss = numpy_state
    py_version, py_state, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any], throwaway: bool = False) -> None:
    """Inverse of `rng_state`; `throwaway` sets fresh generators instead, to check a state without using it."""
    py_version, py_state, py_gauss = state["python"]
    (random.Random() if throwaway else random).setstate((py_version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    (np.random.RandomState() if throwaway else np.random).set_state(
        (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    (torch.Generator() if throwaway else torch.default_generator).set_state(state["torch"])


# ------------------------------------------------------------------ the component
class ContextCheckpointer(TrainerComponent):
    """Saves policy and trainer state every `epoch_interval` epochs and at the end; keeps the last few.

    Every rank has one (so every rank restores); only rank 0 writes. A checkpoint is built in a
    staging directory and renamed into place, so a directory named by its epoch is always complete.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike[str], epoch_interval: int = 10, keep_last: int = 3) -> None:
        super().__init__(epoch_interval)
        if keep_last < 1:
            raise ValueError(f"keep_last {keep_last} must be >= 1")
        self.directory = resolve_checkpoint_dir(Path(checkpoint_dir))
        self.keep_last = keep_last
        self._last_saved_epoch = -1
        self.unclaimed: dict[str, dict[str, Any]] = {}
        """Component state from the restored checkpoint that no registered component has taken (yet)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Save on the interval."""
        self.save()

    def on_training_complete(self) -> None:
        """Always leave a checkpoint of the final state."""
        if self._last_saved_epoch != self.context.state.epoch:
            self.save()

    def save(self) -> Path | None:
        """Write a complete checkpoint for the current epoch (rank 0 only); prune older ones after."""
        ctx = self.context
        self._last_saved_epoch = ctx.state.epoch
        per_rank = ctx.distributed.all_gather_object(self._rank_state())
        final = self.directory / f"{ctx.state.epoch:08d}"
        if ctx.distributed.is_master() and not final.exists():
            self._write(final, per_rank)
            self._prune()
        ctx.distributed.synchronize()
        return final

    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: RNG streams and rollout progress (envs, held decisions, memory)."""
        core_loop = self.context.core_loop
        return {
            "rng": rng_state(),
            "generator": self.context.generator.get_state(),
            "core_loop": core_loop.state_dict() if core_loop is not None else None,
        }

    def _write(self, final: Path, per_rank: list[dict[str, Any]]) -> None:
        """Stage every file, then rename; a failed write (disk full...) removes the staging dir and re-raises."""
        ctx = self.context
        staging = self.directory / f".staging-{final.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            save_policy(ctx.policy, ctx.env.policy_env_info, staging, manifest=False,
                        agent_step=ctx.state.agent_step, epoch=ctx.state.epoch)
            state = {**self._trainer_state(), "ranks": per_rank}
            atomic_write(staging / TRAINER_STATE, lambda f: torch.save(state, f))
            write_manifest(staging)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(self.directory)

    def _trainer_state(self) -> dict[str, Any]:
        ctx = self.context
        return {
            "trainer": ctx.state.state_dict(),
            "optimizer": ctx.optimizer.state_dict(),
            "stopwatch": ctx.stopwatch.state_dict(),
            "components": {c.state_key: c.state_dict() for c in ctx.components if c is not self},
        }

    def _prune(self) -> None:
        for old in list_checkpoints(self.directory)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def restore(self) -> Path | None:
        """Load the newest usable checkpoint; None (fresh start) when there is none.

        A damaged or misfitting newer checkpoint is reported by name, moved to damaged/ and the previous one
        used; if checkpoints exist but none is usable, CheckpointError is raised rather than starting over.
        """
        distributed = self.context.distributed
        rejected: list[tuple[Path, CheckpointError]] = []
        # Rank 0's listing, and a checkpoint only when every rank can use it: all ranks restore the same one.
        names: list[str] = distributed.broadcast_from_master([p.name for p in list_checkpoints(self.directory)])
        for path in (self.directory / name for name in reversed(names)):
            try:
                state, weights = read_checkpoint(path)
                self._check_fits(state, weights, path)
                problem = None
            except CheckpointError as error:
                problem = error
            if distributed.any_rank(problem is not None):
                problem = problem or CheckpointError(f"{path} is unreadable on another rank", "other-rank")
                logger.warning("checkpoint %s is unusable, trying the previous one: %s", path, problem)
                rejected.append((path, problem))
                continue
            self._apply_checked(state, weights, path)
            self._set_aside(rejected)
            return path
        if rejected:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: "
                                  + "; ".join(str(problem) for _, problem in rejected)
                                  + f"; move them out of {self.directory} to start over, or restore a backup", "none")
        return None

    def _check_fits(self, state: Any, weights: dict[str, torch.Tensor], path: Path) -> None:
        """Everything that can be checked without touching the live trainer, so a misfit falls back cleanly."""
        ctx = self.context
        check_state_fields(state, path / TRAINER_STATE)
        check_weights_fit(ctx.policy, weights, path / POLICY_WEIGHTS)
        try:
            check_optimizer_state(ctx.optimizer, state["optimizer"])
            copy.deepcopy(ctx.state).load_state_dict(state["trainer"])
            type(ctx.stopwatch)().load_state_dict(state["stopwatch"])
            ranks, rank = state["ranks"], ctx.distributed.get_rank()
            if len(ranks) == ctx.distributed.get_world_size():
                set_rng_state(ranks[rank]["rng"], throwaway=True)
                torch.Generator(device=ctx.generator.device).set_state(ranks[rank]["generator"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
            raise CheckpointError(f"{path / TRAINER_STATE} does not fit this trainer: {one_line(error)}",
                                  "does-not-fit") from None

    def _apply_checked(self, state: dict[str, Any], weights: dict[str, torch.Tensor], path: Path) -> None:
        """Apply a checked checkpoint; a failure past the checks (component state) stops rather than half-resumes."""
        try:
            self._apply(state, weights)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
            raise CheckpointError(f"{path} passed its checks but failed to apply ({one_line(error)}); the trainer "
                                  f"is partly restored, so it stops: move {path} aside and retry",
                                  "apply-failed") from error

    def _set_aside(self, rejected: list[tuple[Path, CheckpointError]]) -> None:
        """Rank 0 moves the rejected checkpoints to damaged/, so their epochs are saved afresh and never pruned for."""
        if not rejected or not self.context.distributed.is_master():
            return
        damaged = self.directory / DAMAGED_DIR
        damaged.mkdir(exist_ok=True)
        for path, problem in rejected:
            target = damaged / f"{path.name}-{problem.reason}"
            suffix = 1
            while target.exists():
                suffix += 1
                target = damaged / f"{path.name}-{problem.reason}-{suffix}"
            os.replace(path, target)
            logger.warning("moved damaged checkpoint %s to %s", path, target)
        fsync_dir(self.directory)

    def _apply(self, state: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        """Load everything into the live trainer; component state waits in `unclaimed` for late registrations."""
        ctx = self.context
        ctx.policy.load_state_dict(weights)
        ctx.optimizer.load_state_dict(state["optimizer"])
        ctx.state.load_state_dict(state["trainer"])
        ctx.stopwatch.load_state_dict(state["stopwatch"])
        self._apply_rank_state(state["ranks"])
        self.unclaimed = {key: value for key, value in state["components"].items() if key != self.state_key}
        for component in ctx.components:
            self.hand_state_to(component)
        self._last_saved_epoch = ctx.state.epoch

    def hand_state_to(self, component: TrainerComponent) -> None:
        """Give a component its state from the restored checkpoint, if it has any (also when registered late)."""
        if component.state_key in self.unclaimed:
            component.load_state_dict(self.unclaimed.pop(component.state_key))

    def _apply_rank_state(self, ranks: list[dict[str, Any]]) -> None:
        ctx = self.context
        rank, world = ctx.distributed.get_rank(), ctx.distributed.get_world_size()
        if len(ranks) != world:
            logger.warning("checkpoint was written by %d ranks, now %d: environments and RNG restart fresh",
                           len(ranks), world)
            return
        mine = ranks[rank]
        set_rng_state(mine["rng"])
        ctx.generator.set_state(mine["generator"])
        if mine["core_loop"] is not None and ctx.core_loop is not None:
            ctx.core_loop.load_state_dict(mine["core_loop"])


def resolve_checkpoint_dir(path: Path) -> Path:
    """Accept a run directory (holding `checkpoints/`) or the checkpoints directory itself."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() or (path / "config.json").exists() else path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, oldest first (staging directories are never listed)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def write_manifest(directory: Path, names: tuple[str, ...] | None = None) -> None:
    """Record the size and sha256 of each file (`names`, or all), so damage after the write is detected on load."""
    paths = [directory / name for name in names] if names is not None else sorted(directory.iterdir())
    files = {p.name: file_digest(p) for p in paths if p.is_file() and p.name != MANIFEST}
    atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(files, indent=2).encode()))


def file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def verify_manifest(directory: Path, required: tuple[str, ...] = (POLICY_WEIGHTS, POLICY_SPEC)) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file, or a `required` one unlisted."""
    try:
        expected = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory}: missing or unreadable {MANIFEST} ({one_line(error)})",
                              "no-manifest") from None
    if not isinstance(expected, dict) or not all(isinstance(facts, dict) for facts in expected.values()):
        raise CheckpointError(f"{directory / MANIFEST} is not a manifest (name -> size and sha256)", "no-manifest")
    unlisted = [name for name in required if name not in expected]
    if unlisted:
        raise CheckpointError(f"{directory / MANIFEST} does not list {unlisted}", "no-manifest")
    for name, facts in expected.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing", "missing-file")
        if file_digest(path) != facts:
            raise CheckpointError(f"{path} is truncated or altered (size/sha256 differ from {MANIFEST})", "altered")


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Verified trainer state and policy weights of one checkpoint directory."""
    verify_manifest(path, (POLICY_WEIGHTS, POLICY_SPEC, TRAINER_STATE))
    return load_trainer_state(path / TRAINER_STATE), read_weights(path / POLICY_WEIGHTS)


STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "trainer": (dict,), "optimizer": (dict,), "stopwatch": (dict,), "components": (dict,), "ranks": (list,),
}
"""Older checkpoints also hold "lr_scheduler" (always None: nothing set one); it is ignored."""


def check_state_fields(state: Any, path: Path) -> None:
    """A trainer state holds every field `_trainer_state` writes, each of the right container type."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a trainer state dict", "does-not-fit")
    problems = [f"lacks {key!r}" for key in STATE_FIELDS if key not in state]
    problems += [f"{key!r} is a {type(state[key]).__name__}" for key, types in STATE_FIELDS.items()
                 if key in state and not isinstance(state[key], types)]
    if problems:
        raise CheckpointError(f"{path} is not a trainer state: {', '.join(problems)}", "does-not-fit")


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Group count, group sizes and per-parameter state shapes match, so loading cannot misfit silently.

    Every built-in optimizer keeps per-parameter tensors of the parameter's shape, or scalars (step).
    """
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(f"optimizer state has {len(saved_groups)} parameter groups, the optimizer {len(groups)}")
    params: dict[Any, torch.Tensor] = {}
    for index, (group, saved_group) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(saved_group["params"]) != len(group["params"]):
            raise ValueError(f"optimizer group {index} holds {len(saved_group['params'])} parameters, "
                             f"the optimizer's {len(group['params'])}")
        params.update(zip(saved_group["params"], group["params"], strict=True))
    for key, slot in saved["state"].items():
        if key not in params:
            raise ValueError(f"optimizer state for unknown parameter {key!r}")
        for field, value in slot.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != params[key].shape:
                raise ValueError(f"optimizer {field!r} of parameter {key} is {tuple(value.shape)}, "
                                 f"the parameter {tuple(params[key].shape)}")


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Load trainer state with `weights_only=True`, so a file carrying code is refused, never run."""
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain containers ({one_line(error)})",
            "refused-code",
        ) from None
    except Exception as error:  # truncated zip, EOF, bad magic...
        raise CheckpointError(f"cannot load {path}: {one_line(error)}", "unloadable-state") from None
    return state
