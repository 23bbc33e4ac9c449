"""The sweep's trial reporter: what it hands the pruner, how a pruned run stops, and the score it keeps."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import optuna
import pytest

from mettle.sweep import TrialReporter, process_alive


def reporter_for(pruner: optuna.pruners.BasePruner, prune_after: float = 0.5,
                 ) -> tuple[TrialReporter, SimpleNamespace, optuna.Study]:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    reporter = TrialReporter(study.ask(), prune_after)
    context = SimpleNamespace(components=[], state=SimpleNamespace(epoch=0, agent_step=0), stop_requested=False,
                              config=SimpleNamespace(total_timesteps=400))
    reporter.register(context)  # type: ignore[arg-type]
    return reporter, context, study


def epoch(reporter: TrialReporter, context: SimpleNamespace, returns: list[float]) -> None:
    context.state.epoch += 1
    context.state.agent_step += 100
    reporter.on_step([{"episode_return": value, "episode_length": 10} for value in returns] + [{"other": 1}])
    reporter.on_epoch_end(context.state.epoch - 1)


def test_each_epochs_mean_return_is_reported_and_the_score_is_the_recent_mean() -> None:
    reporter, context, study = reporter_for(optuna.pruners.NopPruner())
    epoch(reporter, context, [10.0, 20.0])
    epoch(reporter, context, [])  # no episode ended: nothing to report
    epoch(reporter, context, [30.0])
    reporter.on_training_complete()
    trial: Any = study.trials[0]
    assert trial.intermediate_values == {1: 15.0, 3: 30.0}
    assert reporter.value == pytest.approx(20.0) and not reporter.pruned and not context.stop_requested


def test_a_pruned_trial_asks_the_run_to_stop_cleanly_after_this_epoch_once_past_prune_after() -> None:
    reporter, context, study = reporter_for(optuna.pruners.ThresholdPruner(lower=100.0), prune_after=0.5)
    epoch(reporter, context, [10.0])  # 100 of 400 steps: too early to judge
    assert not reporter.pruned and not context.stop_requested
    epoch(reporter, context, [10.0])
    assert reporter.pruned and context.stop_requested and reporter.last_step == 2
    assert study.trials[0].intermediate_values == {1: 10.0, 2: 10.0}


def test_prune_after_1_never_prunes() -> None:
    reporter, context, _ = reporter_for(optuna.pruners.ThresholdPruner(lower=100.0), prune_after=1.0)
    for _ in range(4):
        epoch(reporter, context, [10.0])
    assert not reporter.pruned and not context.stop_requested


def test_a_trial_process_is_alive_only_while_it_runs() -> None:
    assert process_alive(1) and not process_alive(None) and not process_alive(2**22 + 12345)
