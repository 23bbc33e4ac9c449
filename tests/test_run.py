"""mettle.run wires a run from a RunConfig: the same components, in callback order, for every caller."""

from __future__ import annotations

from pathlib import Path

import pytest

from mettle.config import ConfigError, build_run_config
from mettle.rl.training import ContextCheckpointer
from mettle.run import build_run

EVERYTHING = ["env.name=gym:CartPole-v1", "env.num_envs=2", "batch_size=64", "minibatch_size=32",
              "bptt_horizon=8", "total_timesteps=128", "autotuner.enabled=true", "monitor.enabled=true",
              "gradients.enabled=true", "evaluator.enabled=true", "profiler.enabled=true",
              'schedules.learning_rate={"kind":"linear","start":0.001,"end":0.0}']


TUNERS_AND_MEASUREMENTS = ["HyperparameterScheduler", "UpdateEpochsAutotuner", "Monitor", "GradientReporter",
                           "Evaluator"]


def names(run_dir: Path | None) -> list[str]:
    with build_run(build_run_config(EVERYTHING), run_dir) as run:
        return [type(c).__name__ for c in run.trainer.components]


def test_components_come_in_callback_order_with_the_checkpointer_last(tmp_path: Path) -> None:
    assert names(tmp_path / "run") == [
        *TUNERS_AND_MEASUREMENTS, "TorchProfiler", "StatsReporter",
        "ProgressLogger", "Heartbeat", "GracefulShutdown", "ContextCheckpointer",
    ]


def test_a_run_without_a_directory_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert names(None) == [*TUNERS_AND_MEASUREMENTS, "ProgressLogger"]
    assert not any(tmp_path.iterdir())


def test_build_run_restores_and_fits_sizes(tmp_path: Path) -> None:
    cfg = build_run_config(["env.name=gym:CartPole-v1", "env.num_envs=3", "total_timesteps=1"])
    with build_run(cfg, tmp_path) as first:
        assert first.resumed_from is None
        assert first.config.trainer.batch_size % (3 * first.config.trainer.bptt_horizon) == 0
        first.trainer.train()
    with build_run(cfg, tmp_path) as second:
        checkpointer = second.trainer.components[-1]
        assert isinstance(checkpointer, ContextCheckpointer)
        assert second.resumed_from is not None and second.resumed_from.parent == checkpointer.directory
        assert second.trainer.context.state.epoch == 1


def test_bad_sizes_fail_before_anything_runs(tmp_path: Path) -> None:
    cfg = build_run_config(["env.name=gym:CartPole-v1", "env.num_envs=3", "batch_size=100"])
    with pytest.raises(ConfigError, match="batch_size 100"):
        build_run(cfg, tmp_path)


def test_a_policy_that_cannot_mask_choices_is_refused_where_agents_differ_in_actions() -> None:
    import numpy as np
    from gymnasium.spaces import Box, Discrete

    from mettle.agent.registry import build_policy
    from mettle.contracts import INVALID_ACTIONS_KEY, PolicyEnvInfo
    from mettle.run import check_action_masking

    cfg = build_run_config(["env.name=pettingzoo:mpe2.simple_speaker_listener_v4:parallel_env", "policy.kind=token"])
    info = PolicyEnvInfo(Box(0, 1, (5,)), Discrete(5), extras={INVALID_ACTIONS_KEY: np.eye(2, 5, 3, dtype=bool)})
    with pytest.raises(ConfigError, match=r"agents differ in action spaces, and policy.kind=token \(TokenPolicy\)"):
        check_action_masking(cfg, build_policy("token"), info)
    check_action_masking(cfg, build_policy("mlp"), info)
