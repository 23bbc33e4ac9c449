"""A policy on disk: its weights (safetensors), the JSON that rebuilds it, and the manifest that vouches for both.

Everything read here is data from disk: sizes are bounded before anything is allocated, files are opened only
as regular files, and every flaw is one CheckpointError line. The trainer's checkpointer writes its state beside
these files; evaluation, play and the kickstarter read a policy back from them alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mettle import errors
from mettle.agent.layers import check_size
from mettle.agent.registry import NORMALIZER_KEY, policy_for_environment, policy_spec
from mettle.contracts import PolicyEnvInfo
from mettle.files import FileTooLargeError, NotRegularFileError, atomic_write, is_plain_name, open_regular, read_limited

if TYPE_CHECKING:
    from mettle.agent.policy import Policy

logger = logging.getLogger(__name__)

POLICY_WEIGHTS = "policy.safetensors"
POLICY_SPEC = "policy.json"
MANIFEST = "manifest.json"
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


def check_action_space(space: gym.spaces.Space[Any]) -> gym.spaces.Discrete | gym.spaces.MultiDiscrete | gym.spaces.Box:
    """A space a policy can act in: Discrete, MultiDiscrete, or a float Box of at most MAX_ACTION_HEADS dimensions."""
    if isinstance(space, gym.spaces.Discrete | gym.spaces.MultiDiscrete):
        return space
    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"action space {space} is not Discrete, MultiDiscrete or Box")
    if not np.issubdtype(space.dtype, np.floating) or not 1 <= space.low.size <= MAX_ACTION_HEADS:
        raise ValueError(f"Box action space {brief(space)} must hold floats in 1 to {MAX_ACTION_HEADS} dimensions")
    return space


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
        "policy": policy_spec(policy),
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
    text = read_checkpoint_file(path, SPEC_LIMIT)
    try:
        spec = json.loads(text)
        action_space = check_action_space(space_from_json(spec["action_space"]))
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
    data = read_checkpoint_file(path, WEIGHTS_LIMIT)
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
    check_statistics(weights, source)


def check_statistics(weights: dict[str, torch.Tensor], source: Path) -> None:
    """An observation normaliser's count and M2 are never negative: such a file is damaged, and its variance would
    turn every observation, and so every action, into NaN."""
    for name in (f"{NORMALIZER_KEY}.count", f"{NORMALIZER_KEY}.m2"):
        if name in weights and bool((weights[name] < 0).any()):
            raise CheckpointError(f"{source}: {name} holds negative values, which running statistics never do (the "
                                  "file was altered); use an earlier checkpoint", "bad-weights")


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


# ------------------------------------------------------------------ checkpoint listing
def resolve_checkpoint_dir(path: Path) -> Path:
    """Accept a run directory (holding `checkpoints/`) or the checkpoints directory itself."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() or (path / "config.json").exists() else path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, oldest first (staging directories are never listed)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


# ------------------------------------------------------------------ manifests
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
        expected = json.loads(read_checkpoint_file(directory / MANIFEST, MANIFEST_LIMIT))
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
    with open_checkpoint_file(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size != facts["size"]:
            raise CheckpointError(f"{path} is truncated or altered ({size} bytes, {MANIFEST} says {facts['size']})",
                                  "altered")
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
    if digest.hexdigest() != facts["sha256"]:
        raise CheckpointError(f"{path} is truncated or altered (sha256 differs from {MANIFEST})", "altered")


# ------------------------------------------------------------------ opening files from disk
def open_checkpoint_file(path: Path) -> IO[bytes]:
    """`mettle.files.open_regular`, its refusals given as the CheckpointError that names the file."""
    try:
        return open_regular(path)
    except OSError as error:
        raise open_error(path, error) from None


def open_error(path: Path, error: OSError) -> CheckpointError:
    """Why `path` could not be opened, as the CheckpointError that names it."""
    if isinstance(error, NotRegularFileError):
        return CheckpointError(f"{error}; a checkpoint holds plain files only", "not-a-file")
    if isinstance(error, FileNotFoundError):
        return CheckpointError(f"{path} is missing", "missing-file")
    return CheckpointError(f"cannot read {path}: {one_line(error)}", "unreadable")


def read_checkpoint_file(path: Path, limit: int) -> bytes:
    """`mettle.files.read_limited`, its refusals given as the CheckpointError that names the file."""
    try:
        return read_limited(path, limit)
    except FileTooLargeError as error:
        raise CheckpointError(str(error), "too-large") from None
    except OSError as error:
        raise open_error(path, error) from None
