"""Monitor: CPU, memory and GPU-memory use of the training process, sampled every few epochs."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from mettle.rl.training.component import TrainerComponent

try:  # psutil is optional: without it /proc and os.times give the same figures on Linux
    import psutil
except ImportError:  # pragma: no cover - exercised only where psutil is missing
    psutil = None

MB = 1024 * 1024


class MonitorConfig(BaseModel):
    """Whether and how often to sample resource use."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    enabled: bool = False
    """Sample CPU, RSS and GPU memory into the reported metrics (monitor/...)."""
    interval: int = Field(1, ge=1)
    """Epochs between samples."""


class Monitor(TrainerComponent):
    """Samples process and system CPU percent, resident memory and CUDA memory at epoch ends.

    CPU percentages are averages since the previous sample (100 = one core busy, so a process
    may exceed 100); the first sample covers the time since registration. `latest` holds the
    newest sample under monitor/ keys, for the stats reporter to merge.
    """

    master_only = True

    def __init__(self, epoch_interval: int = 1, use_psutil: bool = True) -> None:
        super().__init__(epoch_interval)
        self.latest: dict[str, float] = {}
        self._sampler = CpuSampler(use_psutil and psutil is not None)

    def register(self, context: Any) -> None:
        """Start the CPU clocks so the first sample measures training, not construction."""
        super().register(context)
        self._sampler.reset()

    def on_epoch_end(self, epoch: int) -> None:
        """Take one sample."""
        self.latest = self.sample()
        self.context.stats.metrics.update(self.latest)

    def sample(self) -> dict[str, float]:
        """CPU, memory and (on a CUDA device) GPU memory, as monitor/ metrics."""
        metrics = self._sampler.sample()
        metrics["monitor/rss_mb"] = rss_bytes(self._sampler.use_psutil) / MB
        metrics.update(gpu_memory(self.context.device))
        return metrics


class CpuSampler:
    """CPU percent of this process and of the whole machine since the previous call."""

    def __init__(self, use_psutil: bool) -> None:
        self.use_psutil = use_psutil
        self._process = psutil.Process() if use_psutil else None
        self._last_wall = time.monotonic()
        self._last_cpu = _process_cpu_seconds()
        self._last_system = _proc_stat_times()

    def reset(self) -> None:
        """Make the next sample cover the time from now."""
        if self._process is not None:
            self._process.cpu_percent(None)
            psutil.cpu_percent(None)
        self._last_wall, self._last_cpu = time.monotonic(), _process_cpu_seconds()
        self._last_system = _proc_stat_times()

    def sample(self) -> dict[str, float]:
        """Percentages since the last sample (or reset)."""
        if self._process is not None:
            return {"monitor/cpu_percent": float(self._process.cpu_percent(None)),
                    "monitor/system_cpu_percent": float(psutil.cpu_percent(None))}
        now, cpu, system = time.monotonic(), _process_cpu_seconds(), _proc_stat_times()
        metrics = {"monitor/cpu_percent": 100.0 * (cpu - self._last_cpu) / max(now - self._last_wall, 1e-9)}
        if system is not None and self._last_system is not None:
            busy, total = system[0] - self._last_system[0], system[1] - self._last_system[1]
            metrics["monitor/system_cpu_percent"] = 100.0 * busy / total if total > 0 else 0.0
        self._last_wall, self._last_cpu, self._last_system = now, cpu, system
        return metrics


def _process_cpu_seconds() -> float:
    """User plus system CPU time of this process (all threads)."""
    times = os.times()
    return times.user + times.system


def _proc_stat_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = [float(value) for value in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def rss_bytes(use_psutil: bool = True) -> float:
    """Resident set size of this process: psutil, else VmRSS from /proc/self/status, else the peak from rusage."""
    if use_psutil and psutil is not None:
        return float(psutil.Process().memory_info().rss)
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    import resource  # not on Windows; last resort is the peak, not the current size

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def gpu_memory(device: torch.device) -> dict[str, float]:
    """Allocated, reserved and peak-allocated CUDA memory of `device` in MB; empty for other devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    return {
        "monitor/gpu_memory_mb": torch.cuda.memory_allocated(device) / MB,
        "monitor/gpu_reserved_mb": torch.cuda.memory_reserved(device) / MB,
        "monitor/gpu_max_memory_mb": torch.cuda.max_memory_allocated(device) / MB,
    }
