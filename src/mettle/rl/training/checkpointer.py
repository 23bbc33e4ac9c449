"""Checkpoints on disk: policy weights (safetensors + rebuild JSON) and trainer state, written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mettle.rl.training.component import TrainerComponent
from mettle.rl.training.environment import PolicyEnvInfo

if TYPE_CHECKING:
    from mettle.agent.policy import Policy
    from mettle.rl.trainer import Trainer

logger = logging.getLogger(__name__)

POLICY_WEIGHTS = "policy.safetensors"
POLICY_SPEC = "policy.json"
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used."""


# ------------------------------------------------------------------ atomic files
def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write via a temp file in the same directory, fsync, then rename: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ spaces as JSON
def space_to_json(space: gym.spaces.Space) -> dict[str, Any]:
    """Describe a Box, Discrete or MultiDiscrete space in plain JSON."""
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "low": space.low.tolist(), "high": space.high.tolist(), "dtype": str(space.dtype)}
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": np.asarray(space.nvec).tolist()}
    raise ValueError(f"cannot describe observation/action space {space} in a checkpoint")


def space_from_json(data: dict[str, Any]) -> gym.spaces.Space:
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
def save_policy(policy: Policy, env_info: PolicyEnvInfo, directory: Path, **metadata: Any) -> None:
    """Write `policy.safetensors` and the JSON that says how to rebuild it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in policy.state_dict().items()}
    spec = {
        "policy": policy.rebuild_spec(),
        "observation_space": space_to_json(env_info.observation_space),
        "action_space": space_to_json(env_info.action_space),
        "num_agents": env_info.num_agents,
        **metadata,
    }
    atomic_write(directory / POLICY_WEIGHTS, lambda f: f.write(save_safetensors(tensors)))
    atomic_write(directory / POLICY_SPEC, lambda f: f.write(json.dumps(spec, indent=2).encode()))


def load_policy(directory: Path, device: torch.device | str = "cpu") -> tuple[Policy, PolicyEnvInfo]:
    """Rebuild a policy from `save_policy`'s files, without needing the environment."""
    from mettle.agent.registry import policy_from_spec

    directory = Path(directory)
    spec = json.loads((directory / POLICY_SPEC).read_text())
    env_info = PolicyEnvInfo(
        space_from_json(spec["observation_space"]), space_from_json(spec["action_space"]), spec["num_agents"]
    )
    policy = policy_from_spec(spec["policy"])
    policy.initialize_to_environment(env_info, device)
    policy.load_state_dict(load_safetensors((directory / POLICY_WEIGHTS).read_bytes()))
    return policy, env_info


# ------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain containers and tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


# ------------------------------------------------------------------ the component
class ContextCheckpointer(TrainerComponent):
    """Saves policy and trainer state every `epoch_interval` epochs and at the end; keeps the last few.

    Every rank has one (so every rank restores); only rank 0 writes. A checkpoint is built in a
    staging directory and renamed into place, so a directory named by its epoch is always complete.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike, epoch_interval: int = 10, keep_last: int = 3) -> None:
        super().__init__(epoch_interval)
        if keep_last < 1:
            raise ValueError(f"keep_last {keep_last} must be >= 1")
        self.directory = resolve_checkpoint_dir(Path(checkpoint_dir))
        self.keep_last = keep_last
        self._last_saved_epoch = -1
        self._trainer: Trainer | None = None

    def attach(self, trainer: Trainer) -> None:
        """Called by `Trainer.register`: the trainer's loop state goes into every checkpoint."""
        self._trainer = trainer

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
        return {
            "rng": rng_state(),
            "generator": self.context.generator.get_state(),
            "core_loop": self._trainer.core_loop.state_dict() if self._trainer is not None else None,
        }

    def _write(self, final: Path, per_rank: list[dict[str, Any]]) -> None:
        ctx = self.context
        staging = self.directory / f".staging-{final.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_policy(ctx.policy, ctx.env.policy_env_info, staging, agent_step=ctx.state.agent_step,
                    epoch=ctx.state.epoch)
        state = {**self._trainer_state(), "ranks": per_rank}
        atomic_write(staging / TRAINER_STATE, lambda f: torch.save(state, f))
        write_manifest(staging)
        os.replace(staging, final)
        fsync_dir(self.directory)

    def _trainer_state(self) -> dict[str, Any]:
        ctx = self.context
        return {
            "trainer": ctx.state.state_dict(),
            "optimizer": ctx.optimizer.state_dict(),
            "lr_scheduler": ctx.lr_scheduler.state_dict() if ctx.lr_scheduler is not None else None,
            "stopwatch": ctx.stopwatch.state_dict(),
            "components": {c.state_key: c.state_dict() for c in ctx.components if c is not self},
        }

    def _prune(self) -> None:
        for old in list_checkpoints(self.directory)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def restore(self, trainer: Trainer) -> Path | None:
        """Load the newest usable checkpoint; None (fresh start) when there is none.

        A damaged newest checkpoint is reported by name and the previous one is used; if checkpoints
        exist but none loads, CheckpointError is raised rather than silently starting over.
        """
        distributed = trainer.context.distributed
        problems: list[str] = []
        # Rank 0's listing, and a checkpoint only when every rank can read it: all ranks restore the same one.
        names = distributed.broadcast_from_master([p.name for p in list_checkpoints(self.directory)])
        for path in (self.directory / name for name in reversed(names)):
            try:
                state, weights = read_checkpoint(path)
            except CheckpointError as error:
                state, problem = None, str(error)
            if distributed.any_rank(state is None):
                problem = problem if state is None else f"{path} is unreadable on another rank"
                logger.warning("checkpoint %s is unusable, trying the previous one: %s", path, problem)
                problems.append(problem)
                continue
            self._apply(trainer, state, weights)
            return path
        if problems:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(problems))
        return None

    def _apply(self, trainer: Trainer, state: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        ctx = trainer.context
        ctx.policy.load_state_dict(weights)
        ctx.optimizer.load_state_dict(state["optimizer"])
        if ctx.lr_scheduler is not None and state["lr_scheduler"] is not None:
            ctx.lr_scheduler.load_state_dict(state["lr_scheduler"])
        ctx.state.load_state_dict(state["trainer"])
        ctx.stopwatch.load_state_dict(state["stopwatch"])
        self._apply_rank_state(trainer, state["ranks"])
        for component in trainer.components:
            if component.state_key in state["components"]:
                component.load_state_dict(state["components"][component.state_key])
        self._last_saved_epoch = ctx.state.epoch

    def _apply_rank_state(self, trainer: Trainer, ranks: list[dict[str, Any]]) -> None:
        rank, world = trainer.context.distributed.get_rank(), trainer.context.distributed.get_world_size()
        if len(ranks) != world:
            logger.warning("checkpoint was written by %d ranks, now %d: environments and RNG restart fresh",
                           len(ranks), world)
            return
        mine = ranks[rank]
        set_rng_state(mine["rng"])
        trainer.context.generator.set_state(mine["generator"])
        if mine["core_loop"] is not None:
            trainer.core_loop.load_state_dict(mine["core_loop"])


def resolve_checkpoint_dir(path: Path) -> Path:
    """Accept a run directory (holding `checkpoints/`) or the checkpoints directory itself."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() or (path / "config.json").exists() else path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, oldest first (staging directories are never listed)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def write_manifest(directory: Path) -> None:
    """Record every file's size and sha256, so damage after the write is detected on load."""
    files = {p.name: file_digest(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(files, indent=2).encode()))


def file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def verify_manifest(directory: Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file."""
    try:
        expected = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{directory}: missing or unreadable {MANIFEST} ({error})") from None
    for name, facts in expected.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if file_digest(path) != facts:
            raise CheckpointError(f"{path} is truncated or altered (size/sha256 differ from {MANIFEST})")


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Verified trainer state and policy weights of one checkpoint directory."""
    verify_manifest(path)
    state = load_trainer_state(path / TRAINER_STATE)
    try:
        weights = load_safetensors((path / POLICY_WEIGHTS).read_bytes())
    except Exception as error:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path / POLICY_WEIGHTS}: {error}") from None
    return state, weights


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Load trainer state with `weights_only=True`, so a file carrying code is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain containers ({first_line})"
        ) from None
    except Exception as error:  # truncated zip, EOF, bad magic...
        raise CheckpointError(f"cannot load {path}: {error}") from None
