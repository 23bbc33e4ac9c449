"""`mettle sweep`: real CartPole trials as runs under sweeps/NAME, a study that a rerun continues (after a kill -9
too), parallel trial processes, the evaluator's score, and bad input refused in one line before anything trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from cli_helpers import mettle_in_process, run_mettle, wait_until
from optuna.trial import TrialState

SPACE = ["optimizer.learning_rate=log(1e-4,3e-3)", "update_epochs=int(2,4)"]
TINY = ["--env", "gym:CartPole-v1", "total_timesteps=2048"]


def study(tmp_path: Path, name: str) -> optuna.Study:
    storage = f"sqlite:///{tmp_path / 'sweeps' / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=storage)


def states(tmp_path: Path, name: str) -> list[str]:
    return [trial.state.name for trial in study(tmp_path, name).trials]


def test_a_two_trial_sweep_writes_runs_table_and_plots_and_a_rerun_continues_it(tmp_path: Path) -> None:
    # overrides before, between and after the options
    result = mettle_in_process("sweep", "total_timesteps=2048", "--sweep", "s1", SPACE[0], "--trials", "2",
                               "--env", "gym:CartPole-v1", SPACE[1], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "sweeps" / "s1"
    assert (sweep / "study.db").is_file()
    assert states(tmp_path, "s1") == ["COMPLETE", "COMPLETE"]
    for number in (0, 1):
        run = sweep / f"trial-{number:04d}"
        assert (run / "policy.safetensors").is_file() and (run / "checkpoints").is_dir()
        config = json.loads((run / "config.json").read_text())
        trial = study(tmp_path, "s1").trials[number]
        assert config["trainer"]["total_timesteps"] == 2048
        assert config["trainer"]["update_epochs"] == trial.params["update_epochs"]
        assert config["trainer"]["optimizer"]["learning_rate"] == trial.params["optimizer.learning_rate"]
        assert trial.user_attrs["command"].endswith(f"--run trial-{number:04d} total_timesteps=2048 "
                                                    f"optimizer.learning_rate={trial.params['optimizer.learning_rate']}"
                                                    f" update_epochs={trial.params['update_epochs']}")
    table = (sweep / "trials.txt").read_text()
    assert table.splitlines()[0].split() == ["number", "state", "value", "params", "run_dir"]
    assert table in result.stdout and table.count("COMPLETE") == 2
    assert (sweep / "trials.csv").read_text().startswith("number,state,value,params,run_dir")
    assert (sweep / "history.png").stat().st_size > 0 and (sweep / "importances.png").stat().st_size > 0
    best = json.loads((sweep / "best.json").read_text())
    assert best["value"] == study(tmp_path, "s1").best_value
    assert "train it with:" in result.stdout and best["command"] in result.stdout
    assert best["command"].split(" train ")[1].startswith("--env gym:CartPole-v1 total_timesteps=2048 ")
    assert result.stderr.count("mettle: error") == 0

    again = mettle_in_process("sweep", "--sweep", "s1", "--trials", "3", *TINY, *SPACE, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "2 of 3 trials finished or running" in again.stdout and "note:" not in again.stdout
    assert states(tmp_path, "s1") == ["COMPLETE"] * 3
    assert (sweep / "trial-0002" / "policy.safetensors").is_file()
    assert (sweep / "trials.txt").read_text().count("COMPLETE") == 3


def test_a_sweep_killed_mid_trial_marks_that_trial_failed_keeps_its_run_and_continues(tmp_path: Path) -> None:
    args = ["sweep", "--sweep", "k", "--trials", "2", "--env", "gym:CartPole-v1", "total_timesteps=4096",
            "update_epochs=int(2,3)"]
    proc = subprocess.Popen([sys.executable, "-m", "mettle", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    second = tmp_path / "sweeps" / "k" / "trial-0001"
    try:
        assert wait_until(lambda: (second / "metrics.jsonl").exists() or proc.poll() is not None, 240)
        assert proc.poll() is None, f"the sweep ended before trial 1 trained: {proc.communicate()[1]}"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert states(tmp_path, "k") == ["COMPLETE", "RUNNING"]

    result = mettle_in_process(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"trial 1 was left running by process {proc.pid}, which is gone: marked FAIL" in result.stdout
    assert states(tmp_path, "k") == ["COMPLETE", "FAIL", "COMPLETE"]
    assert (second / "config.json").is_file(), "the killed trial's run dir is kept"
    assert (tmp_path / "sweeps" / "k" / "trial-0000" / "policy.safetensors").is_file()
    assert (tmp_path / "sweeps" / "k" / "trial-0002" / "policy.safetensors").is_file()


def test_jobs_2_trains_two_trials_at_once_in_separate_processes(tmp_path: Path) -> None:
    result = run_mettle("sweep", "--sweep", "j", "--trials", "2", "--jobs", "2", *TINY, "update_epochs=int(2,3)",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first, second = study(tmp_path, "j").trials
    assert first.state == second.state == TrialState.COMPLETE
    assert len({first.user_attrs["pid"], second.user_attrs["pid"], os.getpid()}) == 3
    assert first.datetime_start and second.datetime_start and first.datetime_complete and second.datetime_complete
    assert first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete
    assert result.stdout.count("plot written to") == 2, "the summary is written once, by the sweep process"


def test_with_the_evaluator_on_the_score_is_its_final_evaluation_and_each_evaluation_is_reported(
        tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text("update_epochs: int(2,3)\nadvantage.method: [gae, vtrace]\n")
    result = mettle_in_process("sweep", "--sweep", "e", "--trials", "1", *TINY, "--space", "space.yaml",
                               "evaluator.enabled=true", "evaluator.interval=2", "evaluator.episodes=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trial = study(tmp_path, "e").trials[0]
    records = [json.loads(line) for line in
               (tmp_path / "sweeps" / "e" / "trial-0000" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r["eval/gym:CartPole-v1/mean_return"] for r in records if "eval/gym:CartPole-v1/mean_return" in r]
    assert trial.value == pytest.approx(evaluations[-1])
    assert sorted(trial.intermediate_values) == [2, 4]
    assert sorted(trial.params) == ["advantage.method", "update_epochs"]
    assert "importances.png skipped: it needs 2 complete trials, the study has 1" in result.stdout


@pytest.mark.parametrize("args,expected", [
    (["update_epoch=int(2,10)"], "search space update_epoch=int(2,10): unknown config key 'update_epoch'"),
    (["advantage.method=choice(gae,nope)"], "search space advantage.method=choice(gae,nope): invalid config"),
    (["update_epochs=int(0,3)"], "trainer.update_epochs: Input should be greater than 0"),
    (["update_epochs=int(10,2)"], "low 10 is above high 2"),
    (["optimizer.learning_rate=log(1e-4)"], "log() takes 2 bounds"),
    (["update_epochs=int(a,b)"], "'a' is not an integer"),
    (["update_epochs=foo(1,2)"], "unknown distribution 'foo'"),
    (["total_timesteps=2048"], "nothing to search"),
    (["update_epochs=int(2,3)", "batch_sise=512"], "unknown config key 'batch_sise'"),
    (["update_epochs=int(2,3)", "--storage", "sqlite:////nonexistent/dir/x.db"],
     "--storage sqlite:////nonexistent/dir/x.db: cannot open the study storage"),
    (["update_epochs=int(2,3)", "--storage", "postgresql://nobody:secret@127.0.0.1:1/x"],
     "--storage postgresql://nobody:***@127.0.0.1:1/x: "),
    (["update_epochs=int(2,3)", "--trials", "0"], "--trials 0 must be at least 1"),
    (["update_epochs=int(2,3)", "--prune-after", "1.5"], "--prune-after 1.5 must be a fraction"),
    (["update_epochs=int(2,3)", "--sweep", "a/b"], "must be a name"),
], ids=["unknown-key", "bad-choice", "low-invalid", "low-above-high", "log-one-bound", "int-letters", "foo",
        "no-space", "unknown-fixed-key", "sqlite-dir-missing", "postgres-unreachable", "no-trials", "prune-after",
        "path-name"])
def test_bad_input_is_one_line_exit_2_and_nothing_trains(tmp_path: Path, args: list[str], expected: str) -> None:
    result = mettle_in_process("sweep", "--sweep", "bad", "--env", "gym:CartPole-v1", *args, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("mettle: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "sweeps").exists(), "nothing was written"


def test_past_its_timeout_a_sweep_starts_no_trial_and_still_writes_its_table(tmp_path: Path) -> None:
    result = mettle_in_process("sweep", "--sweep", "t", "--trials", "5", "--timeout", "1e-9", *TINY,
                               "update_epochs=int(2,3)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert states(tmp_path, "t") == []
    assert "no trial completed yet" in result.stdout and (tmp_path / "sweeps" / "t" / "trials.txt").is_file()
    changed = mettle_in_process("sweep", "--sweep", "t", "--trials", "5", "--timeout", "1e-9", *TINY,
                                "update_epochs=int(2,5)", cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    assert ("note: this command's space differs from the study's first run "
            '({"space": {"update_epochs": "int(2,3)"}}); the study goes on with them') in changed.stdout
