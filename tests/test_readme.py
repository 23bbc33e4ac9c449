"""The README's Python examples run as written (with fewer steps) and produce what they say they do."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def block_with(marker: str) -> str:
    """The one ```python block of the README that contains `marker`."""
    (code,) = [block for block in python_blocks() if marker in block]
    return code


def run_shortened(code: str, steps: str) -> dict[str, Any]:
    """Run a README block with `total_timesteps=STEPS` cut to 4096; its globals afterwards."""
    assert f"total_timesteps={steps}" in code
    namespace: dict[str, Any] = {}
    exec(compile(code.replace(f"total_timesteps={steps}", "total_timesteps=4096"), str(README), "exec"), namespace)
    return namespace


def test_readme_has_the_api_the_custom_loss_and_the_onnxruntime_examples() -> None:
    assert len(python_blocks()) == 3


def test_the_onnxruntime_example_acts_in_cartpole_without_torch_or_mettle(tmp_path: Path) -> None:
    """Train a small lstm run, export it, then run the README's block as written in a fresh interpreter."""
    code = textwrap.dedent(block_with("onnxruntime"))
    mettle = [sys.executable, "-m", "mettle"]
    for command in (["train", "--env", "gym:CartPole-v1", "--policy", "lstm", "--run-dir", str(tmp_path), "--run",
                     "r", "total_timesteps=2048"], ["export", str(tmp_path / "r"), "--out", "policy.onnx"]):
        done = subprocess.run([*mettle, *command], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    check = "\nimport sys\nprint(sorted(m for m in ('torch', 'mettle') if m in sys.modules))\n"
    acted = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    assert acted.returncode == 0, acted.stderr
    episode, imported = acted.stdout.strip().splitlines()
    assert re.fullmatch(r"return \d+\.0", episode), episode
    assert imported == "[]", "the example needs neither torch nor mettle"


def test_readme_python_example_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    run_shortened(block_with("class PrintReturns"), "100_000")
    printed = [float(line) for line in capsys.readouterr().out.split()]
    assert printed and all(8 <= value <= 500 for value in printed)
    records = [json.loads(line) for line in (tmp_path / "runs/api-demo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1024, 2048, 3072, 4096, 4096]
    final_eval = records[-1]
    assert set(final_eval) == {"step", "time", "eval/cartpole/mean_return"} | {k for k in final_eval if "eval/" in k}
    assert 8 <= final_eval["eval/cartpole/mean_return"] <= 500, "the final evaluation is logged after training ends"
    assert os.listdir(tmp_path / "runs/api-demo/tensorboard")


def test_readme_custom_loss_trains_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = run_shortened(block_with("trainer.add_loss("), "20_000")
    trainer = namespace["trainer"]
    (loss,) = [loss for loss in trainer.losses if loss.name == "lean"]
    assert [type(other).__name__ for other in trainer.losses] == ["PPOActorLoss", "PPOCriticLoss", "LeanImitation"]
    assert loss.state_dict() == {"done": 4}, "on_update_end ran once per epoch (4 epochs of 1024 steps)"
    figures = trainer.context.stats.losses
    assert figures["lean/coef"] == pytest.approx(1 - 3 / 20), "the last update weighed it after 3 updates"
    assert float(capsys.readouterr().out) == figures["lean/cross_entropy"]
    assert figures["lean/cross_entropy"] < math.log(2) - 0.05, "the policy moved toward the rule from near-uniform"
    assert not list(tmp_path.iterdir()), "nothing written without a StatsReporter"
