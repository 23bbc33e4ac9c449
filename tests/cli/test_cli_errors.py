"""Bad input fails before training with one line naming the problem, exit code 2, no traceback; sizes that do not
fit the env's agent rows are refitted, or refused with a fix that trains."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from cli_helpers import mettle_in_process, run_mettle


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
        (["--env", "gym:mettle.envs.testing:mettle/DictTarget-v0", "env.kwargs.note=true"],
         "mettle/DictTarget-v0: observation space Dict('clock': Box(0.0, 1.0, (1,), float32), 'flags': MultiBinary(2), "
         "'note': Text(1, 8, charset="),
        (["--env", "gym:mettle.envs.testing:mettle/DictTarget-v0", "env.kwargs.note=true"],
         "is not supported: its part ['note'] is Text(1, 8, charset="),
        (["--env", "gym:mettle.envs.testing:mettle/DictTarget-v0", "env.kwargs.mixed_actions=tuple"],
         "mettle/DictTarget-v0: action space Tuple(Discrete(3), Box(-1.0, 1.0, (1,), float32)) is not supported; "
         "mettle policies need Discrete, MultiDiscrete or float Box actions"),
        (["--env", "gym:mettle.envs.testing:mettle/DictTarget-v0", "env.kwargs.mixed_actions=dict"],
         "action space Dict('amount': Box(-1.0, 1.0, (1,), float32), 'choice': Discrete(3)) is not supported"),
        (["--env", "gym:CartPole-v1", "policy.log_std_init=-1"],
         "policy.log_std_init=-1 sets the Gaussian head of Box actions, and gym:CartPole-v1 has discrete actions: "
         "drop policy.log_std_init"),
        (["--env", "gym:Pendulum-v1", "policy.log_std_init=-30"], "policy.log_std_init"),
        (["--env", "gym:Pendulum-v1", "--policy", "lstm", "policy.activation=relu"],
         "policy.activation=relu applies to policy.kind=mlp, and the policy is lstm: drop policy.activation or use "
         "policy.kind=mlp"),
        (["--env", "gym:Pendulum-v1", "policy.activation=gelu"], "policy.activation"),
        (["--env", "mettagrid:arena", "env.normalize_observations=true"],
         "env.normalize_observations=true: observation and reward normalisation are for Gymnasium and PettingZoo "
         "feature envs, and mettagrid:arena gives MettaGrid tokens"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    result = mettle_in_process("train", "--run-dir", str(tmp_path), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert lines[0].startswith("mettle: error:")
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "nothing is written for a config that fails"


def test_recipe_sizes_are_fitted_to_the_rows_the_user_asked_for(tmp_path: Path) -> None:
    """The recipe's batch sizes are defaults: with 7 CartPole envs they are refitted, with one log line."""
    result = mettle_in_process("train", "--run-dir", str(tmp_path), "--env", "gym:CartPole-v1", "env.num_envs=7",
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


def test_eval_of_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    result = mettle_in_process("eval", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"mettle: error: run directory {tmp_path / 'nope'} does not exist"]


TWENTY_FOUR_ROWS = ["--env", "pettingzoo:mettle.envs.pettingzoo_testing:parallel_env"]
"""8 envs x 3 agents: the shape of mpe2's simple_spread_v3 that sent the size suggestions in a circle."""


def train_24_rows(tmp_path: Path, run: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    """`mettle train` on the 24-row env for one epoch, in this process (the sizes are tested, not a process)."""
    return mettle_in_process("train", *TWENTY_FOUR_ROWS, "--run", run, "--run-dir", str(tmp_path / "runs"),
                             "env.num_envs=8", "env.kwargs.num_agents=3", "total_timesteps=1", *overrides,
                             cwd=tmp_path)


def test_cli_fits_default_sizes_to_24_rows_and_trains(tmp_path: Path) -> None:
    result = train_24_rows(tmp_path, "defaults")
    assert result.returncode == 0, result.stderr
    assert "using batch_size=8064 minibatch_size=2016" in result.stderr
    assert (tmp_path / "runs" / "defaults" / "policy.safetensors").exists()


def test_cli_explicit_bad_batch_fails_in_one_line_and_its_fix_trains(tmp_path: Path) -> None:
    bad = train_24_rows(tmp_path, "bad", "batch_size=4000")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mettle: error: batch_size 4000"), bad.stderr
    match = re.search(r"; try ((?:\w+=\d+ ?)+)$", lines[0])
    assert match, lines[0]
    fixed = train_24_rows(tmp_path, "fixed", *match.group(1).split())
    assert fixed.returncode == 0, fixed.stderr
