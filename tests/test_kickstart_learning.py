"""Kickstarting pays (slow): bench/kickstart.py's CartPole target, at a size that fits pytest's 300 s.

`--size quick` with 3 seeds (~1 min on the 2-core machine): a student kickstarted from a teacher whose greedy policy
plays all 20 evaluation episodes to 500 reaches a greedy mean of 475 in at most half the median agent steps of the
same student from scratch (measured: ratio 0.27).

The full-size runs (a 100k-step CartPole teacher and 5 seeds; a 10-minute mettagrid:navigation teacher) stay the
bench's own, with results in bench/results/kickstart.json. Navigation has no test: at a size that fits 300 s the
teacher has trained one minute (reward ~3-4 per agent, against ~19 after ten), and whether its students reach that in
half its steps flipped with the code's speed (ratio 0.37 in one state, 1.0 with 2 of 3 seeds over budget in the next).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "kickstart.py"
BENCH_TIMEOUT_S = 280
"""The bench's own limit: under pytest's 300 s, so a run that overruns fails with its output rather than a kill."""


@pytest.mark.slow
def test_kickstarted_cartpole_student_needs_at_most_half_the_steps(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCH), "--task", "cartpole", "--size", "quick", "--seeds", "3", "--out",
               str(tmp_path), "--check"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert finished.returncode == 0, finished.stdout + finished.stderr[-3000:]
    result = json.loads((tmp_path / "kickstart.json").read_text())["cartpole"]
    assert result["met"] and result["ratio"] <= 0.5, result["median_steps"]
    assert result["teacher"]["reached_step"]["greedy"] is not None, "the teacher solved CartPole before teaching"
