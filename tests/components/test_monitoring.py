"""Heartbeat, Monitor, GradientReporter and TorchProfiler on a few epochs of the bandit environment."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from mettle.agent.mlp import MLPPolicy
from mettle.envs.testing import BanditEnvironment
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training.component import TrainerComponent
from mettle.rl.training.components.gradients import GradientConfig, GradientReporter, gradient_stats
from mettle.rl.training.components.heartbeat import Heartbeat, HeartbeatConfig, read_heartbeat
from mettle.rl.training.components.monitor import CpuSampler, Monitor, MonitorConfig, rss_bytes
from mettle.rl.training.components.profiler import ProfilerConfig, TorchProfiler

STEPS_PER_EPOCH = 64


def make_trainer(epochs: int = 4, **changes: Any) -> Trainer:
    cfg = TrainerConfig(total_timesteps=epochs * STEPS_PER_EPOCH, batch_size=STEPS_PER_EPOCH, minibatch_size=32,
                        bptt_horizon=4, update_epochs=1, **changes)
    return Trainer(cfg, BanditEnvironment(num_envs=4), MLPPolicy(), "cpu")


class HeartbeatReader(TrainerComponent):
    """Reads the heartbeat file right after the Heartbeat (registered before it) rewrote it."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.seen: list[dict[str, Any]] = []

    def on_epoch_end(self, epoch: int) -> None:
        beat = read_heartbeat(self.path)
        assert beat is not None
        self.seen.append({**beat, "expected_step": self.context.state.agent_step})


def test_heartbeat_is_rewritten_every_epoch_atomically(tmp_path: Path) -> None:
    path = tmp_path / "run" / "heartbeat.json"
    trainer = make_trainer()
    heartbeat = trainer.register(Heartbeat(path))
    assert read_heartbeat(path)["status"] == "starting"  # type: ignore[index]
    reader = trainer.register(HeartbeatReader(path))
    trainer.train()
    assert [beat["epoch"] for beat in reader.seen] == [1, 2, 3, 4]
    assert all(beat["agent_step"] == beat["expected_step"] for beat in reader.seen)
    assert [beat["agent_step"] for beat in reader.seen] == [STEPS_PER_EPOCH * n for n in range(1, 5)]
    final = read_heartbeat(path)
    assert final is not None and final["status"] == "complete"
    assert final["agent_step"] == trainer.context.state.agent_step and final["epoch"] == 4
    assert isinstance(final["time"], float) and abs(final["time"] - time.time()) < 60  # a wall-clock stamp
    assert heartbeat.beats == 6  # start, 4 epochs, complete
    assert sorted(p.name for p in path.parent.iterdir()) == ["heartbeat.json"]  # no temp files left


def test_heartbeat_interval_and_failure_status(tmp_path: Path) -> None:
    class Boom(TrainerComponent):
        def on_epoch_end(self, epoch: int) -> None:
            if epoch == 3:
                raise RuntimeError("boom")

    path = tmp_path / "heartbeat.json"
    trainer = make_trainer()
    heartbeat = trainer.register(Heartbeat(path, epoch_interval=2))
    trainer.register(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    beat = read_heartbeat(path)
    assert beat is not None and beat["status"] == "failed" and "boom" in beat["error"]
    assert heartbeat.beats == 3  # start, epoch 2, failure


def vm_rss_mb() -> float:
    """This process's resident set from /proc/self/status, read here rather than through the monitor."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def process_cpu_seconds() -> float:
    """User plus system CPU time of this process."""
    times = os.times()
    return times.user + times.system


@pytest.mark.parametrize("use_psutil", [True, False], ids=["psutil", "proc"])
def test_monitor_reports_this_process_memory_and_no_gpu_on_cpu(use_psutil: bool) -> None:
    trainer = make_trainer(epochs=2)
    monitor = trainer.register(Monitor(use_psutil=use_psutil))
    trainer.train()
    latest = monitor.latest
    assert {"monitor/cpu_percent", "monitor/system_cpu_percent", "monitor/rss_mb"} <= latest.keys()
    assert latest["monitor/rss_mb"] == pytest.approx(vm_rss_mb(), rel=0.2)
    assert not any(key.startswith("monitor/gpu") for key in latest)  # cpu device
    assert abs(rss_bytes(use_psutil=False) - rss_bytes()) / rss_bytes() < 0.05  # /proc agrees with psutil


@pytest.mark.parametrize("use_psutil", [True, False], ids=["psutil", "proc"])
def test_cpu_percent_is_the_cpu_time_spent_since_the_previous_sample(use_psutil: bool) -> None:
    """0.3 s of busy loop and 0.1 s asleep: ~75% of a core on an idle machine, whatever share a loaded one gives."""
    sampler = CpuSampler(use_psutil)
    sampler.reset()
    wall, cpu = time.monotonic(), process_cpu_seconds()
    while process_cpu_seconds() - cpu < 0.3:
        pass
    time.sleep(0.1)
    expected = 100 * (process_cpu_seconds() - cpu) / (time.monotonic() - wall)
    busy = sampler.sample()
    assert busy["monitor/cpu_percent"] == pytest.approx(expected, abs=10), (busy, expected)
    # the machine was at least as busy as this process: its share of all the CPUs
    assert expected / (os.cpu_count() or 1) - 10 <= busy["monitor/system_cpu_percent"] <= 100.0001, (busy, expected)
    time.sleep(0.3)
    idle = sampler.sample()
    assert idle["monitor/cpu_percent"] < 10, idle  # the next sample covers only the sleep


def test_gradient_reporter_matches_direct_computation() -> None:
    trainer = make_trainer(epochs=2)
    reporter = trainer.register(GradientReporter(per_layer=True))
    trainer.train()
    named = [(name, p.grad) for name, p in trainer.context.policy.named_parameters() if p.grad is not None]
    assert named
    flat = torch.cat([grad.flatten().double() for _, grad in named])
    latest = reporter.latest
    assert latest["gradients/norm"] == pytest.approx(float(flat.norm()), rel=1e-9)
    assert latest["gradients/mean"] == pytest.approx(float(flat.mean()), rel=1e-9, abs=1e-15)
    assert latest["gradients/variance"] == pytest.approx(float(flat.var(unbiased=False)), rel=1e-9)
    assert latest["gradients/norm"] > 0
    assert latest["gradients/norm"] <= trainer.context.config.ppo.max_grad_norm * (1 + 1e-5)  # clipped in place
    for name, grad in named:
        assert latest[f"gradients/norm/{name}"] == pytest.approx(float(grad.double().norm()), rel=1e-9)


def test_gradient_stats_of_known_values_and_of_nothing() -> None:
    stats = gradient_stats([("a", torch.tensor([3.0, 0.0])), ("b", torch.tensor([[0.0], [4.0]]))])
    assert stats == {"gradients/norm": 5.0, "gradients/mean": 1.75, "gradients/variance": pytest.approx(3.1875)}
    assert gradient_stats([]) == {}


def test_profiler_traces_every_second_epoch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer = make_trainer(epochs=4)
    profiler = trainer.register(TorchProfiler(tmp_path / "profiles", interval=2))
    assert not profiler.recording
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert not caplog.records
    assert not profiler.recording
    files = sorted((tmp_path / "profiles").iterdir())
    assert [f.name for f in files] == ["trace_epoch_2.json", "trace_epoch_4.json"]
    assert profiler.traces == [tmp_path / "profiles" / name for name in ("trace_epoch_2.json", "trace_epoch_4.json")]
    for file in files:
        trace = json.loads(file.read_text())
        assert trace["traceEvents"]


def test_profiler_starts_at_registration_and_stops_on_failure(tmp_path: Path) -> None:
    class Boom(TrainerComponent):
        def on_rollout_end(self) -> None:
            if self.context.state.epoch == 1:
                raise RuntimeError("boom")

    trainer = make_trainer(epochs=3)
    profiler = trainer.register(TorchProfiler(tmp_path, interval=1))
    assert profiler.recording  # epoch 1 is due: recording from registration
    trainer.register(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert not profiler.recording
    assert [p.name for p in tmp_path.iterdir()] == ["trace_epoch_1.json"]
    with torch.profiler.profile():  # no profiler left running: a new one can start
        torch.ones(1).add_(1)


def test_configs_have_defaults_and_forbid_unknown_fields() -> None:
    assert (HeartbeatConfig().enabled, HeartbeatConfig().interval) == (True, 1)
    assert (MonitorConfig().enabled, GradientConfig().enabled, ProfilerConfig().enabled) == (False, False, False)
    assert ProfilerConfig().interval == 100
    with pytest.raises(ValidationError):
        MonitorConfig(intervall=2)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        GradientConfig(interval=0)
