"""`mettle eval`, `train` (resume) and the kickstarter against hostile checkpoints of a real CartPole run: manifests
that name files outside the run, NaN weights that verify, specs too large to build, and a read-only run dir."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import mettle_in_process, read_only_command
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mettle.cli import intact
from mettle.config import build_run_config
from mettle.rl.loss import Kickstarter
from mettle.rl.policy_files import list_checkpoints, write_manifest
from mettle.rl.training.checkpointer import read_checkpoint
from mettle.run import build_run

EVAL = ["--episodes", "3", "--json"]
OUTSIDE_DATA = b"a file outside the run\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished CartPole run with three checkpoints, made once by the CLI."""
    root = tmp_path_factory.mktemp("runs")
    result = mettle_in_process("train", "--env", "gym:CartPole-v1", "--run", "r", "--run-dir", str(root),
                        "total_timesteps=1536", "checkpoint_interval=1", "progress_interval_s=100",
                        "stats.tensorboard=false", cwd=root)
    assert result.returncode == 0, result.stderr
    assert len(list_checkpoints(root / "r" / "checkpoints")) == 3
    return root / "r"


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run (in tmp_path/runs) that a test may damage."""
    shutil.copytree(trained, tmp_path / "runs" / "r")
    return tmp_path / "runs" / "r"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file and a FIFO outside the run (opening the FIFO to read would block for ever) that manifests may name."""
    (tmp_path / "outside.txt").write_bytes(OUTSIDE_DATA)
    os.mkfifo(tmp_path / "outside.fifo")
    return tmp_path


@pytest.fixture
def untouched(run: Path, outside: Path, tmp_path: Path) -> Iterator[None]:
    """Asserts after the test that nothing outside the run dir changed and that no file appeared there."""
    before = snapshot(tmp_path, skip=run)
    yield
    assert snapshot(tmp_path, skip=run) == before


def snapshot(root: Path, skip: Path) -> dict[str, tuple[Any, ...]]:
    """Kind, size, mtime and content hash of everything under `root` but `skip`."""
    facts: dict[str, tuple[Any, ...]] = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
        facts[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return facts


def evaluate(path: Path) -> tuple[int, str]:
    """Exit code and stderr of an in-process `mettle eval`."""
    result = mettle_in_process("eval", str(path), *EVAL, cwd=path.parent)
    return result.returncode, result.stderr


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mettle: error:"), err
    return lines[0]


def add_entry(checkpoint: Path, name: str, data: bytes) -> None:
    """List `name` in the checkpoint's manifest with the size and sha256 of `data` (its other entries stay valid)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def poison_weights(checkpoint: Path) -> None:
    """One NaN in the weights, and a manifest that matches: only the finiteness check stands in the way."""
    weights = load_safetensors((checkpoint / "policy.safetensors").read_bytes())
    next(iter(weights.values())).view(-1)[0] = math.nan
    (checkpoint / "policy.safetensors").write_bytes(save_safetensors(weights))
    write_manifest(checkpoint)


def edit_kwargs(checkpoint: Path, **kwargs: Any) -> None:
    spec = json.loads((checkpoint / "policy.json").read_text())
    spec["policy"]["kwargs"].update(kwargs)
    (checkpoint / "policy.json").write_text(json.dumps(spec))
    write_manifest(checkpoint)


# --------------------------------------------------------------------------- 3: manifests that name other paths
def absolute_entry(checkpoint: Path, outside: Path) -> None:
    add_entry(checkpoint, str(outside / "outside.txt"), OUTSIDE_DATA)


def relative_entry(checkpoint: Path, outside: Path) -> None:
    add_entry(checkpoint, "../../../../outside.txt", OUTSIDE_DATA)  # checkpoint, checkpoints, r, runs, tmp_path


def symlinked_entry(checkpoint: Path, outside: Path) -> None:
    (checkpoint / "notes.txt").symlink_to(outside / "outside.txt")
    add_entry(checkpoint, "notes.txt", OUTSIDE_DATA)


def fifo_entry(checkpoint: Path, outside: Path) -> None:
    add_entry(checkpoint, str(outside / "outside.fifo"), b"")


ENTRIES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "absolute": (absolute_entry, "manifest.json lists '/"),
    "relative": (relative_entry, "manifest.json lists '../"),
    "symlink": (symlinked_entry, "notes.txt is a symlink, not a regular file"),
    "fifo": (fifo_entry, "manifest.json lists '/"),
}
"""How each hostile entry is made, and what the warning that skips its checkpoint says."""


@pytest.mark.parametrize("case", sorted(ENTRIES))
@pytest.mark.usefixtures("untouched")
def test_eval_skips_a_checkpoint_whose_manifest_names_a_file_outside_it(
        run: Path, outside: Path, case: str, caplog: pytest.LogCaptureFixture) -> None:
    *_, previous, newest = list_checkpoints(run / "checkpoints")
    make, reason = ENTRIES[case]
    make(newest, outside)
    with caplog.at_level(logging.WARNING):
        code, err = evaluate(run)
    assert code == 0, err
    assert f"using checkpoint {previous}" in err
    assert f"skipping damaged checkpoint: {newest}" in caplog.text and reason in caplog.text


@pytest.mark.timeout(30)  # reading pagemap, or opening the FIFO, would not end: the timeout fails the test
@pytest.mark.usefixtures("untouched")
def test_eval_never_reads_proc_pagemap_nor_blocks_on_a_fifo_manifest(run: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    oldest, middle, newest = list_checkpoints(run / "checkpoints")
    add_entry(newest, "/proc/self/pagemap", b"")
    (middle / "manifest.json").unlink()
    os.mkfifo(middle / "manifest.json")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        code, err = evaluate(run)
    assert code == 0 and time.monotonic() - start < 10, err
    assert f"using checkpoint {oldest}" in err
    assert f"skipping damaged checkpoint: {newest / 'manifest.json'} lists '/proc/self/pagemap'" in caplog.text
    assert f"skipping damaged checkpoint: {middle}: missing or unreadable manifest.json" in caplog.text
    assert "is a FIFO, not a regular file" in caplog.text


# --------------------------------------------------------------------------- 6: weights that verify but are not numbers
@pytest.mark.usefixtures("untouched")
def test_eval_skips_nan_weights_naming_the_checkpoint_and_one_alone_is_exit_2(
        run: Path, caplog: pytest.LogCaptureFixture) -> None:
    *_, previous, newest = list_checkpoints(run / "checkpoints")
    poison_weights(newest)
    with caplog.at_level(logging.WARNING):
        code, err = evaluate(run)
    assert code == 0 and f"using checkpoint {previous}" in err, err
    assert f"skipping damaged checkpoint: {newest / 'policy.safetensors'}" in caplog.text
    assert "NaN or infinite" in caplog.text
    code, err = evaluate(newest)
    assert code == 2
    line = one_error_line(err)
    assert str(newest) in line and "NaN or infinite" in line


@pytest.mark.usefixtures("untouched")
def test_resume_sets_nan_weights_aside_and_resumes_from_the_previous_checkpoint(run: Path) -> None:
    *_, previous, newest = list_checkpoints(run / "checkpoints")
    poison_weights(newest)
    result = mettle_in_process("train", "--run", "r", "--run-dir", str(run.parent), cwd=run.parent)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"resuming run r from {previous}" in result.stdout
    assert (run / "checkpoints" / "damaged" / f"{newest.name}-not-finite").is_dir()
    state, weights = read_checkpoint(list_checkpoints(run / "checkpoints")[-1])  # written afresh: it verifies
    assert state["trainer"]["epoch"] == 3 and all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_a_kickstarter_teacher_with_nan_weights_falls_back_to_the_previous_checkpoint(run: Path) -> None:
    *_, previous, newest = list_checkpoints(run / "checkpoints")
    poison_weights(newest)
    cfg = build_run_config(["env.name=gym:CartPole-v1", "env.num_envs=4", "batch_size=64", "minibatch_size=32",
                            "bptt_horizon=8", "total_timesteps=64", "losses.kickstarter.enabled=true",
                            f"losses.kickstarter.teacher={run}"])
    expected = load_safetensors((previous / "policy.safetensors").read_bytes())
    with build_run(cfg) as built:
        kick = built.trainer.losses[-1]
        assert isinstance(kick, Kickstarter)
        for name, tensor in kick.teacher.state_dict().items():
            assert torch.equal(tensor, expected[name]), name


@pytest.mark.usefixtures("untouched")
def test_specs_too_large_to_build_are_refused_within_seconds(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    oldest, middle, newest = list_checkpoints(run / "checkpoints")
    edit_kwargs(newest, hidden_size=100_000)  # a 40 GB layer
    edit_kwargs(middle, num_layers=10**7)  # minutes and gigabytes of layers
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        code, err = evaluate(run)
    assert code == 0 and f"using checkpoint {oldest}" in err, err
    assert f"skipping damaged checkpoint: {newest / 'policy.json'}: ValueError: hidden_size must be" in caplog.text
    assert f"skipping damaged checkpoint: {middle / 'policy.json'}: ValueError: num_layers must be" in caplog.text
    code, err = evaluate(newest)
    assert code == 2 and time.monotonic() - start < 10
    assert "hidden_size must be an integer in [1, 8192], got 100000" in one_error_line(err)


# --------------------------------------------------------------------------- 17: the message names an intact checkpoint
def test_intact_names_the_newest_checkpoint_that_verifies(run: Path) -> None:
    oldest, previous, newest = list_checkpoints(run / "checkpoints")
    assert intact(run) == f"the last checkpoint {newest} is intact"
    poison_weights(newest)
    assert intact(run) == f"the newest intact checkpoint is {previous} (newer ones are damaged)"
    for checkpoint in (oldest, previous):
        (checkpoint / "manifest.json").unlink()
    assert intact(run) == f"no checkpoint in {run / 'checkpoints'} is intact"


def test_resume_in_a_read_only_run_names_the_checkpoint_that_is_intact(run: Path) -> None:
    """Setting the damaged checkpoint aside fails (read-only checkpoints/): the message names the one that verifies."""
    *_, previous, newest = list_checkpoints(run / "checkpoints")
    poison_weights(newest)
    command = read_only_command(run / "checkpoints", [sys.executable, "-m", "mettle", "train", "--run", "r",
                                                      "--run-dir", str(run.parent)])
    result = subprocess.run(command, cwd=run.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 74, result.stderr
    line = [line for line in result.stderr.splitlines() if line.startswith("mettle:")]
    assert len(line) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "Read-only file system" in line[0] and "checkpoints/damaged" in line[0]
    assert f"the newest intact checkpoint is {previous}" in line[0] and f"{newest} is intact" not in line[0]
