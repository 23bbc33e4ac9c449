"""Training a task family under a curriculum: killed with SIGKILL and rerun, it ends exactly like a run never killed.

The family is a small arena (2 agents, 7x7, episodes of 10-20 steps) so that episodes end every epoch, tasks
change and the pool evicts within a few epochs; every layout a user may train with is covered: serial or
multiprocess env workers, overlap on or off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import mettle_in_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli_exact_resume import kill_after_logging, metrics, run_to_end, tensorboard_returns

FAMILY = {
    "name": "tiny-arena",
    "base": {"task": "arena", "args": {"num_agents": 2, "width": 7, "height": 7, "mines": 1, "altars": 1,
                                        "max_steps": 16}},
    "parameters": {
        "max_steps": {"paths": ["game.max_steps"], "choices": [10, 14, 20]},
        "mines": {"paths": ["game.map_builder.objects.mine"], "range": [1, 3]},
    },
}
SIZES = ["env.num_envs=4", "batch_size=256", "minibatch_size=128", "bptt_horizon=16", "total_timesteps=2048",
         "policy.hidden_size=32", "curriculum.pool_size=4", "curriculum.min_completions=1"]


def family_file(directory: Path) -> Path:
    path = directory / "tiny-arena.json"
    path.write_text(json.dumps(FAMILY))
    return path


@pytest.mark.parametrize("layout", [
    ["env.vectorization=serial", "overlap=false"],
    ["env.vectorization=serial", "overlap=true"],
    ["env.vectorization=multiprocess", "env.num_workers=2", "overlap=false"],
    ["env.vectorization=multiprocess", "env.num_workers=2", "overlap=true"],
], ids=["serial", "serial-overlap", "workers", "workers-overlap"])
def test_killed_curriculum_run_equals_never_killed(tmp_path: Path, layout: list[str]) -> None:
    args = ["--env", f"mettagrid:{family_file(tmp_path)}", *SIZES, *layout]
    run_to_end("straight", tmp_path, *args)
    kill_after_logging("killed", tmp_path, 4, *args)
    run_to_end("killed", tmp_path, *args)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    records = metrics(straight)
    assert sum(r.get("curriculum/tasks_drawn", 0) for r in records) > 4, "the curriculum drew tasks"
    assert sum(r.get("curriculum/evicted", 0) for r in records) > 0, "the pool evicted tasks"
    assert any("curriculum/max_steps/20/share" in r for r in records), "per-bucket shares are logged"
    events = EventAccumulator(str(straight / "tensorboard"))
    events.Reload()
    logged = [(r["step"], r["curriculum/max_steps/20/share"]) for r in records if "curriculum/max_steps/20/share" in r]
    shown = [(e.step, e.value) for e in events.Scalars("curriculum/max_steps/20/share")]
    assert shown == [(step, pytest.approx(value)) for step, value in logged], "the same shares reach TensorBoard"
    assert (straight / "policy.safetensors").read_bytes() == (killed / "policy.safetensors").read_bytes()
    assert metrics(straight) == metrics(killed)
    assert tensorboard_returns(straight) == tensorboard_returns(killed)


def bad_family(tmp_path: Path, parameters: dict[str, object]) -> str:
    path = tmp_path / "bad-family.json"
    path.write_text(json.dumps({**FAMILY, "parameters": parameters}))
    return f"mettagrid:{path}"


@pytest.mark.parametrize("parameters,expected", [
    ({"walls": {"paths": ["game.map_builder.objects.wal"], "range": [1, 2]}}, "game.map_builder.objects.wal"),
    ({"max_steps": {"paths": ["game.max_steps"], "range": [30, 10]}}, "minimum 30 is above its maximum 10"),
    ({"agents": {"paths": ["game.num_agents"], "choices": [2, 4]}}, "agents are rows"),
], ids=["unknown-path", "min-above-max", "agents-vary"])
def test_a_bad_family_exits_2_with_one_line_naming_the_field(tmp_path: Path, parameters: dict[str, object],
                                                             expected: str) -> None:
    result = mettle_in_process("train", "--run-dir", str(tmp_path / "runs"), "--env", bad_family(tmp_path, parameters),
                               cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mettle: error:"), result.stderr
    assert expected in lines[0] and next(iter(parameters)) in lines[0]
    assert not any((tmp_path / "runs").iterdir()), "nothing is written for a config that fails"


@pytest.mark.parametrize("env", ["gym:CartPole-v1", "mettagrid:arena"])
def test_a_curriculum_option_without_a_family_exits_2(tmp_path: Path, env: str) -> None:
    result = mettle_in_process("train", "--run-dir", str(tmp_path / "runs"), "--env", env,
                               "curriculum.algorithm=uniform", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "curriculum.algorithm='uniform'" in lines[0] and "task families" in lines[0] and env in lines[0]
    assert not any((tmp_path / "runs").iterdir()), "nothing is written for a config that fails"


@pytest.fixture(scope="module")
def trained_family_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few epochs on the tiny family (a policy for eval to load)."""
    directory = tmp_path_factory.mktemp("family-run")
    result = mettle_in_process("train", "--run-dir", str(directory), "--run", "r", "--env",
                               f"mettagrid:{family_file(directory)}", *SIZES, "total_timesteps=512", cwd=directory)
    assert result.returncode == 0, result.stderr
    return directory / "r"


def suite_file(directory: Path) -> Path:
    path = directory / "tiny-suite.json"
    variants = {"long": {"max_steps": 40, "mines": 1}, "rich": {"mines": 5}}
    path.write_text(json.dumps({"name": "tiny-heldout", "family": str(family_file(directory)), "variants": variants}))
    return path


def test_eval_suite_scores_each_variant_and_their_mean(trained_family_run: Path) -> None:
    result = mettle_in_process("eval", str(trained_family_run), "--suite", str(suite_file(trained_family_run.parent)),
                               "--episodes", "4", "--json", cwd=trained_family_run.parent)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["suite"] == "tiny-heldout" and summary["actions"] == "sampled"
    assert list(summary["variants"]) == ["long", "rich"]
    assert summary["variants"]["long"]["mean_length"] == 40.0  # the variant's own episode length was played
    assert summary["variants"]["rich"]["mean_length"] == 16.0  # the base's
    means = [v["mean_return"] for v in summary["variants"].values()]
    assert summary["mean_return"] == pytest.approx(sum(means) / 2)
    assert "actions: sampled (MettaGrid default; --greedy for argmax)" in result.stderr


def test_eval_of_an_unknown_suite_exits_2_naming_the_known_ones(trained_family_run: Path) -> None:
    result = mettle_in_process("eval", str(trained_family_run), "--suite", "arena-heldot",
                               cwd=trained_family_run.parent)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "arena-heldot" in lines[0] and "arena-heldout" in lines[0], result.stderr


def test_the_evaluator_scores_a_suite_during_training(tmp_path: Path) -> None:
    result = mettle_in_process("train", "--run-dir", str(tmp_path), "--run", "r", "--env",
                               f"mettagrid:{family_file(tmp_path)}", *SIZES, "total_timesteps=512",
                               "evaluator.enabled=true", "evaluator.interval=1", "evaluator.episodes=4",
                               f"evaluator.suite={suite_file(tmp_path)}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    long, rich = (record[f"eval/mettagrid:tiny-heldout/{v}/mean_return"] for v in ("long", "rich"))
    assert record["eval/mettagrid:tiny-heldout/long/mean_length"] == 40.0
    assert record["eval/mettagrid:tiny-heldout/rich/greedy"] == 0.0, "MettaGrid variants are evaluated sampled"
    assert record["eval/mettagrid:tiny-heldout/mean_return"] == pytest.approx((long + rich) / 2)
