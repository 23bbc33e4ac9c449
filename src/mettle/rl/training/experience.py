"""Experience: the rollout buffer, laid out as [segments, bptt_horizon] windows of agent rows."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from mettle.agent.policy import PolicyOutput, TensorSpec
from mettle.rl.minibatch import Minibatch
from mettle.rl.trainer_config import SamplingConfig

STEP_FIELDS: dict[str, TensorSpec] = {
    "log_probs": TensorSpec((), torch.float32),
    "values": TensorSpec((), torch.float32),
    "rewards": TensorSpec((), torch.float32),
    "terminals": TensorSpec((), torch.bool),
    "truncations": TensorSpec((), torch.bool),
    "mask": TensorSpec((), torch.bool),
    "starts": TensorSpec((), torch.bool),
}


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (MemAvailable on the CPU); None where it cannot be known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits_in_memory(batch_size: int, specs: dict[str, TensorSpec], device: torch.device) -> None:
    """Refuse, naming the sizes, a buffer larger than the free memory, before allocating it."""
    per_step = 8 + sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in specs.values())  # + advantage targets
    needed, free = batch_size * per_step, available_memory(device)
    if free is not None and needed > free:
        gib = 2**30
        raise ValueError(f"batch_size {batch_size:,} needs {needed / gib:,.1f} GiB for the rollout buffer "
                         f"({per_step:,} bytes per agent step) but {device} has {free / gib:,.1f} GiB free; "
                         "lower batch_size (and minibatch_size)")


Stored = torch.Tensor | np.ndarray
"""A value to store: a tensor, or a numpy array (an environment's batch arrays, passed as they are)."""


class Experience:
    """Stores each agent row's steps in consecutive windows so that BPTT sees contiguous time.

    Row r's steps t = 0..k*T-1 (k windows of T = bptt_horizon steps per epoch) live in segment
    `(t // T) * num_rows + r` at position `t % T`.

    The store methods run once per rollout step, so on the CPU they write through numpy views of the buffers:
    a numpy assignment costs well under a microsecond where torch's indexed assignment costs several.
    """

    def __init__(
        self,
        batch_size: int,
        bptt_horizon: int,
        num_rows: int,
        policy_spec: dict[str, TensorSpec],
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size % (num_rows * bptt_horizon):
            raise ValueError(f"batch_size {batch_size} is not a multiple of {num_rows} rows x {bptt_horizon}")
        check_fits_in_memory(batch_size, {**policy_spec, **STEP_FIELDS}, torch.device(device))
        self.horizon = bptt_horizon
        self.num_rows = num_rows
        self.segments = batch_size // bptt_horizon
        self.windows_per_row = self.segments // num_rows
        self.steps_per_row = self.windows_per_row * bptt_horizon
        self.device = torch.device(device)
        self.buffers: dict[str, torch.Tensor] = {}
        self._views: dict[str, tuple[torch.Tensor, int, np.ndarray]] = {}
        """Numpy views of CPU buffers for the store methods, with the tensor and address each was taken from."""
        self.add_fields({**policy_spec, **STEP_FIELDS})
        self.bootstrap = torch.zeros(num_rows, device=self.device)
        self.log_ratio = torch.zeros(self.segments, bptt_horizon, device=self.device)
        self._row_step = np.zeros(num_rows, dtype=np.int64)
        self._full = False

    def add_fields(self, specs: dict[str, TensorSpec]) -> None:
        """Allocate more per-step fields (a loss's); a name already stored is an error, not an overwrite."""
        taken = sorted(set(specs) & set(self.buffers))
        if taken:
            raise ValueError(f"experience fields {taken} are already stored; give the new fields other names")
        self.buffers.update({name: self._allocate(spec) for name, spec in specs.items()})

    def _allocate(self, spec: TensorSpec) -> torch.Tensor:
        return torch.zeros((self.segments, self.horizon, *spec.shape), dtype=spec.dtype, device=self.device)

    @property
    def batch_size(self) -> int:
        """Agent steps held when full."""
        return self.segments * self.horizon

    @property
    def full(self) -> bool:
        """Whether every row has stored all its steps for this epoch (worked out when a block of rows fills)."""
        return self._full

    def rows_full(self, rows: slice) -> bool:
        """Whether the given rows have stored all their steps."""
        return bool(self._row_step[rows.start] >= self.steps_per_row)

    def reset(self) -> None:
        """Start filling a new epoch."""
        self._row_step[:] = 0
        self._full = False
        self.log_ratio.zero_()

    def _cursor(self, rows: slice) -> tuple[slice, int]:
        step = int(self._row_step[rows.start])
        base = (step // self.horizon) * self.num_rows
        return slice(base + rows.start, base + rows.stop), step % self.horizon

    def store_decision(
        self,
        rows: slice,
        output: PolicyOutput,
        observations: Stored,
        mask: Stored,
        starts: Stored,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Record what the policy saw and chose at the rows' current step (and the losses' `extras` fields).

        `output` is shaped [rows, 1, ...] (one time step); the other values [rows, ...].
        """
        seg, pos = self._cursor(rows)
        put = self._put
        put("observations", seg, pos, observations)
        put("actions", seg, pos, output.actions, first_step=True)
        put("log_probs", seg, pos, output.log_prob, first_step=True)
        put("values", seg, pos, output.values, first_step=True)
        put("mask", seg, pos, mask)
        put("starts", seg, pos, starts)
        for name, tensor in output.memory.items():
            put(name, seg, pos, tensor)
        for name, tensor in (extras or {}).items():
            put(name, seg, pos, tensor)

    def store_outcome(self, rows: slice, rewards: Stored, terminals: Stored, truncations: Stored) -> None:
        """Record the result of the rows' last decision and advance them one step."""
        seg, pos = self._cursor(rows)
        self._put("rewards", seg, pos, rewards)
        self._put("terminals", seg, pos, terminals)
        self._put("truncations", seg, pos, truncations)
        self._row_step[rows] += 1
        if self._row_step[rows.start] >= self.steps_per_row:  # a block filled: are they all?
            self._full = bool((self._row_step >= self.steps_per_row).all())

    def _put(self, name: str, seg: slice, pos: int, value: Stored, first_step: bool = False) -> None:
        """buffers[name][seg, pos] = value (value[:, 0] with `first_step`), through numpy where both are on the CPU."""
        buffer = self.buffers[name]
        if buffer.is_cpu and (isinstance(value, np.ndarray) or value.is_cpu):
            try:
                array = value if isinstance(value, np.ndarray) else (
                    value.detach() if value.requires_grad else value).numpy()
                self._host_view(name, buffer)[seg, pos] = array[:, 0] if first_step else array
                return
            except TypeError:  # a dtype numpy lacks (bfloat16): torch's own assignment below
                pass
        tensor = torch.as_tensor(value)
        buffer[seg, pos] = tensor[:, 0] if first_step else tensor

    def _host_view(self, name: str, buffer: torch.Tensor) -> np.ndarray:
        """A numpy view of a CPU buffer, kept while it still shows that tensor's memory.

        `share_memory_()` moves a tensor's storage in place, freeing the old memory, so a kept view is checked
        against the tensor (the same object, at the same address) before every use, never trusted.
        """
        kept = self._views.get(name)
        if kept is None or kept[0] is not buffer or kept[1] != buffer.data_ptr():
            kept = self._views[name] = (buffer, buffer.data_ptr(), buffer.numpy())
        return kept[2]

    def set_bootstrap(self, rows: slice, values: torch.Tensor) -> None:
        """Value of the observation after each row's last stored step."""
        self.bootstrap[rows] = values

    def as_row_series(self, tensor: torch.Tensor) -> torch.Tensor:
        """View [segments, T, ...] as each row's whole epoch, [rows, k*T, ...]."""
        k, rows, t = self.windows_per_row, self.num_rows, self.horizon
        shaped = tensor.reshape(k, rows, t, *tensor.shape[2:]).transpose(0, 1)
        return shaped.reshape(rows, k * t, *tensor.shape[2:])

    def from_row_series(self, tensor: torch.Tensor) -> torch.Tensor:
        """Inverse of `as_row_series`."""
        k, rows, t = self.windows_per_row, self.num_rows, self.horizon
        shaped = tensor.reshape(rows, k, t, *tensor.shape[2:]).transpose(0, 1)
        return shaped.reshape(k * rows, t, *tensor.shape[2:])

    def minibatches(
        self,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        minibatch_segments: int,
        sampling: SamplingConfig,
        progress: float,
        generator: torch.Generator | None = None,
    ) -> Iterator[Minibatch]:
        """Yield `segments // minibatch_segments` minibatches of whole segments."""
        count = self.segments // minibatch_segments
        if sampling.method == "sequential":
            order = torch.randperm(self.segments, generator=generator).to(self.device)
            weights = torch.ones(minibatch_segments, 1, device=self.device)
            # One gather per field for the whole pass, then a slice per minibatch (a view, no copy).
            shuffled = self._gather(order[: count * minibatch_segments], advantages, returns, weights)
            live = shuffled.data["mask"].to(weights.dtype).view(count, -1)
            step_weights = (live / live.sum(dim=1, keepdim=True).clamp_min(1e-8)).view_as(shuffled.advantages)
            for start in range(0, count * minibatch_segments, minibatch_segments):
                minibatch = shuffled.rows(slice(start, start + minibatch_segments))
                minibatch.step_weights = step_weights[start : start + minibatch_segments]
                yield minibatch
            return
        probs = prioritized_probabilities(advantages, sampling.prio_alpha)
        beta = sampling.prio_beta0 + (1.0 - sampling.prio_beta0) * min(max(progress, 0.0), 1.0)
        for _ in range(count):
            idx = torch.multinomial(probs.cpu(), minibatch_segments, replacement=False, generator=generator)
            idx = idx.to(self.device)
            weights = importance_weights(probs[idx], self.segments, beta).unsqueeze(1)
            yield self._gather(idx, advantages, returns, weights)

    def _gather(
        self, idx: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, weights: torch.Tensor
    ) -> Minibatch:
        data = {name: buf[idx] for name, buf in self.buffers.items()}
        return Minibatch(idx, data, advantages[idx], returns[idx], weights)


def prioritized_probabilities(advantages: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-segment sampling probabilities proportional to (sum |advantage|) ** alpha."""
    priority = advantages.abs().sum(dim=1).pow(alpha)
    total = priority.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(priority, 1.0 / priority.numel())
    return priority / total


def importance_weights(probs: torch.Tensor, population: int, beta: float) -> torch.Tensor:
    """Weights (N * p) ** -beta that undo prioritised sampling's bias, scaled so the largest is 1."""
    weights = (population * probs).pow(-beta)
    return weights / weights.max()
