"""mettle.report: plots and summary from a synthetic metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from mettle.report import load_metrics, report_command, summarize_run, write_report


def write_metrics(run_dir: Path, lines: int = 20, truncated_tail: bool = True) -> None:
    """`lines` epochs of known values: return peaks at 19.5 on step 9,000, SPS 1000..1950, decaying losses."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(lines):
        records.append({
            "step": (i + 1) * 1000, "epoch": i + 1, "time": 100.0 + 6.0 * i, "timing/wall": 6.0,
            "environment/episode_return": 19.5 if i == 8 else float(i % 8),
            "performance/steps_per_second": 1000.0 + 50 * i,
            "loss/ppo_actor/policy_loss": 1.0 / (i + 1), "loss/ppo_critic/value_loss": 2.0 - 0.05 * i,
            "loss/ppo_actor/entropy": 0.7 - 0.01 * i, "loss/ppo_actor/approx_kl": 0.001 * i,
        })
    text = "".join(json.dumps(record) + "\n" for record in records)
    if truncated_tail:
        text += '{"step": 21000, "environment/episode_ret'  # a run killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    config = {"env": {"name": "gym:CartPole-v1"}, "policy": {"kind": "lstm"}, "trainer": {}}
    (run_dir / "config.json").write_text(json.dumps(config))


def test_write_report_makes_real_images(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run")
    written = write_report(tmp_path / "run")
    report = tmp_path / "run" / "report"
    assert written == [report / "return.png", report / "sps.png", report / "losses.png"]
    for path in written:
        image = imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert np.ptp(image) > 0  # not a blank canvas


def test_write_report_to_another_directory(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run", truncated_tail=False)
    written = write_report(tmp_path / "run", tmp_path / "elsewhere")
    assert {path.parent for path in written} == {tmp_path / "elsewhere"} and len(written) == 3


def test_summary_mentions_steps_best_return_and_names(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run")
    summary = summarize_run(tmp_path / "run")
    assert "agent steps 20,000" in summary and "20 epochs" in summary
    assert "best 19.5 at step 9,000" in summary
    assert "gym:CartPole-v1" in summary and "lstm" in summary
    assert "wall time 2m00s" in summary  # 20 records of timing/wall 6 s
    assert "mean 1,475 agent steps/s" in summary
    assert "policy_loss 0.05" in summary
    assert "1 malformed line(s) skipped" in summary


def test_a_run_from_before_named_losses_still_reports_them(tmp_path: Path) -> None:
    """Older runs logged losses/policy_loss ...: their losses are still plotted and summarised, PPO's first."""
    write_metrics(tmp_path / "run", truncated_tail=False)
    path = tmp_path / "run" / "metrics.jsonl"
    old = [{k.replace("loss/ppo_actor/", "losses/").replace("loss/ppo_critic/", "losses/"): v
            for k, v in json.loads(line).items()} for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(record) + "\n" for record in old))
    assert load_metrics(tmp_path / "run").loss_keys() == ["losses/policy_loss", "losses/value_loss", "losses/entropy",
                                                           "losses/approx_kl"]
    assert "policy_loss 0.05" in summarize_run(tmp_path / "run")


def test_resumed_run_supersedes_repeated_steps(tmp_path: Path) -> None:
    lines = [{"step": s, "time": s / 10, "environment/episode_return": float(s)} for s in (100, 200, 300, 400)]
    lines += [{"step": s, "time": 900 + s, "environment/episode_return": -float(s)} for s in (300, 400, 500)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    metrics = load_metrics(tmp_path)
    assert metrics.series("environment/episode_return") == ([100, 200, 300, 400, 500], [100, 200, -300, -400, -500])
    assert metrics.superseded == 2 and metrics.malformed_lines == 0  # resumed from step 200
    assert "wall time 23m10s" in summarize_run(tmp_path)  # no timing/wall: first to last clock stamp, 10 -> 1400


def test_missing_metrics_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"metrics\.jsonl") as info:
        write_report(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(info.value) and "StatsReporter" in str(info.value)
    assert report_command(str(tmp_path)) == 2
    assert str(tmp_path / "metrics.jsonl") in capsys.readouterr().err


def test_report_command_prints_summary_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_metrics(tmp_path / "run", lines=3)
    assert report_command(str(tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "agent steps 3,000" in out and f"wrote {tmp_path / 'run' / 'report' / 'losses.png'}" in out


def test_a_curriculum_run_gets_a_plot_of_what_was_played(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run", truncated_tail=False)
    path = tmp_path / "run" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i, record in enumerate(records):  # the small maps' share grows from 0.1 to 0.9 over training
        small = 0.1 + 0.8 * i / (len(records) - 1)
        record.update({"curriculum/width/10-13/share": small, "curriculum/width/14-17/share": 1 - small,
                       "curriculum/width/10-13/return": 3.0, "curriculum/progress_max": 0.1})
    path.write_text("".join(json.dumps(record) + "\n" for record in records))

    metrics = load_metrics(tmp_path / "run")
    assert metrics.curriculum_shares() == {"width": ["curriculum/width/10-13/share", "curriculum/width/14-17/share"]}
    written = write_report(tmp_path / "run")
    assert written[-1] == tmp_path / "run" / "report" / "curriculum.png"
    image = imread(written[-1])
    assert image.shape[0] > 100 and np.ptp(image) > 0


def test_a_run_without_a_curriculum_gets_no_curriculum_plot(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run", truncated_tail=False)
    assert load_metrics(tmp_path / "run").curriculum_shares() == {}
    assert all(path.name != "curriculum.png" for path in write_report(tmp_path / "run"))
