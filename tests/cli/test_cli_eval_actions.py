"""`mettle eval` and `mettle play` sample on MettaGrid and act greedily elsewhere, say which, and record it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import mettle_in_process

from mettle.config import EnvConfig, PolicyConfig, RunConfig

ARENA = {"num_agents": 2, "width": 7, "height": 6, "mines": 2, "altars": 1, "max_steps": 8}
"""A tiny arena: an untrained policy's episodes end in 8 steps."""
RUNS = {"mettagrid": (EnvConfig(name="mettagrid:arena", num_envs=2, kwargs=ARENA), PolicyConfig(kind="token",
                                                                                                hidden_size=16)),
        "gym": (EnvConfig(name="gym:CartPole-v1", num_envs=2), PolicyConfig(kind="mlp", hidden_size=16))}
"""One run per env family, untrained: the mode is what is tested, not the returns."""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories as `mettle train` leaves them (config.json, a policy), one per family in RUNS."""
    from mettle.agent.registry import build_policy
    from mettle.envs.factory import make_environment
    from mettle.rl.policy_files import save_policy

    made = {}
    for family, (env_cfg, policy_cfg) in RUNS.items():
        run = tmp_path_factory.mktemp(family)
        (run / "config.json").write_text(RunConfig(env=env_cfg, policy=policy_cfg).model_dump_json())
        env = make_environment(env_cfg)
        try:
            policy = build_policy(policy_cfg.kind, hidden_size=policy_cfg.hidden_size)
            policy.initialize_to_environment(env.policy_env_info, "cpu")
            save_policy(policy, env.policy_env_info, run, agent_step=0, epoch=0)
        finally:
            env.close()
        made[family] = run
    return made


def evaluate(run: Path, *options: str) -> tuple[dict[str, Any], str]:
    """`mettle eval RUN --json OPTIONS`: the JSON summary and stderr."""
    result = mettle_in_process("eval", str(run), "--episodes", "4", "--json", *options, cwd=run)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.parametrize(("family", "options", "mode", "line"), [
    ("mettagrid", (), "sampled", "actions: sampled (MettaGrid default; --greedy for argmax)"),
    ("mettagrid", ("--greedy",), "greedy", "actions: greedy (--greedy; MettaGrid default: sampled)"),
    ("gym", (), "greedy", "actions: greedy (Gymnasium default; --sample to sample)"),
    ("gym", ("--sample",), "sampled", "actions: sampled (--sample; Gymnasium default: greedy)"),
])
def test_eval_mode_follows_the_env_family_unless_chosen(runs: dict[str, Path], family: str, options: tuple[str, ...],
                                                        mode: str, line: str) -> None:
    summary, stderr = evaluate(runs[family], *options)
    assert summary["actions"] == mode
    assert line in stderr.splitlines(), "with --json the line goes to stderr, so stdout stays one JSON object"


def test_the_default_acts_as_it_reports(runs: dict[str, Path]) -> None:
    default, greedy, sampled = evaluate(runs["gym"])[0], evaluate(runs["gym"], "--greedy")[0], \
        evaluate(runs["gym"], "--sample")[0]
    assert default == greedy and sampled["mean_return"] != greedy["mean_return"], (default, sampled)
    assert evaluate(runs["gym"], "--sample")[0] == sampled, "sampled episodes repeat for a --seed"
    # MettaGrid's default is checked where it shows: the agents' moves in `mettle play` (tests/test_play.py).


def test_eval_env_override_takes_that_env_family_default(runs: dict[str, Path]) -> None:
    summary, stderr = evaluate(runs["gym"], "--env", "gym:CartPole-v1")
    assert summary["actions"] == "greedy" and "actions: greedy (Gymnasium default; --sample to sample)" in stderr


def test_eval_text_output_says_the_mode_before_the_returns(runs: dict[str, Path]) -> None:
    result = mettle_in_process("eval", str(runs["mettagrid"]), "--episodes", "2", cwd=runs["mettagrid"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "actions: sampled (MettaGrid default; --greedy for argmax)"
    assert lines[1].startswith("2 episodes: mean return"), lines


@pytest.mark.parametrize("command", ["eval", "play"])
def test_sample_and_greedy_together_are_refused(runs: dict[str, Path], command: str) -> None:
    result = mettle_in_process(command, str(runs["mettagrid"]), "--sample", "--greedy", cwd=runs["mettagrid"])
    assert result.returncode == 2 and "not allowed with argument" in result.stderr, result.stderr


@pytest.mark.parametrize(("options", "line"), [
    ((), "actions: sampled (MettaGrid default; --greedy for argmax)"),
    (("--greedy",), "actions: greedy (--greedy; MettaGrid default: sampled)"),
])
def test_play_samples_by_default_says_so_and_saves_under_the_run(runs: dict[str, Path], tmp_path: Path,
                                                                 options: tuple[str, ...], line: str) -> None:
    result = mettle_in_process("play", str(runs["mettagrid"]), "--steps", "2", "--fps", "0", "--save", *options,
                               cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == line
    (replay,) = re.findall(r"^replay (\S+) \(open it in MettaScope", result.stderr, re.MULTILINE)
    assert Path(replay).parent == runs["mettagrid"] / "replays" and Path(replay).name.endswith(".json.z")


def test_training_evaluator_says_and_records_its_mode_and_resumes_an_old_config(tmp_path: Path) -> None:
    args = ("train", "--env", "gym:CartPole-v1", "--run", "r", "--run-dir", str(tmp_path), "batch_size=512",
            "progress_interval_s=0.01", "evaluator.enabled=true", "evaluator.interval=1", "evaluator.episodes=2")
    first = mettle_in_process(*args, "total_timesteps=512", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "evaluator on gym:CartPole-v1: actions: greedy (Gymnasium default; evaluator.actions=sampled to " \
           "sample)" in first.stderr.splitlines()
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["evaluator"]["actions"] == "auto"
    config["evaluator"]["deterministic"] = False  # the field as it was saved before `actions` replaced it
    del config["evaluator"]["actions"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))

    resumed = mettle_in_process(*args, "total_timesteps=1024", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "evaluator on gym:CartPole-v1: actions: sampled (evaluator.actions=sampled; Gymnasium default: greedy)" \
        in resumed.stderr.splitlines()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["evaluator"]["actions"] == "sampled"
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/gym:CartPole-v1/greedy"] for r in records if "eval/gym:CartPole-v1/greedy" in r] == [1.0, 0.0]
