"""The README's Python example runs as written (with fewer steps) and its components produce their files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_example_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    (code,) = python_blocks()
    assert "total_timesteps=100_000" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("total_timesteps=100_000", "total_timesteps=4096"), str(README), "exec"), {})
    printed = [float(line) for line in capsys.readouterr().out.split()]
    assert printed and all(8 <= value <= 500 for value in printed)
    records = [json.loads(line) for line in (tmp_path / "runs/api-demo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1024, 2048, 3072, 4096, 4096]
    final_eval = records[-1]
    assert set(final_eval) == {"step", "time", "eval/cartpole/mean_return"} | {k for k in final_eval if "eval/" in k}
    assert 8 <= final_eval["eval/cartpole/mean_return"] <= 500, "the final evaluation is logged after training ends"
    assert os.listdir(tmp_path / "runs/api-demo/tensorboard")
