"""Bad input fails before training with one line naming the problem, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import run_mettle


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--env", "gym:CartPoel-v1"], "CartPoel-v1"),
        (["--env", "nosuchfamily:thing"], "env.name 'nosuchfamily:thing'"),
        (["optimizer.learnng_rate=0.1"], "unknown config key 'optimizer.learnng_rate'"),
        (["optimizer.learning_rate=-0.5"], "trainer.optimizer.learning_rate"),
        (["batch_size=1024", "minibatch_size=4096"], "minibatch_size 4096 is larger than batch_size 1024"),
        (["--env", "gym:CartPole-v1", "batch_size=1000"], "(8 x 16 = 128); try batch_size=1024"),
        (["--env", "gym:CartPole-v1", "env.num_envs=7", "batch_size=512"], "try batch_size=560 minibatch_size=112"),
        (["--env", "mettagrid:no_such_task"], "no_such_task"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_mettle("train", "--run-dir", str(tmp_path), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert lines[0].startswith("mettle: error:")
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "nothing is written for a config that fails"


def test_recipe_sizes_are_fitted_to_the_rows_the_user_asked_for(tmp_path: Path) -> None:
    """The recipe's batch sizes are defaults: with 7 CartPole envs they are refitted, with one log line."""
    result = run_mettle("train", "--run-dir", str(tmp_path), "--env", "gym:CartPole-v1", "env.num_envs=7",
                        "total_timesteps=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "do not fit 7 agent rows x bptt_horizon 16; using batch_size=" in result.stderr


def test_unknown_env_suggests_close_match(tmp_path: Path) -> None:
    result = run_mettle("train", "--env", "gym:CartPoel-v1", cwd=tmp_path)
    assert "CartPole-v1" in result.stderr


def test_eval_of_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    result = run_mettle("eval", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
