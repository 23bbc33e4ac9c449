"""Kickstarting pays where users rely on it (slow): bench/kickstart.py's targets, medians of 5 seeds.

* CartPole: a student kickstarted from a trained teacher reaches a 475 mean (greedy policy, 20 episodes) in at most
  half the agent steps of the same student from scratch.
* mettagrid:navigation: a token student kickstarted from a 10-minute teacher reaches the teacher's reward per agent
  in at most half the teacher's agent steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "kickstart.py"


def run_bench(task: str, out: Path, *extra: str) -> dict[str, object]:
    """bench/kickstart.py --check for one task; its JSON result."""
    command = [sys.executable, str(BENCH), "--task", task, "--seeds", "5", "--out", str(out), "--check", *extra]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=3 * 3600)
    assert finished.returncode == 0, finished.stdout + finished.stderr[-3000:]
    result: dict[str, object] = json.loads((out / "kickstart.json").read_text())[task]
    return result


@pytest.mark.slow
def test_kickstarted_cartpole_student_needs_at_most_half_the_steps(tmp_path: Path) -> None:
    result = run_bench("cartpole", tmp_path)
    assert result["met"] and float(result["ratio"]) <= 0.5  # type: ignore[arg-type]


@pytest.mark.slow
def test_kickstarted_navigation_student_reaches_the_teacher_in_half_its_steps(tmp_path: Path) -> None:
    result = run_bench("navigation", tmp_path, "--teacher-minutes", "10")
    assert result["met"] and float(result["ratio"]) <= 0.5  # type: ignore[arg-type]
