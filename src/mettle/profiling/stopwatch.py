"""Named, dotted, nestable wall-clock timers for profiling the training loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from time import perf_counter
from types import TracebackType
from typing import Any, ClassVar

_STATE_VERSION = 1


@dataclass
class _Timer:
    """Bookkeeping for one named timer."""

    total: float = 0.0  # seconds of completed intervals (plus restored totals)
    count: int = 0  # completed intervals
    started_at: float | None = None  # clock reading while running, else None
    lap_mark: float = 0.0  # elapsed at the previous lap()
    lap_all_mark: float = 0.0  # elapsed at the previous lap_all()


class _Interval(AbstractContextManager[None]):
    """`with stopwatch(name):` for one name: a plain object made once per name, so a block costs two method calls
    (a generator-based context manager costs several times more, and the rollout enters three per step)."""

    __slots__ = ("_name", "_stopwatch")

    def __init__(self, stopwatch: Stopwatch, name: str) -> None:
        self._stopwatch, self._name = stopwatch, name

    def __enter__(self) -> None:
        self._stopwatch.start(self._name)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stopwatch.stop(self._name)


class Stopwatch:
    """Named timers, created on first use, whose dotted names form a hierarchy.

    "rollout.env" is a child of "rollout"; the reserved name ``Stopwatch.GLOBAL``
    ("global") is the root and the default of every name argument, so ``start()``
    / ``stop()`` / ``elapsed()`` with no name time the whole run. Timers are
    independent: a parent's time is whatever was measured under its own name.

    Example::

        sw = Stopwatch()
        sw.start()  # global timer
        with sw("rollout"):
            with sw("rollout.env"):
                step_envs()
            with sw.time("rollout.inference"):
                run_policy()
        sw.rate("rollout", amount=steps)  # steps per second of rollout time
        sw.lap_all()  # per-timer deltas since the previous epoch
        torch.save(sw.state_dict(), path)
    """

    GLOBAL: ClassVar[str] = "global"

    def __init__(self, clock: Callable[[], float] = perf_counter) -> None:
        """Take an injectable clock so tests can control time exactly."""
        self._clock = clock
        self._timers: dict[str, _Timer] = {}
        self._intervals: dict[str, _Interval] = {}

    # -- timing -----------------------------------------------------------------

    def start(self, name: str = GLOBAL) -> None:
        """Begin an interval; re-entering a running timer is a bug, so it raises."""
        timer = self._get_or_create(name)
        if timer.started_at is not None:
            raise ValueError(f"timer {name!r} is already running")
        timer.started_at = self._clock()

    def stop(self, name: str = GLOBAL) -> float:
        """End the running interval and return its length in seconds."""
        timer = self._timers.get(name)
        if timer is None or timer.started_at is None:
            raise ValueError(f"timer {name!r} is not running")
        interval = self._clock() - timer.started_at
        timer.total += interval
        timer.count += 1
        timer.started_at = None
        return interval

    def time(self, name: str = GLOBAL) -> AbstractContextManager[None]:
        """Time a block, stopping the timer even if the block raises."""
        interval = self._intervals.get(name)
        if interval is None:
            interval = self._intervals[name] = _Interval(self, name)
        return interval

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        """Record intervals measured elsewhere (another process's timer), as if timed here."""
        timer = self._get_or_create(name)
        timer.total += seconds
        timer.count += count

    def __call__(self, name: str = GLOBAL) -> AbstractContextManager[None]:
        """Shorthand for ``time(name)`` so blocks read ``with sw("rollout"):``."""
        return self._intervals.get(name) or self.time(name)

    # -- queries ----------------------------------------------------------------

    def elapsed(self, name: str = GLOBAL) -> float:
        """Total seconds, including the running interval; 0.0 for unknown timers."""
        timer = self._timers.get(name)
        return 0.0 if timer is None else self._elapsed(timer)

    def count(self, name: str = GLOBAL) -> int:
        """Number of completed intervals (a running interval is not counted)."""
        timer = self._timers.get(name)
        return 0 if timer is None else timer.count

    def is_running(self, name: str = GLOBAL) -> bool:
        """Whether the timer has an open interval."""
        timer = self._timers.get(name)
        return timer is not None and timer.started_at is not None

    def rate(self, name: str, amount: float) -> float:
        """Throughput of ``amount`` per second of this timer's time; 0.0 before any time."""
        seconds = self.elapsed(name)
        return amount / seconds if seconds > 0 else 0.0

    def children(self, name: str = GLOBAL) -> list[str]:
        """Direct children of ``name`` (top-level timers for GLOBAL), implied levels included."""
        prefix = "" if name == self.GLOBAL else name + "."
        found: dict[str, None] = {}
        for other in self._timers:
            if other != self.GLOBAL and other.startswith(prefix) and other != name:
                found[prefix + other[len(prefix) :].split(".", 1)[0]] = None
        return list(found)

    def summary(self) -> dict[str, float]:
        """Elapsed seconds per timer, in creation order, for logging."""
        return {name: self._elapsed(timer) for name, timer in self._timers.items()}

    # -- laps -------------------------------------------------------------------

    def lap(self, name: str = GLOBAL) -> float:
        """Seconds this timer accumulated since the previous lap() of the same timer."""
        timer = self._timers.get(name)
        if timer is None:
            return 0.0
        now = self._elapsed(timer)
        delta, timer.lap_mark = now - timer.lap_mark, now
        return delta

    def lap_all(self) -> dict[str, float]:
        """Per-timer seconds since the previous lap_all(), e.g. per-epoch timing; independent of lap()."""
        deltas: dict[str, float] = {}
        for name, timer in self._timers.items():
            now = self._elapsed(timer)
            deltas[name], timer.lap_all_mark = now - timer.lap_all_mark, now
        return deltas

    def reset(self, name: str | None = None) -> None:
        """Zero one timer (or all); running timers keep running from now so open blocks still close."""
        names = list(self._timers) if name is None else [name]
        now = self._clock()
        for key in (n for n in names if n in self._timers):
            running = self._timers[key].started_at is not None
            self._timers[key] = _Timer(started_at=now if running else None)

    # -- checkpointing ----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain str/int/float containers (loadable with ``torch.load(weights_only=True)``)."""
        timers = {
            name: {
                "elapsed": self._elapsed(timer),
                "count": timer.count,
                "lap_mark": timer.lap_mark,
                "lap_all_mark": timer.lap_all_mark,
            }
            for name, timer in self._timers.items()
        }
        return {"version": _STATE_VERSION, "timers": timers}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace timers with saved (stopped) ones; timers running here keep running on top."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported Stopwatch state version: {state.get('version')!r}")
        now = self._clock()
        running = [name for name, timer in self._timers.items() if timer.started_at is not None]
        self._timers = {name: self._timer_from_state(saved) for name, saved in state["timers"].items()}
        for name in running:
            self._get_or_create(name).started_at = now

    # -- internals --------------------------------------------------------------

    def _get_or_create(self, name: str) -> _Timer:
        """Create timers lazily so callers never need to declare them."""
        timer = self._timers.get(name)
        if timer is None:
            if not name or "" in name.split("."):
                raise ValueError(f"invalid timer name {name!r}: dotted parts must be non-empty")
            timer = self._timers[name] = _Timer()
        return timer

    def _elapsed(self, timer: _Timer) -> float:
        """Completed time plus the open interval, if any."""
        if timer.started_at is None:
            return timer.total
        return timer.total + (self._clock() - timer.started_at)

    @staticmethod
    def _timer_from_state(saved: Mapping[str, Any]) -> _Timer:
        """Rebuild a stopped timer from its state_dict entry."""
        return _Timer(
            total=float(saved["elapsed"]),
            count=int(saved["count"]),
            lap_mark=float(saved.get("lap_mark", 0.0)),
            lap_all_mark=float(saved.get("lap_all_mark", 0.0)),
        )
