"""`mettle report RUN_DIR`: plots and a text summary of a run, from the metrics.jsonl its StatsReporter wrote."""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mettle.files import NotRegularFileError, open_regular

METRICS_FILE = "metrics.jsonl"
REPORT_DIR = "report"
RETURN_KEYS = ("environment/episode_return", "environment/episode_return_mean", "environment/return")
SPS_KEYS = ("performance/steps_per_second", "performance/sps", "performance/agent_steps_per_second")
REPORT_WALL_KEY = "timing/wall"
"""Seconds each record covers (the StatsReporter's timing/wall): their sum is the run's training time."""
CLOCK_KEYS = ("time", "timestamp")
LOSS_ORDER = ("ppo_actor/policy_loss", "ppo_critic/value_loss", "ppo_actor/entropy", "ppo_actor/approx_kl",
              "ppo_actor/clipfrac", "explained_variance", "grad_norm")
LOSS_PREFIX = "loss/"
OLD_LOSS_PREFIX = "losses/"
"""Where runs written before losses had names logged them (losses/policy_loss ...); still plotted."""
MAX_LOSS_PANELS = 12
CURRICULUM_PREFIX = "curriculum/"
SHARE_SUFFIX = "/share"
"""A task curriculum logs `curriculum/<parameter>/<bucket>/share`: the share of episodes played in each bucket."""


def loss_name(key: str) -> str:
    """A loss metric's name without its loss/ (or losses/) prefix."""
    return key.removeprefix(LOSS_PREFIX).removeprefix(OLD_LOSS_PREFIX)


class MissingMetricsError(ValueError):
    """The run directory has no (usable) metrics.jsonl."""


@dataclass
class RunMetrics:
    """The records of a metrics.jsonl, in step order, and what was dropped while reading it."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    malformed_lines: int = 0
    """Lines that were not a JSON object with a numeric "step" (a killed run may leave a truncated last one)."""
    superseded: int = 0
    """Records dropped because a resumed run logged the same steps again (the later ones win)."""

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of the records holding a finite number under `key`."""
        steps, values = [], []
        for record in self.records:
            value = _number(record.get(key))
            if value is not None:
                steps.append(float(record["step"]))
                values.append(value)
        return steps, values

    def first_key(self, candidates: Sequence[str]) -> str | None:
        """The first candidate key that has any data (metric names differ slightly between loggers)."""
        return next((key for key in candidates if self.series(key)[1]), None)

    def curriculum_shares(self) -> dict[str, list[str]]:
        """Parameter -> its bucket share keys, in the order first logged (a task curriculum's runs only)."""
        shares: dict[str, list[str]] = {}
        for record in self.records:
            for key in record:
                if key.startswith(CURRICULUM_PREFIX) and key.endswith(SHARE_SUFFIX) and key.count("/") == 3:
                    parameter = key.split("/")[1]
                    if key not in shares.setdefault(parameter, []):
                        shares[parameter].append(key)
        return shares

    def loss_keys(self) -> list[str]:
        """loss/ (or an older run's losses/) keys with data: the usual PPO terms first, then the rest alphabetically."""
        prefixes = (LOSS_PREFIX, OLD_LOSS_PREFIX)
        present = {key for record in self.records for key in record if key.startswith(prefixes)}
        known = [LOSS_PREFIX + name for name in LOSS_ORDER]
        known += [OLD_LOSS_PREFIX + name.split("/")[-1] for name in LOSS_ORDER]  # losses/ had no loss names
        ordered = [key for key in known if key in present]
        ordered += sorted(present - set(ordered))
        return [key for key in ordered if self.series(key)[1]]


def _number(value: Any) -> float | None:
    """A finite float, or None for missing, non-numeric and non-finite values."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def load_metrics(run_dir: Path) -> RunMetrics:
    """Read run_dir/metrics.jsonl, skipping malformed lines and superseding steps a resumed run repeated."""
    path = Path(run_dir) / METRICS_FILE
    metrics = RunMetrics(path)
    try:
        raw = open_regular(path, follow_symlinks=True)  # a FIFO would block the read
    except (FileNotFoundError, NotRegularFileError):
        raise MissingMetricsError(
            f"no metrics file at {path}: a report needs the run's {METRICS_FILE}, which the StatsReporter writes "
            "during training (train with metrics logging enabled, or point at the run directory that holds it)"
        ) from None
    with io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                _add_line(metrics, line)
    if not metrics.records:
        raise MissingMetricsError(f"{path} holds no complete metrics records (a run writes one per epoch)")
    return metrics


def _add_line(metrics: RunMetrics, line: str) -> None:
    """Append one record; a step below the last means a resumed run, whose records replace the old ones."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        metrics.malformed_lines += 1
        return
    if not isinstance(record, dict) or _number(record.get("step")) is None:
        metrics.malformed_lines += 1
        return
    records = metrics.records
    if records and record["step"] < records[-1]["step"]:
        while records and records[-1]["step"] >= record["step"]:
            records.pop()
            metrics.superseded += 1
    if records and records[-1]["step"] == record["step"]:
        records[-1] = {**records[-1], **record}  # same step logged twice (final record, or resume): merge
        return
    records.append(record)


# ---------------------------------------------------------------------------------------------- plots
def write_report(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write return.png, sps.png and losses.png (those with data) into out_dir (default run_dir/report)."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    if out_dir.is_symlink():
        raise ValueError(f"{out_dir} is a symbolic link; plots are written only into a real directory "
                         "(remove the link, or choose one with --out DIR)")
    out_dir.mkdir(parents=True, exist_ok=True)
    title = run_dir.resolve().name
    written: list[Path] = []
    return_key = metrics.first_key(RETURN_KEYS)
    if return_key:
        written.append(_line_plot(metrics, return_key, "episode return", f"{title}: episode return",
                                  out_dir / "return.png"))
    sps_key = metrics.first_key(SPS_KEYS)
    if sps_key:
        written.append(_line_plot(metrics, sps_key, "agent steps / s", f"{title}: throughput", out_dir / "sps.png"))
    loss_keys = metrics.loss_keys()[:MAX_LOSS_PANELS]
    if loss_keys:
        written.append(_loss_plot(metrics, loss_keys, f"{title}: losses", out_dir / "losses.png"))
    shares = metrics.curriculum_shares()
    if shares:
        written.append(_curriculum_plot(metrics, shares, f"{title}: what the curriculum played",
                                        out_dir / "curriculum.png"))
    return written


def _figure(width: float, height: float) -> Any:
    """A pyplot-free Agg figure: no display, no global backend switch, safe beside other matplotlib users."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _smooth(steps: list[float], values: list[float]) -> tuple[list[float], list[float]]:
    """Trailing moving average over ~5% of the points (no change for short series)."""
    window = max(1, len(values) // 20)
    if window < 2:
        return steps, values
    smoothed = [sum(values[i - window + 1 : i + 1]) / window for i in range(window - 1, len(values))]
    return steps[window - 1 :], smoothed


def _draw(axes: Any, steps: list[float], values: list[float], label: str) -> None:
    """The raw series, faint, under its moving average."""
    smooth_steps, smoothed = _smooth(steps, values)
    if smoothed is values:
        axes.plot(steps, values, marker="." if len(values) < 50 else None, label=label)
        return
    axes.plot(steps, values, alpha=0.3, color="C0")
    axes.plot(smooth_steps, smoothed, color="C0", label=f"{label} (moving average)")


def _line_plot(metrics: RunMetrics, key: str, ylabel: str, title: str, path: Path) -> Path:
    """One metric against agent steps."""
    figure = _figure(8, 4.5)
    axes = figure.add_subplot()
    _draw(axes, *metrics.series(key), key)
    axes.set(xlabel="agent steps", ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.savefig(path)
    return path


def _loss_plot(metrics: RunMetrics, keys: list[str], title: str, path: Path) -> Path:
    """One panel per loss term (their scales differ by orders of magnitude)."""
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure = _figure(4 * columns, 3 * rows)
    figure.suptitle(title)
    for index, key in enumerate(keys, start=1):
        axes = figure.add_subplot(rows, columns, index)
        _draw(axes, *metrics.series(key), key)
        axes.set_title(loss_name(key), fontsize=10)
        axes.set_xlabel("agent steps", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
    figure.savefig(path)
    return path


def _curriculum_plot(metrics: RunMetrics, shares: dict[str, list[str]], title: str, path: Path) -> Path:
    """Per family parameter, a stacked area of the share of episodes each bucket of its values got over training."""
    figure = _figure(8, 2.6 * len(shares))
    figure.suptitle(title)
    for index, (parameter, keys) in enumerate(shares.items(), start=1):
        axes = figure.add_subplot(len(shares), 1, index)
        steps = [float(record["step"]) for record in metrics.records if keys[0] in record]
        layers = [[_number(record.get(key)) or 0.0 for record in metrics.records if keys[0] in record]
                  for key in keys]
        labels = [key.split("/")[2] for key in keys]
        axes.stackplot(steps, *(_padded_smooth(layer) for layer in layers), labels=labels, alpha=0.85)
        axes.set(ylabel="share of episodes", ylim=(0, 1), title=parameter)
        axes.set_xlabel("agent steps", fontsize=8)
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="bucket", title_fontsize=8)
    figure.savefig(path)
    return path


def _padded_smooth(values: list[float]) -> list[float]:
    """A trailing moving average over ~5% of the points, as long as `values` (the first average what they have)."""
    window = max(1, len(values) // 20)
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


# -------------------------------------------------------------------------------------------- summary
def summarize_run(run_dir: Path) -> str:
    """A few lines: steps, epochs, wall time, returns, throughput and final losses of a run."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    last = metrics.records[-1]
    lines = [f"run {run_dir.resolve().name}{_config_label(run_dir)}"]
    epochs = _number(last.get("epoch"))
    epoch_text = f"{int(epochs):,} epochs" if epochs is not None else f"{len(metrics.records):,} epochs logged"
    wall = _wall_time(metrics)
    wall_text = f", wall time {_duration(wall)}" if wall is not None else ""
    lines.append(f"agent steps {int(last['step']):,}, {epoch_text}{wall_text}")
    lines.append(_return_line(metrics))
    sps_key = metrics.first_key(SPS_KEYS)
    if sps_key:
        sps = metrics.series(sps_key)[1]
        lines.append(f"throughput: mean {sum(sps) / len(sps):,.0f} agent steps/s (last {sps[-1]:,.0f})")
    losses = [f"{loss_name(key)} {metrics.series(key)[1][-1]:.4g}" for key in metrics.loss_keys()[:8]]
    if losses:
        lines.append("final losses: " + ", ".join(losses))
    if metrics.malformed_lines or metrics.superseded:
        lines.append(f"({metrics.malformed_lines} malformed line(s) skipped, "
                     f"{metrics.superseded} record(s) superseded by a resumed run)")
    return "\n".join(lines)


def _config_label(run_dir: Path) -> str:
    """' (env X, policy Y)' from config.json when the run has a readable one."""
    try:  # absent, or a FIFO that would block the read: no label
        with open_regular(run_dir / "config.json", follow_symlinks=True) as handle:
            config = json.loads(handle.read())
        return f" (env {config['env']['name']}, policy {config['policy']['kind']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _return_line(metrics: RunMetrics) -> str:
    """Final and best mean episode return, with the step of the best."""
    key = metrics.first_key(RETURN_KEYS)
    if key is None:
        return "episode return: no episodes finished (no environment/episode_return in the metrics)"
    steps, values = metrics.series(key)
    best = max(range(len(values)), key=values.__getitem__)
    return (f"episode return: final {values[-1]:.4g}, best {values[best]:.4g} at step {int(steps[best]):,}, "
            f"mean of the last 10% {_tail_mean(values):.4g}")


def _tail_mean(values: list[float]) -> float:
    """Mean of the last tenth of a series (at least one value): a steadier 'final' figure."""
    tail = values[-max(1, len(values) // 10) :]
    return sum(tail) / len(tail)


def _wall_time(metrics: RunMetrics) -> float | None:
    """Seconds the run took: the sum of per-record durations when logged, else the span of the clock stamps."""
    durations = metrics.series(REPORT_WALL_KEY)[1]
    if durations:
        return sum(durations)
    for key in CLOCK_KEYS:
        values = metrics.series(key)[1]
        if len(values) > 1:
            return values[-1] - values[0]
    return None


def _duration(seconds: float) -> str:
    """1h02m03s style."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def report_command(run_dir: str, out_dir: str | None = None) -> int:
    """`mettle report RUN_DIR [--out DIR]`: the summary and the plots written; bad input exit 2, I/O errors 74."""
    try:
        print(summarize_run(Path(run_dir)))
        for path in write_report(Path(run_dir), Path(out_dir) if out_dir else None):
            print(f"wrote {path}")
    except ValueError as error:
        print(f"mettle: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        where = out_dir or Path(run_dir) / REPORT_DIR
        print(f"mettle: error: cannot write the plots to {where}: {error.strerror or error}; "
              "write them elsewhere with --out DIR", file=sys.stderr)
        return 74
    return 0
