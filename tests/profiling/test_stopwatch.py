"""Tests for mettle.profiling.Stopwatch, driven by a fake clock for exact timings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from mettle.profiling import Stopwatch


class FakeClock:
    """Manually advanced clock so elapsed times are exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sw(clock: FakeClock) -> Stopwatch:
    return Stopwatch(clock=clock)


def test_nested_context_managers_time_each_timer(sw: Stopwatch, clock: FakeClock) -> None:
    with sw("rollout"):
        clock.advance(1.0)
        with sw("rollout.env"):
            clock.advance(2.0)
        with sw.time("rollout.inference"):
            clock.advance(3.0)
    with sw("train"):
        clock.advance(4.0)
    assert sw.summary() == {"rollout": 6.0, "rollout.env": 2.0, "rollout.inference": 3.0, "train": 4.0}
    assert sw.count("rollout") == 1


def test_children_lists_direct_children_only(sw: Stopwatch) -> None:
    for name in ["rollout", "rollout.env", "rollout.env.reset", "rollout.inference", "train", "trainer.x.y"]:
        with sw(name):
            pass
    sw.start()
    assert sw.children("rollout") == ["rollout.env", "rollout.inference"]
    assert sw.children("rollout.env") == ["rollout.env.reset"]
    assert sw.children("train") == []  # "trainer.x.y" is not under "train"
    assert sw.children("trainer") == ["trainer.x"]  # implied intermediate level
    assert sw.children() == ["rollout", "train", "trainer"]  # global is the root, not its own child


def test_global_timer_is_default_name(sw: Stopwatch, clock: FakeClock) -> None:
    sw.start()
    clock.advance(5.0)
    assert sw.elapsed() == 5.0
    assert sw.stop() == 5.0
    assert sw.elapsed(Stopwatch.GLOBAL) == 5.0


def test_start_stop_returns_interval(sw: Stopwatch, clock: FakeClock) -> None:
    sw.start("x")
    clock.advance(1.5)
    assert sw.stop("x") == 1.5
    clock.advance(10.0)
    sw.start("x")
    clock.advance(0.5)
    assert sw.stop("x") == 0.5
    assert sw.elapsed("x") == 2.0
    assert sw.count("x") == 2


def test_double_start_raises_naming_timer(sw: Stopwatch) -> None:
    sw.start("rollout.env")
    with pytest.raises(ValueError, match=r"'rollout\.env' is already running"):
        sw.start("rollout.env")


def test_reentering_same_timer_raises(sw: Stopwatch) -> None:
    with sw("train"), pytest.raises(ValueError, match="'train'"), sw("train"):
        pass


def test_stop_of_stopped_or_unknown_timer_raises(sw: Stopwatch) -> None:
    with pytest.raises(ValueError, match="'never' is not running"):
        sw.stop("never")
    with sw("done"):
        pass
    with pytest.raises(ValueError, match="'done' is not running"):
        sw.stop("done")


def test_invalid_names_rejected(sw: Stopwatch) -> None:
    for bad in ["", "a..b", ".a", "a."]:
        with pytest.raises(ValueError, match="invalid timer name"):
            sw.start(bad)


def test_context_manager_stops_on_exception(sw: Stopwatch, clock: FakeClock) -> None:
    with pytest.raises(RuntimeError), sw("boom"):
        clock.advance(2.0)
        raise RuntimeError("fail")
    assert not sw.is_running("boom")
    assert sw.elapsed("boom") == 2.0
    assert sw.count("boom") == 1


def test_elapsed_includes_running_interval(sw: Stopwatch, clock: FakeClock) -> None:
    with sw("x"):
        clock.advance(1.0)
    sw.start("x")
    clock.advance(2.0)
    assert sw.is_running("x")
    assert sw.elapsed("x") == 3.0
    assert sw.count("x") == 1  # running interval is not yet counted
    assert sw.elapsed("unknown") == 0.0
    assert sw.count("unknown") == 0
    assert "unknown" not in sw.summary()  # queries do not create timers


def test_rate(sw: Stopwatch, clock: FakeClock) -> None:
    assert sw.rate("rollout", 1000) == 0.0
    with sw("rollout"):
        clock.advance(4.0)
    assert sw.rate("rollout", 1000) == 250.0


def test_lap_returns_delta_since_previous_lap(sw: Stopwatch, clock: FakeClock) -> None:
    assert sw.lap("x") == 0.0
    with sw("x"):
        clock.advance(2.0)
    assert sw.lap("x") == 2.0  # first lap: since creation
    sw.start("x")
    clock.advance(3.0)
    assert sw.lap("x") == 3.0  # includes the running interval
    clock.advance(1.0)
    sw.stop("x")
    assert sw.lap("x") == 1.0
    assert sw.lap("x") == 0.0


def test_lap_all_deltas_independent_of_lap(sw: Stopwatch, clock: FakeClock) -> None:
    with sw("a"):
        clock.advance(1.0)
    assert sw.lap("a") == 1.0
    assert sw.lap_all() == {"a": 1.0}  # lap() did not consume lap_all's delta
    with sw("a"):
        clock.advance(2.0)
    with sw("b"):
        clock.advance(5.0)
    assert sw.lap_all() == {"a": 2.0, "b": 5.0}
    assert sw.lap("a") == 2.0  # lap_all() did not consume lap()'s delta
    assert sw.lap_all() == {"a": 0.0, "b": 0.0}


def test_state_dict_round_trip_through_torch(sw: Stopwatch, clock: FakeClock, tmp_path: Path) -> None:
    with sw("rollout"):
        clock.advance(3.0)
    with sw("rollout"):
        clock.advance(1.0)
    sw.lap_all()
    sw.start()
    clock.advance(10.0)  # global is running when saved
    path = tmp_path / "sw.pt"
    torch.save(sw.state_dict(), path)
    state = torch.load(path, weights_only=True)

    clock2 = FakeClock()
    restored = Stopwatch(clock=clock2)
    restored.load_state_dict(state)
    assert restored.summary() == {"rollout": 4.0, "global": 10.0}
    assert restored.count("rollout") == 2
    assert not restored.is_running()  # saved running, restored stopped

    restored.start()
    with restored("rollout"):
        clock2.advance(2.0)
    assert restored.elapsed("rollout") == 6.0
    assert restored.elapsed() == 12.0
    assert restored.count("rollout") == 3
    assert restored.lap_all() == {"rollout": 2.0, "global": 12.0}  # lap_all marks survive the round trip


def test_state_dict_is_plain_containers(sw: Stopwatch) -> None:
    with sw("a.b"):
        pass

    def check(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                assert isinstance(key, str)
                check(item)
        else:
            assert type(value) in (int, float)

    check(sw.state_dict())


def test_load_keeps_locally_running_timers_running(sw: Stopwatch, clock: FakeClock) -> None:
    saved_clock = FakeClock()
    saved = Stopwatch(clock=saved_clock)
    with saved.time():
        saved_clock.advance(4.0)
    sw.start()
    sw.start("local")
    clock.advance(7.0)
    sw.load_state_dict(saved.state_dict())  # running timers restart from now on top of the saved totals
    assert sw.is_running() and sw.is_running("local")
    clock.advance(1.0)
    assert sw.stop() == 1.0
    assert sw.elapsed() == 5.0
    assert sw.stop("local") == 1.0
    assert sw.count("local") == 1


def test_load_rejects_unknown_version(sw: Stopwatch) -> None:
    with pytest.raises(ValueError, match="version"):
        sw.load_state_dict({"version": 99, "timers": {}})


def test_reset_one_and_all(sw: Stopwatch, clock: FakeClock) -> None:
    with sw("a"):
        clock.advance(1.0)
    with sw("b"):
        clock.advance(2.0)
    sw.reset("a")
    sw.reset("missing")  # no-op
    assert sw.summary() == {"a": 0.0, "b": 2.0}
    assert sw.count("a") == 0
    sw.reset()
    assert sw.summary() == {"a": 0.0, "b": 0.0}
    assert sw.lap("b") == 0.0
    assert sw.lap_all() == {"a": 0.0, "b": 0.0}


def test_reset_while_running_keeps_block_valid(sw: Stopwatch, clock: FakeClock) -> None:
    with sw("x"):
        clock.advance(5.0)
        sw.reset()
        clock.advance(1.0)
    assert sw.elapsed("x") == 1.0
    assert sw.count("x") == 1


def test_blocks_entered_again_and_again_time_into_the_current_timers(sw: Stopwatch, clock: FakeClock) -> None:
    """Blocks of one name are cheap reusable objects: after a load or a reset they time into the new timer."""
    for _ in range(3):
        with sw("rollout.env"):
            clock.advance(1.0)
    other = Stopwatch(clock=clock)
    with other("rollout.env"):
        clock.advance(5.0)
    sw.load_state_dict(other.state_dict())
    with sw("rollout.env"):
        clock.advance(2.0)
    assert (sw.elapsed("rollout.env"), sw.count("rollout.env")) == (7.0, 2)
    sw.reset("rollout.env")
    with sw.time("rollout.env"):
        clock.advance(0.5)
    assert (sw.elapsed("rollout.env"), sw.count("rollout.env")) == (0.5, 1)


def test_default_clock_is_real() -> None:
    """Wall time in seconds: a 50 ms sleep counts (a CPU-time clock would read ~0), within the time around it."""
    sw = Stopwatch()
    before = time.perf_counter()
    with sw("real"):
        time.sleep(0.05)
    around = time.perf_counter() - before
    assert 0.049 <= sw.elapsed("real") <= around, (sw.elapsed("real"), around)  # 1 ms for clock rounding
    assert sw.count("real") == 1
