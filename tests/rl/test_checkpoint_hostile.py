"""Checkpoints from hostile or damaged files: manifests that name other paths or hold odd facts, listed files that
are links or FIFOs, NaN weights that verify, specs too large to build, refused pickles, and checkpoints a live run
prunes while they are read."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mettle.agent.registry import build_policy
from mettle.envs.testing import BanditEnvironment
from mettle.rl import policy_files
from mettle.rl.policy_files import CheckpointError, list_checkpoints, write_manifest
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import ContextCheckpointer
from mettle.rl.training import checkpointer as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 64


def make_trainer(path: Path, keep_last: int = 3) -> Trainer:
    config = TrainerConfig(total_timesteps=6 * BATCH, batch_size=BATCH, minibatch_size=32, bptt_horizon=8,
                           update_epochs=2, seed=3)
    trainer = Trainer(config, BanditEnvironment(num_envs=4, seed=5), build_policy("mlp", hidden_size=16), "cpu")
    trainer.register(ContextCheckpointer(path, epoch_interval=1, keep_last=keep_last))
    trainer.restore()
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six checkpoints of one short run, copied by each test that damages one."""
    path = tmp_path_factory.mktemp("trained")
    torch.set_num_threads(1)
    make_trainer(path, keep_last=6).train()
    return path


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside the run that a hostile manifest names."""
    path = tmp_path / "outside.txt"
    path.write_text("not part of any checkpoint\n")
    return path


def facts(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def add_entry(checkpoint: Path, name: str, entry: Any) -> None:
    """Add one entry to a checkpoint's manifest, whose other entries stay valid."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest[name] = entry
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def record_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path the checkpointer lstats, opens or hashes from now on."""
    seen: list[str] = []
    for name in ("open", "lstat", "stat"):
        real = getattr(os, name)

        def spy(path: Any, *args: Any, real: Callable[..., Any] = real, **kwargs: Any) -> Any:
            seen.append(str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    return seen


# --------------------------------------------------------------------------- 3: what a manifest may name
@pytest.mark.parametrize("name", ["ABSOLUTE", "../../outside.txt", "sub/file", "..", ".", "", "nul\x00byte"])
def test_a_manifest_entry_that_is_not_a_plain_name_is_refused_before_anything_is_opened(
        run: Path, outside: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    newest = list_checkpoints(run)[-1]
    name = str(outside) if name == "ABSOLUTE" else name
    add_entry(newest, name, facts(outside.read_bytes()))  # matching facts: only the name check stands in the way
    seen = record_opens(monkeypatch)
    with pytest.raises(CheckpointError) as caught:
        policy_files.verify_manifest(newest)
    assert caught.value.reason == "bad-manifest" and "not a file name inside the checkpoint" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert set(seen) == {str(newest / "manifest.json")}, "only the manifest itself is read"


def test_a_manifest_naming_proc_pagemap_is_refused_at_once(run: Path) -> None:
    newest = list_checkpoints(run)[-1]
    add_entry(newest, "/proc/self/pagemap", facts(b""))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="not a file name inside the checkpoint"):
        ckpt.read_checkpoint(newest)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("entry", [
    {"size": "27", "sha256": "0" * 64},
    {"size": True, "sha256": "0" * 64},
    {"size": -1, "sha256": "0" * 64},
    {"size": 27.0, "sha256": "0" * 64},
    {"size": 27, "sha256": "XYZ"},
    {"size": 27, "sha256": "A" * 64},
    {"size": 27, "sha256": "0" * 64, "mode": "0777"},
    {"size": 27},
], ids=["size-str", "size-bool", "size-negative", "size-float", "sha-short", "sha-upper", "extra-key", "no-sha"])
def test_manifest_facts_must_be_a_size_and_a_sha256(run: Path, entry: dict[str, Any]) -> None:
    newest = list_checkpoints(run)[-1]
    (newest / "extra").write_bytes(b"x" * 27)
    add_entry(newest, "extra", entry)
    with pytest.raises(CheckpointError, match="sha256") as caught:
        policy_files.verify_manifest(newest)
    assert caught.value.reason == "bad-manifest"


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_listed_file_that_is_not_a_regular_file_is_refused_unopened(run: Path, outside: Path, kind: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    newest = list_checkpoints(run)[-1]
    extra = newest / "extra"
    if kind == "symlink":
        extra.symlink_to(outside)
    elif kind == "fifo":
        os.mkfifo(extra)
    else:
        extra.mkdir()
    add_entry(newest, "extra", facts(outside.read_bytes()))
    seen = record_opens(monkeypatch)
    with pytest.raises(CheckpointError, match="not a regular file") as caught:
        policy_files.verify_manifest(newest)
    assert caught.value.reason == "not-a-file"
    assert seen.count(str(extra)) == 1 and str(outside) not in seen, "lstat only: neither opened nor followed"


def test_a_listed_file_swapped_for_a_symlink_after_lstat_is_not_followed(run: Path, outside: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    newest = list_checkpoints(run)[-1]
    weights = newest / "policy.safetensors"
    real_lstat = os.lstat

    def swap_after_lstat(path: Any) -> os.stat_result:
        result = real_lstat(path)
        if Path(path) == weights:
            weights.unlink()
            weights.symlink_to(outside)
        return result

    monkeypatch.setattr(os, "lstat", swap_after_lstat)
    with pytest.raises(CheckpointError, match="symlink") as caught:
        policy_files.verify_manifest(newest)
    assert caught.value.reason == "not-a-file"


def test_a_manifest_that_is_a_fifo_is_refused_without_blocking(run: Path) -> None:
    newest = list_checkpoints(run)[-1]
    (newest / "manifest.json").unlink()
    os.mkfifo(newest / "manifest.json")
    with pytest.raises(CheckpointError, match="FIFO, not a regular file") as caught:
        policy_files.verify_manifest(newest)
    assert caught.value.reason == "no-manifest"


def test_a_size_mismatch_is_found_from_stat_without_hashing(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    newest = list_checkpoints(run)[-1]
    entry = json.loads((newest / "manifest.json").read_text())["trainer_state.pt"]
    entry["size"] += 1
    (newest / "manifest.json").write_text(json.dumps({"trainer_state.pt": entry}))

    def no_hashing(*args: Any) -> Any:
        raise AssertionError("a file whose size differs was hashed")

    monkeypatch.setattr(hashlib, "sha256", no_hashing)
    with pytest.raises(CheckpointError, match="truncated or altered") as caught:
        policy_files.verify_manifest(newest, ("trainer_state.pt",))
    assert caught.value.reason == "altered"


# --------------------------------------------------------------------------- 6: weights that verify but are not numbers
def poison_weights(checkpoint: Path, value: float = math.nan) -> None:
    weights = load_safetensors((checkpoint / "policy.safetensors").read_bytes())
    next(iter(weights.values()))[0] = value
    (checkpoint / "policy.safetensors").write_bytes(save_safetensors(weights))
    write_manifest(checkpoint)


def poison_optimizer(checkpoint: Path) -> None:
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    slot = next(iter(state["optimizer"]["state"].values()))
    slot["exp_avg_sq"].view(-1)[0] = math.nan
    torch.save(state, checkpoint / "trainer_state.pt")
    write_manifest(checkpoint)


@pytest.mark.parametrize("damage", [poison_weights, lambda c: poison_weights(c, math.inf), poison_optimizer],
                         ids=["nan-weights", "inf-weights", "nan-optimizer"])
def test_resume_sets_non_finite_checkpoints_aside_and_uses_the_previous(run: Path, damage: Callable[[Path], None],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    newest = list_checkpoints(run)[-1]
    damage(newest)
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(run)
    assert trainer.context.state.epoch == 5
    assert str(newest) in caplog.text and "NaN or infinite" in caplog.text
    assert [p.name for p in (run / "damaged").iterdir()] == ["00000006-not-finite"]
    for tensor in trainer.context.policy.state_dict().values():
        assert torch.isfinite(tensor).all()


def test_eval_and_teachers_skip_nan_weights(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    *_, previous, newest = list_checkpoints(run)
    poison_weights(newest)
    with caplog.at_level(logging.WARNING):
        policy, _, used = policy_files.newest_usable_policy(run)
    assert used == previous
    assert f"skipping damaged checkpoint: {newest / 'policy.safetensors'}: " in caplog.text
    assert all(torch.isfinite(tensor).all() for tensor in policy.state_dict().values())
    with pytest.raises(CheckpointError, match="NaN or infinite") as caught:
        policy_files.load_policy(newest)
    assert caught.value.reason == "not-finite"


def edit_spec(checkpoint: Path, change: Callable[[dict[str, Any]], None]) -> None:
    spec = json.loads((checkpoint / "policy.json").read_text())
    change(spec)
    (checkpoint / "policy.json").write_text(json.dumps(spec))
    write_manifest(checkpoint)


SPECS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "hidden_size": (lambda s: s["policy"]["kwargs"].update(hidden_size=100_000), "hidden_size must be an integer"),
    "num_layers": (lambda s: s["policy"]["kwargs"].update(num_layers=65), "num_layers must be an integer"),
    "hidden-as-float": (lambda s: s["policy"]["kwargs"].update(hidden_size=16.5), "hidden_size must be an integer"),
    "actions": (lambda s: s.update(action_space={"type": "Discrete", "n": 10**12}), "Discrete n must be"),
    "action-heads": (lambda s: s.update(action_space={"type": "MultiDiscrete", "nvec": [2] * 5000}), "1 to 1024"),
    "action-sum": (lambda s: s.update(action_space={"type": "MultiDiscrete", "nvec": [2**20, 2]}), "sum to at most"),
    "box-elements": (lambda s: s["observation_space"].update(low=[[0.0] * 4097] + [[0.0]] * 4096),
                     "16,785,409 elements"),  # counted from the first entries, before numpy sees the list
    "box-dtype": (lambda s: s["observation_space"].update(dtype="V100000000"), "is not an integer or float type"),
    "num_agents": (lambda s: s.update(num_agents=10**12), "num_agents must be"),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_a_spec_too_large_to_be_real_is_refused_before_allocating(run: Path, case: str) -> None:
    newest = list_checkpoints(run)[-1]
    change, expected = SPECS[case]
    edit_spec(newest, change)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as caught:
        policy_files.load_policy(newest)
    assert time.monotonic() - start < 5
    assert caught.value.reason == "bad-spec" and expected in str(caught.value), caught.value
    assert "\n" not in str(caught.value)


def test_the_parameter_budget_is_counted_without_allocating() -> None:
    from mettle.agent.registry import MAX_PARAMETERS, parameter_count, policy_for_environment

    info = BanditEnvironment(num_envs=4, seed=5).policy_env_info
    deep = {"class": "mlp", "kwargs": {"hidden_size": 8192, "num_layers": 64}}  # each kwarg allowed, together 8.6e9
    start = time.monotonic()
    count = parameter_count(deep, info)
    assert count is not None and count > MAX_PARAMETERS
    with pytest.raises(ValueError, match="parameters for these spaces"):
        policy_for_environment(deep, info, "cpu")
    assert time.monotonic() - start < 5
    small = {"class": "mlp", "kwargs": {"hidden_size": 16}}
    built = policy_for_environment(small, info, "cpu")
    assert parameter_count(small, info) == sum(p.numel() for p in built.parameters())


# --------------------------------------------------------------------------- 7: pruned while read is not damage
def vanishing(real: Callable[..., Any], victims: set[Path], then: Callable[[], None] = lambda: None,
              ) -> Callable[..., Any]:
    """`real`, except that reading a victim first removes it (the trainer's prune) and fails as reading would."""

    def read(path: Path, *args: Any) -> Any:
        directory = Path(path) if Path(path).name.isdigit() else Path(path).parent
        if directory in victims:
            victims.discard(directory)
            shutil.rmtree(directory)
            then()
            raise CheckpointError(f"{directory / 'policy.json'} is missing", "missing-file")
        return real(path, *args)

    return read


def test_a_checkpoint_pruned_while_read_is_skipped_silently(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    *_, previous, newest = list_checkpoints(run)
    monkeypatch.setattr(policy_files, "load_policy", vanishing(policy_files.load_policy, {newest}))
    with caplog.at_level(logging.DEBUG):
        _, _, used = policy_files.newest_usable_policy(run)
    assert used == previous
    assert "damaged" not in caplog.text.lower()


def test_a_newer_checkpoint_written_meanwhile_is_found_by_listing_again(run: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    *_, newest = list_checkpoints(run)
    newer = run / "00000007"
    shutil.copytree(newest, run / ".spare")
    monkeypatch.setattr(policy_files, "load_policy",
                        vanishing(policy_files.load_policy, {newest}, lambda: os.replace(run / ".spare", newer)))
    _, _, used = policy_files.newest_usable_policy(run)
    assert used == newer


def test_when_every_checkpoint_is_pruned_while_read_the_error_says_so(run: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_files, "load_policy", vanishing(policy_files.load_policy, set(list_checkpoints(run))))
    with pytest.raises(CheckpointError) as caught:
        policy_files.newest_usable_policy(run)
    assert "damaged" not in str(caught.value) and "pruned" in str(caught.value)


def test_restore_skips_a_checkpoint_removed_while_read_without_setting_it_aside(
        run: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    newest = list_checkpoints(run)[-1]
    monkeypatch.setattr(ckpt, "read_checkpoint", vanishing(ckpt.read_checkpoint, {newest}))
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(run)
    assert trainer.context.state.epoch == 5
    assert not (run / "damaged").exists() and "damaged" not in caplog.text.lower()


# --------------------------------------------------------------------------- 8: the refusal gives no unsafe advice
class Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_refused_pickle_is_named_without_advice_to_disable_the_check(run: Path, tmp_path: Path) -> None:
    newest = list_checkpoints(run)[-1]
    torch.save({"evil": Payload(tmp_path / "pwned")}, newest / "trainer_state.pt")
    write_manifest(newest)
    with pytest.raises(CheckpointError) as caught:
        ckpt.read_checkpoint(newest)
    message = str(caught.value)
    assert caught.value.reason == "refused-code" and "\n" not in message
    assert "refused" in message and "objects other than tensors and plain containers" in message
    for advice in ("weights_only", "can still be loaded", "trust", "add_safe_globals"):
        assert advice not in message, message
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- 17: which checkpoint is intact
def test_the_newest_intact_checkpoint_is_the_newest_that_verifies(run: Path) -> None:
    checkpoints = list_checkpoints(run)
    assert ckpt.newest_intact_checkpoint(run) == checkpoints[-1]
    poison_weights(checkpoints[-1])
    (checkpoints[-2] / "manifest.json").unlink()
    assert ckpt.newest_intact_checkpoint(run) == checkpoints[-3]
    for checkpoint in checkpoints:
        (checkpoint / "policy.safetensors").write_bytes(b"garbage")
    assert ckpt.newest_intact_checkpoint(run) is None
    assert not (run / "damaged").exists(), "read-only: nothing is moved"
