"""ProgressLogger: a live rich dashboard on a terminal, plain progress lines anywhere else."""

from __future__ import annotations

import math
import numbers
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import IO, Any, TextIO

from rich import box
from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

from mettle.rl.training.component import TrainerComponent

LOSS_KEYS = ("ppo_actor/policy_loss", "ppo_critic/value_loss", "ppo_actor/entropy", "ppo_actor/approx_kl",
             "ppo_actor/clipfrac", "explained_variance")
"""Loss diagnostics the dashboard shows, in this order."""
ENV_STAT_PREFIXES = ("game/", "agent/")
"""Episode-info keys treated as environment statistics."""


@dataclass(frozen=True)
class TimeSplit:
    """Wall seconds of a span and the part of it the stopwatch's rollout and train timers took."""

    wall: float = 0.0
    rollout: float = 0.0
    train: float = 0.0

    @property
    def other(self) -> float:
        """Wall time neither timer saw (callbacks, logging, checkpoints)."""
        return max(self.wall - self.rollout - self.train, 0.0)

    def percent(self, seconds: float) -> float:
        """Share of the wall time in percent (nan for an empty span)."""
        return 100.0 * seconds / self.wall if self.wall > 0 else math.nan


@dataclass(frozen=True)
class _Marks:
    """Clock, timer and step readings at one moment, so spans are differences of two marks."""

    wall: float
    rollout: float
    train: float
    agent_step: int

    def split_to(self, later: _Marks) -> TimeSplit:
        """Time split of the span from this mark to `later`."""
        return TimeSplit(later.wall - self.wall, later.rollout - self.rollout, later.train - self.train)


@dataclass(frozen=True)
class ProgressSnapshot:
    """Every figure the dashboard and the plain line show, computed once per refresh."""

    epoch: int
    agent_step: int
    total_steps: int
    sps: float
    """Agent steps per second over the last epoch."""
    avg_sps: float
    """Agent steps per second since this session started."""
    elapsed_s: float
    eta_s: float | None
    """Seconds left at the session's average speed (None before any speed is known)."""
    epoch_split: TimeSplit
    session_split: TimeSplit
    losses: dict[str, float] = field(default_factory=dict)
    mean_return: float = math.nan
    mean_length: float = math.nan
    episodes: int = 0
    """Episodes in the recent window the means cover."""
    env_stats: dict[str, float] = field(default_factory=dict)
    run_name: str | None = None


class ProgressLogger(TrainerComponent):
    """Shows training progress at most every `interval_s` seconds: a rich dashboard on a tty, plain lines otherwise.

    `live=None` picks the dashboard when the stream is a terminal; `console` overrides the rich console it draws on.
    """

    master_only = True
    max_env_stats = 6
    """How many environment statistics the dashboard lists at most."""

    def __init__(
        self,
        interval_s: float = 5.0,
        window: int = 100,
        stream: TextIO | None = None,
        console: Console | None = None,
        live: bool | None = None,
    ) -> None:
        super().__init__()
        if interval_s < 0 or window < 1:
            raise ValueError(f"need interval_s >= 0 and window >= 1, got {interval_s} and {window}")
        self.interval_s = interval_s
        self.window = window
        self.stream: IO[str] = stream or (console.file if console is not None else sys.stdout)
        self.console = console
        self.live_mode = _is_terminal(self.stream) if live is None else live
        self.returns: deque[float] = deque(maxlen=window)
        self.lengths: deque[float] = deque(maxlen=window)
        self.env_stats: dict[str, deque[float]] = {}
        self._live: Live | None = None
        self._last_emit = -math.inf
        self._session: _Marks | None = None
        self._epoch_mark: _Marks | None = None
        self._epoch_split = TimeSplit()
        self._checked_restore = False

    # -- hooks ----------------------------------------------------------------------

    def register(self, context: Any) -> None:
        """Start measuring this session (speed, time split) from now."""
        super().register(context)
        self._mark_session()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called after a restore replaced the counters and timers, so the session is measured from here."""
        self._mark_session()

    def on_step(self, infos: list[dict[str, Any]]) -> None:
        """Collect finished episodes into the recent window."""
        self._check_restore()
        for info in infos:
            self._record_episode(info)

    def on_epoch_end(self, epoch: int) -> None:
        """Update the last epoch's time split, then refresh when the interval has passed."""
        marks = self._marks()
        if self._epoch_mark is not None:
            self._epoch_split = self._epoch_mark.split_to(marks)
        self._epoch_mark = marks
        if marks.wall - self._last_emit >= self.interval_s:
            self._last_emit = marks.wall
            self.emit()

    def on_training_complete(self) -> None:
        """Final figures (a "done" line or a last dashboard frame), then release the terminal."""
        try:
            self.emit(prefix="done")
        finally:
            self._stop_live()

    def on_failure(self, error: BaseException) -> None:
        """Release the terminal so the traceback prints normally."""
        self._stop_live()

    # -- figures --------------------------------------------------------------------

    def mean_return(self) -> float:
        """Mean return of the recent episodes (nan before the first one ends)."""
        return _mean(self.returns)

    def snapshot(self) -> ProgressSnapshot:
        """Gather the current figures from the context and the recent episodes."""
        ctx = self.context
        now = self._marks()
        session_start = self._session or now
        session = session_start.split_to(now)
        avg_sps = (now.agent_step - session_start.agent_step) / session.wall if session.wall > 0 else 0.0
        remaining = max(ctx.config.total_timesteps - now.agent_step, 0)
        eta = remaining / avg_sps if avg_sps > 0 else (0.0 if remaining == 0 else None)
        return ProgressSnapshot(
            epoch=ctx.state.epoch,
            agent_step=now.agent_step,
            total_steps=ctx.config.total_timesteps,
            sps=ctx.stats.steps_per_second,
            avg_sps=avg_sps,
            elapsed_s=session.wall,
            eta_s=eta,
            epoch_split=self._epoch_split,
            session_split=session,
            losses=dict(ctx.stats.losses),
            mean_return=self.mean_return(),
            mean_length=_mean(self.lengths),
            episodes=len(self.returns),
            env_stats=self._env_stat_means(),
            run_name=ctx.run_name,
        )

    # -- output ---------------------------------------------------------------------

    def emit(self, prefix: str = "") -> None:
        """Refresh the dashboard, or write one plain line."""
        snapshot = self.snapshot()
        if self.live_mode:
            self._show_live(snapshot, status=prefix or "training")
        else:
            print(format_line(snapshot, prefix), file=self.stream, flush=True)

    def build_dashboard(self, snapshot: ProgressSnapshot | None = None, status: str = "training") -> RenderableType:
        """The dashboard as a rich renderable; pure, so it can be rendered into any console."""
        snap = snapshot or self.snapshot()
        title = f"mettle · {status}" + (f" · {snap.run_name}" if snap.run_name else "")
        tables = Columns([_throughput_table(snap), _timing_table(snap), _loss_table(snap), _episode_table(snap)],
                         padding=(0, 2))  # wraps onto more rows on narrow terminals
        return Panel(Group(_progress_row(snap), tables), title=title, title_align="left", border_style="cyan")

    def _show_live(self, snapshot: ProgressSnapshot, status: str) -> None:
        """Start the Live display on first use, then redraw it."""
        dashboard = self.build_dashboard(snapshot, status)
        if self._live is None:
            if self.console is None:
                self.console = Console(file=self.stream, force_terminal=True)
            self._live = Live(dashboard, console=self.console, auto_refresh=False, transient=False)
            self._live.start(refresh=True)
        else:
            self._live.update(dashboard, refresh=True)

    def _stop_live(self) -> None:
        """Stop the Live display (leaving its last frame on screen); a no-op in plain mode."""
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    # -- bookkeeping ----------------------------------------------------------------

    def _marks(self) -> _Marks:
        """Read the clock, the rollout/train timers and the step counter."""
        ctx = self.context
        watch = ctx.stopwatch
        return _Marks(time.perf_counter(), watch.elapsed("rollout"), watch.elapsed("train"), ctx.state.agent_step)

    def _mark_session(self) -> None:
        """Measure the session and the next epoch from now."""
        self._session = self._epoch_mark = self._marks()
        self._epoch_split = TimeSplit()

    def _check_restore(self) -> None:
        """Re-mark once if timers ran more than the wall clock allows: a restore we were not told about."""
        if self._checked_restore or self._session is None:
            return
        self._checked_restore = True
        span = self._session.split_to(self._marks())
        if span.rollout + span.train > span.wall + 1.0:
            self._mark_session()

    def _record_episode(self, info: dict[str, Any]) -> None:
        """Add one finished episode's return, length and environment statistics to the window."""
        if "episode_return" in info:
            self.returns.append(float(info["episode_return"]))
            self.lengths.append(float(info.get("episode_length", math.nan)))
        for key, value in info.items():
            if key.startswith(ENV_STAT_PREFIXES) and isinstance(value, numbers.Real):
                self.env_stats.setdefault(key, deque(maxlen=self.window)).append(float(value))

    def _env_stat_means(self) -> dict[str, float]:
        """Means of the first few environment statistics, by name."""
        names = sorted(self.env_stats)[: self.max_env_stats]
        return {name: _mean(self.env_stats[name]) for name in names}


# -- formatting -------------------------------------------------------------------------


LINE_LOSSES = (("ppo_actor/policy_loss", "policy_loss", ".4f"), ("ppo_critic/value_loss", "value_loss", ".4f"),
               ("ppo_actor/entropy", "entropy", ".3f"))
"""The loss terms a progress line shows, when the run has them (a disabled loss logs none, and shows none)."""


def format_line(snap: ProgressSnapshot, prefix: str = "") -> str:
    """One plain progress line; the final ("done") line shows the whole session's time split."""
    split = snap.session_split if prefix == "done" else snap.epoch_split
    losses = snap.losses
    return (
        f"{prefix + ' ' if prefix else ''}epoch {snap.epoch} | steps {snap.agent_step:,}/{snap.total_steps:,} "
        f"| sps {snap.sps:,.0f} (avg {snap.avg_sps:,.0f}) | eta {format_duration(snap.eta_s)} "
        f"| rollout {_pct(split, split.rollout)} train {_pct(split, split.train)} other {_pct(split, split.other)} "
        f"| return {_num(snap.mean_return, '.2f')} | length {_num(snap.mean_length, '.1f')} "
        + "".join(f"| {label} {losses[key]:{spec}} " for key, label, spec in LINE_LOSSES if key in losses)
        + f"| {snap.elapsed_s:.0f}s"
    )


YEAR_S = 365 * 86_400
LONGEST_SHOWN_S = 100 * YEAR_S
"""Durations beyond this (an ETA for total_timesteps=10**18) are shown as a bound, not as days."""


def format_duration(seconds: float | None) -> str:
    """H:MM:SS for ETAs and elapsed times; "?" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds >= LONGEST_SHOWN_S:
        return f"> {LONGEST_SHOWN_S // YEAR_S:,} years"
    return str(timedelta(seconds=round(seconds)))


def _pct(split: TimeSplit, seconds: float) -> str:
    """Percent of the split's wall time, as shown to people."""
    value = split.percent(seconds)
    return f"{value:.0f}%" if math.isfinite(value) else "-"


def _num(value: float, spec: str = ".4g") -> str:
    """A number for a table cell; "-" for missing or nan."""
    return format(value, spec) if math.isfinite(value) else "-"


def _progress_row(snap: ProgressSnapshot) -> Table:
    """Steps done of total with a bar, percent and ETA."""
    done = 100.0 * snap.agent_step / snap.total_steps if snap.total_steps else 100.0
    row = Table.grid(padding=(0, 1))
    row.add_row(
        "agent steps",
        ProgressBar(total=max(snap.total_steps, 1), completed=min(snap.agent_step, snap.total_steps), width=48),
        f"{snap.agent_step:,} / {snap.total_steps:,} ({done:.1f}%)",
        f"ETA {format_duration(snap.eta_s)}",
    )
    return row


def _small_table(title: str, *headers: str) -> Table:
    """A compact titled table, so the four panels fit side by side in 120 columns."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_header=bool(headers), padding=(0, 1), title_style="bold")
    for index, header in enumerate(headers or ("", "")):
        first = index == 0
        table.add_column(header, justify="left" if first else "right", no_wrap=True, overflow="ellipsis",
                         max_width=28 if first else None)
    return table


def _throughput_table(snap: ProgressSnapshot) -> Table:
    """Epoch, SPS now and on average, elapsed time."""
    table = _small_table("throughput")
    table.add_row("epoch", f"{snap.epoch:,}")
    table.add_row("SPS", f"{snap.sps:,.0f}")
    table.add_row("SPS avg", f"{snap.avg_sps:,.0f}")
    table.add_row("elapsed", format_duration(snap.elapsed_s))
    return table


def _timing_table(snap: ProgressSnapshot) -> Table:
    """Where the wall time went: rollout, train and everything else, last epoch and session."""
    table = _small_table("time split", "", "epoch", "session")
    epoch, session = snap.epoch_split, snap.session_split
    for name in ("rollout", "train", "other"):
        table.add_row(name, _pct(epoch, getattr(epoch, name)), _pct(session, getattr(session, name)))
    return table


def _loss_table(snap: ProgressSnapshot) -> Table:
    """The last update's main PPO terms and diagnostics, then those of any other loss (kickstarter/kl...)."""
    table = _small_table("losses")
    others = sorted(name for name in snap.losses if "/" in name and not name.startswith("ppo_"))
    for name in (*LOSS_KEYS, *others):
        table.add_row(name, _num(snap.losses.get(name, math.nan)))
    return table


def _episode_table(snap: ProgressSnapshot) -> Table:
    """Recent episode means and a few environment statistics."""
    table = _small_table("episodes")
    table.add_row("window", f"{snap.episodes:,}")
    table.add_row("return", _num(snap.mean_return, ".2f"))
    table.add_row("length", _num(snap.mean_length, ".1f"))
    for name, value in snap.env_stats.items():
        table.add_row(name, _num(value))
    return table


def _mean(values: deque[float]) -> float:
    """Mean of a window (nan when empty)."""
    return sum(values) / len(values) if values else math.nan


def _is_terminal(stream: Any) -> bool:
    """Whether the stream is an interactive terminal; closed or odd streams count as not."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
