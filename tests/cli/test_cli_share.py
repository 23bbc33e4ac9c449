"""`policy.share=false` from the command line: one policy per agent type trains and evaluates (its exact resume is in
test_cli_exact_resume.py); where there are no types to split by, or the token policy is asked for, it stops in one
line before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpe2")

from cli_helpers import mettle_in_process

SPEAKER_LISTENER = "pettingzoo:mpe2.simple_speaker_listener_v4:parallel_env"


def test_one_policy_per_agent_type_trains_and_evaluates(tmp_path: Path) -> None:
    trained = mettle_in_process("train", "--env", SPEAKER_LISTENER, "--run", "r", "--run-dir", str(tmp_path),
                                "policy.share=false", "total_timesteps=4096", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "with mlp policy per agent type" in trained.stdout
    spec = json.loads((tmp_path / "r" / "policy.json").read_text())["policy"]
    assert spec["class"] == "per_type" and spec["kwargs"]["kind"] == "mlp" and spec["kwargs"]["types"] == 2
    assert json.loads((tmp_path / "r" / "config.json").read_text())["policy"]["share"] is False
    evaluated = mettle_in_process("eval", str(tmp_path / "r"), "--episodes", "2", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert np.isfinite(json.loads(evaluated.stdout)["mean_return"])


@pytest.mark.parametrize(("env", "extra", "expected"), [
    ("gym:CartPole-v1", [], "policy.share=false needs agents that differ in spaces, and gym:CartPole-v1 has one "
                            "agent type: drop policy.share=false"),
    ("pettingzoo:mpe2.simple_spread_v3:parallel_env", [], "has one agent type: drop policy.share=false"),
    (SPEAKER_LISTENER, ["policy.kind=token"], "policy.share=false: policy.kind=token is MettaGrid's policy"),
], ids=["gym", "mpe2-alike", "token"])
def test_share_false_without_types_to_split_or_with_the_token_policy_exits_2(
        tmp_path: Path, env: str, extra: list[str], expected: str) -> None:
    result = mettle_in_process("train", "--run-dir", str(tmp_path / "runs"), "--env", env, "policy.share=false",
                               *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert not any((tmp_path / "runs").iterdir()), "nothing is written for a config that fails"
