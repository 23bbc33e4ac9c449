"""Bad input fails before training with one line naming the problem, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import run_mettle

from conftest import InProcess


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
def test_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], expected: str, mettle_here: InProcess,
                                         ) -> None:
    result = mettle_here("train", "--run-dir", str(tmp_path), *args, cwd=tmp_path)
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


def test_a_real_process_refusing_a_typo_says_one_line_with_the_close_match(tmp_path: Path) -> None:
    """The in-process checks above, once as the user runs it: nothing else (warnings, logging) reaches stderr."""
    result = run_mettle("train", "--env", "gym:CartPoel-v1", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["mettle: error: unknown Gymnasium environment 'CartPoel-v1'; did you mean "
                                          "'CartPole-v1'?"]
    assert result.stdout == ""


def test_eval_of_missing_run_is_a_clear_error(tmp_path: Path, mettle_here: InProcess) -> None:
    result = mettle_here("eval", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"mettle: error: run directory {tmp_path / 'nope'} does not exist"]
