"""MettaScope replays from the command line: the evaluator's during `mettle train`, and bad input to `mettle play`."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import pytest
from cli_helpers import mettle_in_process

from mettle.config import EnvConfig, RunConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ARENA = {"num_agents": 2, "width": 7, "height": 6, "mines": 2, "altars": 1, "max_steps": 8}
"""A tiny arena: evaluation episodes end in 8 steps."""


def test_the_evaluator_writes_replays_under_the_run_and_logs_their_paths(tmp_path: Path) -> None:
    kwargs = [f"env.kwargs.{key}={value}" for key, value in ARENA.items()]
    result = mettle_in_process(
        "train", "--env", "mettagrid:arena", "--policy", "token", "--run", "r", "--run-dir", str(tmp_path), *kwargs,
        "env.num_envs=2", "batch_size=64", "minibatch_size=32", "bptt_horizon=8", "total_timesteps=128",
        "policy.hidden_size=16", "progress_interval_s=0.01", "evaluator.enabled=true", "evaluator.interval=1",
        "evaluator.episodes=4", "evaluator.num_envs=2", "evaluator.replays=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = re.findall(r"^evaluator on mettagrid:arena: replay (\S+)$", result.stderr, re.MULTILINE)
    written = sorted((tmp_path / "r" / "replays").rglob("*.json.z"))
    assert len(written) >= 2 and sorted(Path(p) for p in logged) == written, (logged, written)
    epochs = sorted(path.parent.name for path in written)
    assert len(set(epochs)) == len(epochs), "one replay (evaluator.replays=1) per evaluation"
    assert all(path.parent.parent == tmp_path / "r" / "replays" / "mettagrid_arena" for path in written)
    for path in written:
        data = json.loads(zlib.decompress(path.read_bytes()))
        assert data["version"] == 4 and data["max_steps"] == ARENA["max_steps"] and data["num_agents"] == 2


def test_play_save_on_a_run_that_is_not_mettagrid_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(RunConfig(env=EnvConfig(name="gym:CartPole-v1")).model_dump_json())
    result = mettle_in_process("play", str(tmp_path), "--save", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("mettle: error: "), result.stderr
    assert "gym:CartPole-v1 is not one" in result.stderr and not (tmp_path / "replays").exists()


@pytest.mark.parametrize(("content", "problem"), [
    (b"#!/bin/sh\necho hi\n", "not zlib-compressed"),
    (zlib.compress(b"__import__('os')"), "not JSON"),
    (zlib.compress(json.dumps({"version": 2, "objects": []}).encode()), "replay format version 2"),
])
def test_play_replay_of_a_file_that_is_not_a_replay_is_one_line(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.json.z"
    path.write_bytes(content)
    result = mettle_in_process("play", "--replay", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("mettle: error: "), result.stderr
    assert problem in result.stderr and str(path) in result.stderr
