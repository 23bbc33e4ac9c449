"""Trainer checkpoints: the policy files (`mettle.rl.policy_files`) plus the trainer's state, written atomically.

A checkpoint directory is staged, fsynced and renamed into place; restore verifies it, falls back past damaged
ones (moving them to damaged/) and applies the newest usable one to the live trainer.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from mettle.files import atomic_write, fsync_dir
from mettle.rl.policy_files import (
    POLICY_SPEC,
    POLICY_WEIGHTS,
    CheckpointError,
    brief,
    check_finite,
    check_weights_fit,
    list_checkpoints,
    one_line,
    open_checkpoint_file,
    read_weights,
    resolve_checkpoint_dir,
    save_policy,
    verify_manifest,
    write_manifest,
)
from mettle.rl.training.component import TrainerComponent
from mettle.rl.training.rng import rng_state, set_rng_state

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
DAMAGED_DIR = "damaged"
"""Where restore moves damaged checkpoints: out of the listing, so pruning never counts them."""


def optimizer_tensors(saved: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The per-parameter tensors of an optimizer state dict, named `optimizer.state.<index>.<field>`.

    Only that layout is walked (no recursion into a hostile file's nesting); a malformed one fails the fit checks.
    """
    slots = saved.get("state") if isinstance(saved, dict) else None
    for index, slot in slots.items() if isinstance(slots, dict) else ():
        for field, value in slot.items() if isinstance(slot, dict) else ():
            if isinstance(value, torch.Tensor):
                yield f"optimizer.state.{brief(index)}.{field if str(field).isidentifier() else brief(field)}", value


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
        """What differs between ranks: RNG streams, the Collector's rollout state and the losses' update state."""
        ctx = self.context
        loop = None
        if ctx.rollouts is not None and ctx.core_loop is not None:
            loop = {**ctx.rollouts.state_dict(), **ctx.core_loop.state_dict()}
        return {"rng": rng_state(), "generator": ctx.generator.get_state(), "core_loop": loop}

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
        if mine["core_loop"] is not None and ctx.rollouts is not None and ctx.core_loop is not None:
            ctx.core_loop.load_state_dict(mine["core_loop"])
            ctx.rollouts.load_state_dict(mine["core_loop"])


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
    with open_checkpoint_file(path) as handle:
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
