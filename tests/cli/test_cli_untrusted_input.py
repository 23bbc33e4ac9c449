"""Files in a run directory never choose what runs or where we write; what a user types never gives a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import mettle_in_process, read_only_command

from mettle import files
from mettle.cli import RUN_RECORDS, main, resume_hint
from mettle.config import ConfigError
from mettle.envs.factory import check_trusted_env_name
from mettle.rl.policy_files import CheckpointError, write_manifest
from mettle.rl.training.checkpointer import load_trainer_state
from mettle.rl.training.components.progress import format_duration

CARTPOLE = ["--env", "gym:CartPole-v1", "progress_interval_s=100"]
EVIL_MODULE = "import pathlib\npathlib.Path('PWNED').touch()\nparallel_env = None\n"
"""A module whose import leaves a marker in the working directory: importing it is the attack."""


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short finished CartPole run with two checkpoints."""
    root = tmp_path_factory.mktemp("runs")
    result = mettle_in_process("train", *CARTPOLE, "--run", "r", "--run-dir", str(root), "total_timesteps=1024",
                               "checkpoint_interval=1", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "r"


@pytest.fixture
def run(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the finished run in `tmp_path/runs/r`, beside an importable module that leaves a marker in cwd."""
    shutil.copytree(finished, tmp_path / "runs" / "r", symlinks=True)
    (tmp_path / "evilmod.py").write_text(EVIL_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evilmod", raising=False)  # imported by an earlier test: it would not run again
    return tmp_path / "runs" / "r"


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file under `root` (outside `skip`) with the sha256 of its bytes (or of its link target)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_symlink():
            files[str(path)] = "link:" + os.readlink(path)
        elif path.is_file():
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def one_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The single `mettle: error:` line of a refused command; no traceback, the expected exit code."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mettle: error: "), result.stderr
    return lines[0]


def evaluate(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mettle eval RUN_DIR --episodes 1 ARGS` in this process (cheaper than a new one), as a finished process."""
    return mettle_in_process("eval", str(run_dir), "--episodes", "1", *args, cwd=Path.cwd())


def edit_config(run_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((run_dir / "config.json").read_text())
    change(data)
    (run_dir / "config.json").write_text(json.dumps(data))


def refused(*argv: str) -> subprocess.CompletedProcess[str]:
    """`mettle train ARGV` in this process (a new one costs seconds), for commands refused before training."""
    return mettle_in_process("train", *argv, cwd=Path.cwd())


def refused_resume(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mettle train --run NAME --run-dir PARENT ARGS` in this process."""
    return refused("--run", run_dir.name, "--run-dir", str(run_dir.parent), *args)


def train(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mettle train --run NAME --run-dir PARENT ARGS` in this process, from the directory above the run dir."""
    return mettle_in_process("train", "--run", run_dir.name, "--run-dir", str(run_dir.parent), *args,
                             cwd=run_dir.parent.parent)


# ------------------------------------------------------------------ names read from disk choose no code
HOSTILE_ENVS = {
    "pettingzoo-os-system": ({"name": "pettingzoo:os:system", "kwargs": {"command": "touch PWNED"}}, "os"),
    "pettingzoo-module-on-path": ({"name": "pettingzoo:evilmod:parallel_env"}, "evilmod"),
    "gym-module-on-path": ({"name": "gym:evilmod:Evil-v0"}, "evilmod"),
    "trusted-package-not-a-factory": ({"name": "pettingzoo:pettingzoo.utils.env:ParallelEnv"}, "pettingzoo.utils.env"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ENVS))
def test_an_env_name_in_config_json_that_would_import_an_untrusted_module_is_refused(run: Path, case: str) -> None:
    env, module = HOSTILE_ENVS[case]
    edit_config(run, lambda data: data["env"].update(env))
    before = snapshot(run.parent.parent, skip=run)
    for result in (evaluate(run), refused_resume(run)):
        line = one_error(result)
        assert "env.name" in line and repr(module) in line and f"--env {env['name']}" in line, line
    assert not (run.parent.parent / "PWNED").exists() and not (run / "PWNED").exists()
    assert snapshot(run.parent.parent, skip=run) == before


def test_an_untrusted_evaluator_env_in_config_json_is_refused(run: Path) -> None:
    edit_config(run, lambda data: data["evaluator"].update(envs=["pettingzoo:evilmod:parallel_env"]))
    line = one_error(refused_resume(run))
    assert "evaluator.envs" in line and "'evilmod'" in line, line
    assert not (run.parent.parent / "PWNED").exists()


def test_the_env_typed_on_the_command_line_is_trusted(run: Path) -> None:
    edit_config(run, lambda data: data["env"].update(name="pettingzoo:evilmod:parallel_env"))
    result = evaluate(run, "--env", "pettingzoo:evilmod:parallel_env")
    assert (run.parent.parent / "PWNED").exists(), result.stderr  # the user asked for this module, so it ran
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_a_mettagrid_config_path_in_config_json_that_is_a_fifo_is_refused_unread(run: Path) -> None:
    os.mkfifo(run.parent.parent / "task.yaml")  # reading it would block for ever
    edit_config(run, lambda data: data["env"].update(name=f"mettagrid:{run.parent.parent / 'task.yaml'}", kwargs={}))
    result = evaluate(run)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].endswith("task.yaml: not a regular file"), result.stderr


def test_trusted_names_resolve_and_others_are_refused_naming_the_field() -> None:
    for name in ("gym:CartPole-v1", "mettagrid:arena", "pettingzoo:mpe2.simple_spread_v3:parallel_env",
                 "pettingzoo:mettle.envs.pettingzoo_testing:parallel_env", "gym:gymnasium.envs:CartPole-v1"):
        check_trusted_env_name(name, "env.name")
    typed = "pettingzoo:my_pkg.envs:parallel_env"
    check_trusted_env_name(typed, "env.name", typed={typed})
    for name in ("pettingzoo:os:system", "pettingzoo:mpe2.simple_spread_v3:env_hack", "gym:subprocess:X-v0",
                 "pettingzoo:pettingzooo.x:parallel_env"):
        with pytest.raises(ConfigError, match=r"config\.json: env\.name"):
            check_trusted_env_name(name, "config.json: env.name", typed={"pettingzoo:other:parallel_env"})


# ------------------------------------------------------------------ where we write
def test_a_run_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / ".lock").symlink_to(victim)
    line = one_error(refused_resume(tmp_path / "runs" / "r", *CARTPOLE))
    assert ".lock" in line and "not a regular file" in line, line
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "."])
def test_a_run_name_is_one_path_component(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    result = refused(*CARTPOLE, "--run", name, "--run-dir", "runs")
    assert "--run" in one_error(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and not any((tmp_path / "runs").iterdir())


def test_a_run_or_run_dir_that_is_a_file_is_refused_and_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes").write_text("mine")
    (tmp_path / "afile").write_text("mine too")
    line = one_error(refused(*CARTPOLE, "--run", "notes", "--run-dir", "runs"))
    assert "--run" in line and "is a file" in line
    line = one_error(refused(*CARTPOLE, "--run-dir", "afile"))
    assert "--run-dir" in line and "is a file" in line
    assert (tmp_path / "runs" / "notes").read_text() == "mine" and (tmp_path / "afile").read_text() == "mine too"


# ------------------------------------------------------------------ never start over on top of a run
def test_a_run_without_checkpoints_is_refused_and_fresh_moves_its_files_aside(run: Path) -> None:
    for checkpoint in (run / "checkpoints").iterdir():
        shutil.rmtree(checkpoint)
    before = snapshot(run)
    line = one_error(refused_resume(run, "total_timesteps=512"))
    assert "no checkpoint to resume from" in line and "--fresh" in line, line
    assert snapshot(run) == before
    result = train(run, "--fresh", "total_timesteps=512")
    assert result.returncode == 0, result.stderr
    [previous] = [path for path in run.iterdir() if path.name.startswith("previous-")]
    assert {path.replace(str(run), str(previous), 1): digest for path, digest in before.items()} \
        == snapshot(previous)
    lines = [len((where / "metrics.jsonl").read_text().splitlines()) for where in (run, previous)]
    assert lines[0] < lines[1], lines


def test_fresh_still_refuses_a_run_with_an_intact_checkpoint(run: Path) -> None:
    before = snapshot(run)
    assert "--fresh refuses" in one_error(refused_resume(run, "--fresh"))
    assert snapshot(run) == before


# ------------------------------------------------------------------ one line for what a user types
@pytest.mark.parametrize(("override", "expected"), [
    ("device=tpu", "device 'tpu' is not a device"),
    ("actor_device=bogus", "actor_device 'bogus' is not a device"),
    ("device=cuda", "no CUDA device"),
    ("batch_size=4000000000", "GiB for the rollout buffer"),
    ("total_timesteps=100000000000000000000", "total_timesteps"),
])
def test_devices_and_sizes_this_machine_cannot_hold_fail_before_training(
        tmp_path: Path, override: str, expected: str) -> None:
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_error(refused(*CARTPOLE, "--run", "r", "--run-dir", str(tmp_path / "runs"), override))
    assert expected in line, line
    assert not (tmp_path / "runs" / "r").exists()


def test_an_eta_of_centuries_is_shown_not_crashed_on(tmp_path: Path) -> None:
    assert format_duration(1e18) == "> 100 years" and format_duration(3725) == "1:02:05"
    proc = subprocess.Popen([sys.executable, "-m", "mettle", "train", "--env", "gym:CartPole-v1", "--run", "r",
                             "--run-dir", "runs", "total_timesteps=1000000000000000000", "progress_interval_s=0.01"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch 2 "):
            assert "eta > 100 years" in line, line
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err


DAMAGED_CONFIGS: dict[str, Callable[[Path], None]] = {
    "truncated": lambda run: (run / "config.json").write_bytes((run / "config.json").read_bytes()[:100]),
    "unknown-key": lambda run: edit_config(run, lambda data: data["trainer"].update(no_such_key=1)),
    "wrong-type": lambda run: edit_config(run, lambda data: data["trainer"].update(batch_size="many")),
    "not-an-object": lambda run: (run / "config.json").write_text("[1, 2]"),
    "not-utf8": lambda run: (run / "config.json").write_bytes(b"\xff\xfe{"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_CONFIGS))
def test_a_damaged_config_json_is_one_line_in_train_and_eval(run: Path, damage: str) -> None:
    DAMAGED_CONFIGS[damage](run)
    before = snapshot(run)
    for result in (evaluate(run), refused_resume(run)):
        assert f"{run / 'config.json'}" in one_error(result)
    assert snapshot(run) == before


def test_overrides_are_accepted_before_between_and_after_options(tmp_path: Path) -> None:
    result = mettle_in_process("train", "total_timesteps=512", "--env", "gym:CartPole-v1", "progress_interval_s=100",
                               "--run", "r", "batch_size=256", "--run-dir", "runs", "minibatch_size=128", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())["trainer"]
    assert (saved["total_timesteps"], saved["batch_size"], saved["minibatch_size"]) == (512, 256, 128)
    bogus = mettle_in_process("train", "a=1", "--bogus", cwd=tmp_path)
    assert bogus.returncode == 2 and "unrecognized arguments: --bogus" in bogus.stderr


def test_report_on_a_read_only_run_dir_is_one_line_and_out_writes_elsewhere(
        finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "r"
    shutil.copytree(finished, run)
    command = read_only_command(run, [sys.executable, "-m", "mettle", "report", str(run)])
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    line = one_error(result, code=74)
    assert "Read-only file system" in line and "--out" in line, line
    assert main(["report", str(run), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "return.png").is_file()
    capsys.readouterr()


# ------------------------------------------------------------------ what the fuzz test found
def link_outside(run: Path, name: str) -> None:
    """Replace run/name by a symlink to a copy of it outside the run."""
    outside = run.parent.parent / "outside" / name.replace("/", "-")
    outside.parent.mkdir(exist_ok=True)
    entry = run / name
    if entry.is_dir():
        shutil.copytree(entry, outside)
        shutil.rmtree(entry)
    else:
        shutil.copy(entry, outside)
        entry.unlink()
    entry.symlink_to(outside, target_is_directory=outside.is_dir())


def become_directory(run: Path, name: str) -> None:
    (run / name).unlink()
    (run / name).mkdir()


WRITE_TARGETS: dict[str, tuple[Callable[[Path], None], str]] = {
    "tensorboard-link": (lambda run: link_outside(run, "tensorboard"), "tensorboard is a symbolic link"),
    "checkpoints-link": (lambda run: link_outside(run, "checkpoints"), "checkpoints is a symbolic link"),
    "checkpoint-link": (lambda run: link_outside(run, "checkpoints/00000002"), "00000002 is a symbolic link"),
    "metrics-link": (lambda run: link_outside(run, "metrics.jsonl"), "metrics.jsonl is a symbolic link"),
    "policy-json-directory": (lambda run: become_directory(run, "policy.json"), "policy.json is a directory"),
    "tensorboard-file": (lambda run: (shutil.rmtree(run / "tensorboard"), (run / "tensorboard").write_text("x")),
                         "tensorboard is a file"),
}


@pytest.mark.parametrize("case", sorted(WRITE_TARGETS))
def test_links_and_misplaced_entries_where_training_writes_are_refused(run: Path, case: str) -> None:
    damage, expected = WRITE_TARGETS[case]
    damage(run)
    before = snapshot(run.parent.parent)
    line = one_error(refused_resume(run, "total_timesteps=4096"))
    assert expected in line and "move it out of the run directory" in line, line
    assert snapshot(run.parent.parent) == before


def test_a_run_whose_config_json_is_gone_is_not_resumed_with_another_recipe(run: Path) -> None:
    (run / "config.json").unlink()
    before = snapshot(run)
    assert "has no config.json" in one_error(refused_resume(run))
    assert "no config.json found" in one_error(evaluate(run))
    assert snapshot(run) == before


def test_resume_names_a_damaged_checkpoint_in_one_line_and_reads_past_a_damaged_metrics_line(run: Path) -> None:
    newest = run / "checkpoints" / "00000002"
    weights = bytearray((newest / "policy.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (newest / "policy.safetensors").write_bytes(bytes(weights))
    with open(run / "metrics.jsonl", "ab") as metrics:
        metrics.write(b'{"step": \xff}\n')
    result = train(run, "total_timesteps=1536")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(newest) in lines[0] and "moved it to" in lines[0], result.stderr
    assert (run / "checkpoints" / "damaged" / "00000002-altered").is_dir()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert steps == sorted(steps) and steps[-1] >= 1536, steps


# ------------------------------------------------------------------ what the review found
def test_a_link_planted_at_the_temp_name_of_an_atomic_write_is_refused_not_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    monkeypatch.setattr(files.secrets, "token_hex", lambda _: "guessed")
    (tmp_path / f".config.json.tmp-{os.getpid()}-guessed").symlink_to(victim)
    with pytest.raises(FileExistsError):
        files.atomic_write(tmp_path / "config.json", lambda handle: handle.write(b"{}"))
    assert victim.read_text() == "precious" and not (tmp_path / "config.json").exists()


def test_a_fifo_where_training_appends_metrics_is_refused_before_it_blocks(run: Path) -> None:
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    line = one_error(refused_resume(run, "total_timesteps=4096"))
    assert "metrics.jsonl is a special file" in line, line


def test_a_compressed_trainer_state_that_would_inflate_is_damage(run: Path) -> None:
    newest = run / "checkpoints" / "00000002"
    packed = newest / "packed.pt"
    with zipfile.ZipFile(newest / "trainer_state.pt") as source, \
            zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    packed.replace(newest / "trainer_state.pt")
    write_manifest(newest)
    with pytest.raises(CheckpointError, match="compressed entries"):
        load_trainer_state(newest / "trainer_state.pt")
    result = train(run, "total_timesteps=1536")
    assert result.returncode == 0 and "00000002" in result.stderr and "compressed" in result.stderr, result.stderr
    assert (run / "checkpoints" / "damaged" / "00000002-unloadable-state").is_dir()


def test_a_run_stopped_while_it_was_built_resumes_without_fresh(run: Path) -> None:
    """What a run writes before training (tensorboard/, heartbeat.json) holds nothing to lose: no --fresh needed."""
    for name in RUN_RECORDS:
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert sorted(p.name for p in run.iterdir()) == ["heartbeat.json", "tensorboard"]
    hint = resume_hint("mettle train --run r", run)
    assert hint == "resume with: mettle train --run r; no checkpoint was written yet", hint
    (run / "config.json").write_text("{}")
    assert resume_hint("mettle train --run r", run).startswith("no checkpoint was written yet, so start over with: "
                                                               "mettle train --run r --fresh")


def test_eval_with_env_typed_reads_no_other_name_from_the_file(run: Path) -> None:
    edit_config(run, lambda data: data["env"].update(name="pettingzoo:evilmod:parallel_env", kwargs={"x": 1}))
    edit_config(run, lambda data: data["evaluator"].update(envs=["pettingzoo:evilmod:parallel_env"]))
    result = evaluate(run, "--env", "gym:CartPole-v1")
    assert result.returncode == 0 and "1 episodes: mean return" in result.stdout, result.stderr
    assert not (run.parent.parent / "PWNED").exists()
