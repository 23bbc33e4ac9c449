"""`mettle train` writes the resolved config and the final policy; `mettle eval` reads them back."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from cli_helpers import mettle_in_process, run_mettle

from mettle.envs.factory import make_environment
from mettle.rl.evaluate import evaluate_policy
from mettle.run import load_newest_policy, load_run_config

EVAL_SEED = 12345
"""`mettle eval`'s default --seed."""


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

    evaluation = mettle_in_process("eval", str(run_dir), "--episodes", "5", "--json", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr  # in this process: the train above is the CLI's own
    summary = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 5
    # It learned: random actions last 22.7 steps on average (the longest of 200 random episodes: 63), one action
    # always ~9. These 8,192 steps gave mean eval returns of 240, 396, 500, 281, 294 and 284 over seeds 0-5
    # (5 episodes, default eval seed); 100 sits 2.4x under the worst of those and 4x over random.
    assert summary["mean_return"] >= 100, summary
    assert summary["mean_return"] == summary["mean_length"], "CartPole pays 1 per step"

    # The same five episodes replayed here, and their statistics computed without the CLI's summary.
    policy, _, _ = load_newest_policy(run_dir, "cpu")
    env = make_environment(load_run_config(run_dir).env, seed=EVAL_SEED, num_envs=5)
    try:
        returns = [float(info["episode_return"]) for info in evaluate_policy(policy, env, 5, "cpu", True, EVAL_SEED)]
    finally:
        env.close()
    assert summary["mean_return"] == pytest.approx(statistics.fmean(returns), rel=1e-12)
    assert summary["std_return"] == pytest.approx(statistics.pstdev(returns), rel=1e-9, abs=1e-12)
    assert (summary["min_return"], summary["max_return"]) == (min(returns), max(returns))
