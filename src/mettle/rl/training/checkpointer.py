"""Checkpoints on disk: policy weights (safetensors + rebuild JSON) and trainer state, written atomically."""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import stat
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mettle import errors
from mettle.agent.layers import check_size
from mettle.files import atomic_write, fsync_dir, is_plain_name
from mettle.rl.training.component import TrainerComponent
from mettle.rl.training.environment import PolicyEnvInfo

__all__ = ["CheckpointError", "ContextCheckpointer", "atomic_write", "fsync_dir", "list_checkpoints", "load_policy",
           "newest_intact_checkpoint", "newest_usable_policy", "save_policy"]

if TYPE_CHECKING:
    from mettle.agent.policy import Policy

logger = logging.getLogger(__name__)

POLICY_WEIGHTS = "policy.safetensors"
POLICY_SPEC = "policy.json"
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
DAMAGED_DIR = "damaged"
"""Where restore moves damaged checkpoints: out of the listing, so pruning never counts them."""
MANIFEST_LIMIT = 1 << 20
"""Largest manifest.json read (ours hold three entries of about 100 bytes)."""
SPEC_LIMIT = 64 << 20
"""Largest policy.json read: it bounds what the spaces' bounds arrays can allocate."""
HASH_BLOCK = 1 << 20
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_OBSERVATION_ELEMENTS = 1 << 24
"""Largest observation a policy spec may describe (a 4096x4096 RGB frame is 0.05e9): more is damage."""
MAX_ACTIONS = 1 << 20
"""Most actions (logits, summed over the heads of a MultiDiscrete) a policy spec may describe."""
MAX_ACTION_HEADS = 1024
MAX_AGENTS = 1 << 20
BOX_DTYPE_KINDS = "iuf"
"""Box dtypes a spec may name: signed, unsigned and floating numbers, at most 8 bytes each."""
LISTINGS = 4
"""How often a reader re-lists the checkpoints when one it was reading is pruned by the live run."""
PRUNE_GRACE_S = 0.05
"""Wait before deciding whether a checkpoint that lost a file is being pruned (rmtree unlinks files first)."""
FILE_KINDS = {stat.S_IFLNK: "symlink", stat.S_IFIFO: "FIFO", stat.S_IFDIR: "directory", stat.S_IFSOCK: "socket",
              stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}


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
    """Inverse of `space_to_json`; every size is bounded before anything is allocated (the JSON is data from disk)."""
    kind = data["type"]
    if kind == "Box":
        return box_from_json(data)
    if kind == "Discrete":
        start = check_size("Discrete start", data.get("start", 0), -(1 << 62), 1 << 62)
        return gym.spaces.Discrete(check_size("Discrete n", data["n"], 1, MAX_ACTIONS), start=start)
    if kind == "MultiDiscrete":
        return gym.spaces.MultiDiscrete(action_counts(data["nvec"]))
    raise CheckpointError(f"unknown space type {brief(kind)} in policy spec")


def box_from_json(data: dict[str, Any]) -> gym.spaces.Box:
    """A Box of a plain number dtype whose bounds have at most MAX_OBSERVATION_ELEMENTS elements."""
    dtype = np.dtype(data["dtype"])
    if dtype.kind not in BOX_DTYPE_KINDS or dtype.itemsize > 8:
        raise ValueError(f"Box dtype {brief(data['dtype'])} is not an integer or float type of at most 8 bytes")
    for key in ("low", "high"):
        if (elements := nested_size(data[key])) > MAX_OBSERVATION_ELEMENTS:
            raise ValueError(f"Box {key} has {elements:,} elements, more than the {MAX_OBSERVATION_ELEMENTS:,} "
                             "an observation may have")
    return gym.spaces.Box(np.array(data["low"], dtype=dtype), np.array(data["high"], dtype=dtype), dtype=dtype)


def action_counts(nvec: Any) -> np.ndarray:
    """A MultiDiscrete nvec of at most MAX_ACTION_HEADS counts, each >= 1, together at most MAX_ACTIONS."""
    if not 1 <= nested_size(nvec) <= MAX_ACTION_HEADS:
        raise ValueError(f"MultiDiscrete nvec must hold 1 to {MAX_ACTION_HEADS} counts, got {brief(nvec)}")
    counts = np.asarray(nvec)
    if counts.dtype.kind not in "iu" or counts.size == 0 or counts.min() < 1 or counts.sum() > MAX_ACTIONS:
        raise ValueError(f"MultiDiscrete nvec must be integers >= 1 that sum to at most {MAX_ACTIONS:,}, "
                         f"got {brief(nvec)}")
    return counts


def nested_size(value: Any) -> int:
    """Elements a nested JSON list holds, from its first entries (a ragged one numpy refuses later); 1 for a scalar."""
    size = 1
    while isinstance(value, list):
        size *= len(value)
        if not value:
            break
        value = value[0]
    return size


def brief(value: Any) -> str:
    """`repr(value)`, shortened: a hostile file's values must not make an error message long."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


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
    """An initialised (untrained) policy built from a policy.json; the spec names a registered class only.

    Spaces, agent count and the policy's size are bounded before the policy is built, so a hostile spec is
    refused in milliseconds instead of allocating gigabytes.
    """
    from mettle.agent.registry import policy_for_environment

    text = read_limited(path, SPEC_LIMIT)
    try:
        spec = json.loads(text)
        action_space = space_from_json(spec["action_space"])
        if not isinstance(action_space, gym.spaces.Discrete | gym.spaces.MultiDiscrete):
            raise ValueError(f"action space {action_space} is neither Discrete nor MultiDiscrete")
        num_agents = check_size("num_agents", spec["num_agents"], 1, MAX_AGENTS)
        env_info = PolicyEnvInfo(space_from_json(spec["observation_space"]), action_space, num_agents)
        policy = policy_for_environment(spec["policy"], env_info, device)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError,
            CheckpointError) as error:
        raise CheckpointError(f"{path}: {one_line(error)}", "bad-spec") from None
    return policy, env_info


WEIGHTS_LIMIT = 8 << 30
"""Largest policy.safetensors read: MAX_PARAMETERS (mettle.agent.registry) float64 values."""


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Finite tensors of a safetensors file; a damaged header, a missing file or NaN/inf values: CheckpointError."""
    data = read_limited(path, WEIGHTS_LIMIT)
    try:
        weights: dict[str, torch.Tensor] = load_safetensors(data)
    except Exception as error:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path}: {one_line(error)}", "bad-weights") from None
    check_finite(weights.items(), path)
    return weights


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: Path) -> None:
    """NaN or inf in a floating tensor is damage: such weights verify, yet poison whatever uses or learns from them."""
    for name, tensor in tensors:
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: {name} holds NaN or infinite values (the run had diverged or the file "
                                  "was altered); use an earlier checkpoint", "not-finite")


def optimizer_tensors(saved: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The per-parameter tensors of an optimizer state dict, named `optimizer.state.<index>.<field>`.

    Only that layout is walked (no recursion into a hostile file's nesting); a malformed one fails the fit checks.
    """
    slots = saved.get("state") if isinstance(saved, dict) else None
    for index, slot in slots.items() if isinstance(slots, dict) else ():
        for field, value in slot.items() if isinstance(slot, dict) else ():
            if isinstance(value, torch.Tensor):
                yield f"optimizer.state.{brief(index)}.{field if str(field).isidentifier() else brief(field)}", value


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

    Read-only (nothing is moved aside). A checkpoint that a live run prunes while it is read is not damage: it
    is passed over silently and the listing read again, so a newer one is found. When none is usable, only the
    one-line error is raised.
    """
    path = Path(path)
    damaged: dict[Path, str] = {}
    for _ in range(LISTINGS):
        found, pruned = first_usable(policy_candidates(path), damaged, device)
        if found is not None:
            for problem in damaged.values():
                logger.warning("skipping damaged checkpoint: %s", problem)
            return found
        if not pruned:
            break
    if not damaged:
        raise CheckpointError(f"every checkpoint in {path} was pruned while it was read (the run is still writing "
                              "newer ones); try again", "pruned")
    newest = next(iter(damaged.values()))
    raise CheckpointError(f"no usable checkpoint in {path}: {len(damaged)} damaged (newest: {newest}); "
                          "evaluate another run or restore this one from a backup", "none")


def first_usable(candidates: list[Path], damaged: dict[Path, str], device: torch.device | str,
                 ) -> tuple[tuple[Policy, PolicyEnvInfo, Path] | None, bool]:
    """The first candidate not yet known damaged that loads, else None; and whether one vanished (was pruned)
    while it was read, which stops the walk so that the caller re-lists. Damaged ones are added to `damaged`."""
    for candidate in candidates:
        if candidate in damaged:
            continue
        try:
            verify_manifest(candidate)
            policy, env_info = load_policy(candidate, device)
        except CheckpointError as error:
            if was_pruned(candidate, error):
                logger.debug("checkpoint %s was pruned while it was read", candidate)
                return None, True
            damaged[candidate] = str(error)
            continue
        return (policy, env_info, candidate), False
    return None, False


def was_pruned(candidate: Path, error: CheckpointError) -> bool:
    """Whether a checkpoint that failed has since been removed (a live run pruned it): gone, not damaged."""
    if error.reason in ("missing-file", "no-manifest") and candidate.exists():
        time.sleep(PRUNE_GRACE_S)  # shutil.rmtree unlinks the files, then the directory
    return not candidate.exists()


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
        if staging.is_symlink() or staging.is_file():  # never write through a link left where staging goes
            staging.unlink()
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
                if not path.exists():  # removed while read (by hand: the run lock keeps other trainers out)
                    logger.warning("checkpoint %s disappeared while it was read; trying the previous one", path)
                    continue
                rejected.append((path, problem or CheckpointError(f"{path} is unreadable on another rank",
                                                                  "other-rank")))
                continue
            self._apply_checked(state, weights, path)
            self._set_aside(rejected)
            return path
        if rejected:
            damage_only = all(problem.reason not in ("does-not-fit", "other-rank") for _, problem in rejected)
            start_over = "start over with --fresh (which moves the run's files aside)" if damage_only \
                else "train this configuration under another --run name"
            raise CheckpointError(f"no usable checkpoint in {self.directory}: {len(rejected)} unusable (newest: "
                                  f"{rejected[0][1]}); restore one from a backup, or {start_over}", "none")
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
            try:
                os.replace(path, target)
            except FileNotFoundError:  # removed meanwhile: nothing left to set aside
                continue
            logger.warning("checkpoint %s is unusable (%s); moved it to %s and resumed from an older one",
                           path, problem, target)
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
    """Raise CheckpointError naming the first missing, truncated or altered file, or a `required` one unlisted.

    Every entry is checked to be a plain file name before any listed file is opened, and each is opened only
    as a regular file inside `directory` (never through a symlink, never a FIFO or device).
    """
    expected = read_manifest(directory)
    unlisted = [name for name in required if name not in expected]
    if unlisted:
        raise CheckpointError(f"{directory / MANIFEST} does not list {unlisted}", "no-manifest")
    for name, facts in expected.items():
        check_file(directory / name, facts)


def read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """The manifest's entries, each a plain file name with {"size": int, "sha256": 64 hex digits}."""
    try:
        expected = json.loads(read_limited(directory / MANIFEST, MANIFEST_LIMIT))
    except (CheckpointError, ValueError, RecursionError) as error:
        cause = str(error) if isinstance(error, CheckpointError) else one_line(error)
        raise CheckpointError(f"{directory}: missing or unreadable {MANIFEST} ({cause})", "no-manifest") from None
    if not isinstance(expected, dict) or not all(isinstance(facts, dict) for facts in expected.values()):
        raise CheckpointError(f"{directory / MANIFEST} is not a manifest (name -> size and sha256)", "no-manifest")
    for name, facts in expected.items():
        check_entry(directory, name, facts)
    return expected


def check_entry(directory: Path, name: str, facts: dict[str, Any]) -> None:
    """A manifest names files inside its checkpoint only, with exactly the facts `write_manifest` records."""
    if not is_plain_name(name):
        raise CheckpointError(f"{directory / MANIFEST} lists {brief(name)}, which is not a file name inside the "
                              "checkpoint (a path, '..' or empty); it was not opened", "bad-manifest")
    size, digest = facts.get("size"), facts.get("sha256")
    if (set(facts) != {"size", "sha256"} or type(size) is not int or size < 0
            or not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest)):
        raise CheckpointError(f"{directory / MANIFEST}: the entry for {brief(name)} is {brief(facts)}, not "
                              '{"size": bytes, "sha256": 64 hex digits}', "bad-manifest")


def check_file(path: Path, facts: dict[str, Any]) -> None:
    """Size (from fstat, so a huge file is never hashed for nothing), then the sha256, match the manifest."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size != facts["size"]:
            raise CheckpointError(f"{path} is truncated or altered ({size} bytes, {MANIFEST} says {facts['size']})",
                                  "altered")
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
    if digest.hexdigest() != facts["sha256"]:
        raise CheckpointError(f"{path} is truncated or altered (sha256 differs from {MANIFEST})", "altered")


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[IO[bytes]]:
    """Open a checkpoint file to read, refusing a symlink, FIFO, device or directory (which may block or never end).

    lstat first, so such a file is never opened; then O_NOFOLLOW and fstat, in case it was swapped meanwhile.
    """
    try:
        kind = stat.S_IFMT(os.lstat(path).st_mode)
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC) \
            if kind == stat.S_IFREG else -1
    except OSError as error:
        raise open_error(path, error) from None
    with contextlib.ExitStack() as cleanup:
        if descriptor >= 0:
            cleanup.callback(os.close, descriptor)
            kind = stat.S_IFMT(os.fstat(descriptor).st_mode)
        if kind != stat.S_IFREG:
            raise CheckpointError(f"{path} is a {FILE_KINDS.get(kind, 'special file')}, not a regular file; a "
                                  "checkpoint holds plain files only", "not-a-file")
        cleanup.pop_all()
    with os.fdopen(descriptor, "rb") as handle:
        yield handle


def open_error(path: Path, error: OSError) -> CheckpointError:
    """Why `path` could not be opened, as the CheckpointError that names it."""
    if error.errno == errno.ENOENT:
        return CheckpointError(f"{path} is missing", "missing-file")
    if error.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink that replaced the file after lstat
        return CheckpointError(f"{path} is a symlink, not a regular file; a checkpoint holds plain files only",
                               "not-a-file")
    return CheckpointError(f"cannot read {path}: {one_line(error)}", "unreadable")


def read_limited(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refused (unread) when it is larger than `limit`."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        data = handle.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise CheckpointError(f"{path} is {max(size, len(data)):,} bytes, more than the {limit:,} such a file may "
                              "have", "too-large")
    return data


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Verified trainer state and policy weights of one checkpoint directory; weights and optimizer state finite."""
    verify_manifest(path, (POLICY_WEIGHTS, POLICY_SPEC, TRAINER_STATE))
    state = load_trainer_state(path / TRAINER_STATE)
    weights = read_weights(path / POLICY_WEIGHTS)
    if isinstance(state, dict):
        check_finite(optimizer_tensors(state.get("optimizer")), path / TRAINER_STATE)
    return state, weights


def newest_intact_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint under `directory` that verifies and loads (read-only: nothing is moved); None if none.

    What a resume would start from, short of the checks that need the trainer (architecture and optimizer fit).
    """
    for path in reversed(list_checkpoints(resolve_checkpoint_dir(Path(directory)))):
        try:
            state, _ = read_checkpoint(path)
            check_state_fields(state, path / TRAINER_STATE)
        except CheckpointError:
            continue
        return path
    return None


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
    with open_regular(path) as handle:
        check_stored_only(handle, path)
        try:
            state: dict[str, Any] = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated zip, EOF, bad magic... or the refusal (an UnpicklingError)
            if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
                raise CheckpointError(f"{path} was refused: it holds objects other than tensors and plain containers"
                                      f"{refused_global(error)}, so it was not loaded", "refused-code") from None
            raise CheckpointError(f"cannot load {path}: {one_line(error)}", "unloadable-state") from None
    return state


def check_stored_only(handle: IO[bytes], path: Path) -> None:
    """torch.save never compresses: a compressed entry could inflate a small file into gigabytes, so it is damage."""
    try:
        with zipfile.ZipFile(handle) as archive:
            packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"cannot load {path}: not a torch.save archive ({one_line(error)})",
                              "unloadable-state") from None
    finally:
        handle.seek(0)
    if packed:
        raise CheckpointError(f"{path} holds compressed entries ({brief(packed[0])}), which torch.save never writes; "
                              "it was not loaded", "unloadable-state")


def refused_global(error: BaseException) -> str:
    """` (it names X)` for the first global the weights-only loader refused, so the message says what was found."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return f" (it names {match.group(1)[:80]})" if match else ""
