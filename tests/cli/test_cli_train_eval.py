"""`mettle train` writes the resolved config and the final policy; `mettle eval` reads them back."""

from __future__ import annotations

import json
from pathlib import Path

from cli_helpers import run_mettle


def test_train_then_eval(tmp_path: Path) -> None:
    result = run_mettle("train", "--env", "gym:CartPole-v1", "--run", "tiny", "--run-dir", str(tmp_path),
                        "total_timesteps=8192", "progress_interval_s=0.01", "optimizer.learning_rate=0.002",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "tiny"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["env"]["name"] == "gym:CartPole-v1"
    assert config["trainer"]["total_timesteps"] == 8192
    assert config["trainer"]["optimizer"]["learning_rate"] == 0.002
    assert config["trainer"]["batch_size"] == 512, "the CartPole recipe applies under the user's overrides"
    progress = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(progress) >= 2 and all("sps" in line and "return" in line for line in progress)
    assert "steps 8,192/8,192" in result.stdout
    spec = json.loads((run_dir / "policy.json").read_text())
    assert spec["policy"]["class"] == "mlp" and spec["agent_step"] == 8192
    assert (run_dir / "policy.safetensors").stat().st_size > 0

    evaluation = run_mettle("eval", str(run_dir), "--episodes", "5", "--json", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    summary = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 5
    # It learned: random actions last 22.7 steps on average (the longest of 200 random episodes: 63), one action
    # always ~9. These 8,192 steps gave mean eval returns of 240, 396, 500, 281, 294 and 284 over seeds 0-5
    # (5 episodes, default eval seed); 100 sits 2.4x under the worst of those and 4x over random.
    assert 100 <= summary["mean_return"] <= 500 and summary["std_return"] >= 0
    assert summary["mean_return"] == summary["mean_length"], "CartPole pays 1 per step"
