"""DistributedHelper: the one place that knows whether we run on one process or many."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from mettle import errors

if TYPE_CHECKING:
    from mettle.rl.trainer_config import TrainerConfig


class CollectiveError(RuntimeError):
    """A collective across ranks failed: another rank died or left (the launcher or torchrun says which and how)."""


def collective_failure(error: BaseException) -> bool:
    """Whether `error` (or its cause) is a failed collective: ours, or one inside DDP's backward (gloo, NCCL)."""
    return any(isinstance(current, CollectiveError | dist.DistError) or "gloo/transport" in str(current)
               or "NCCL" in str(current) for current in errors.exception_chain(error))


def backend_reason(error: BaseException) -> str:
    """gloo's `[.../pair.cc:553] Connection closed by peer [127.0.0.1]:39105. This is typically...` as its gist."""
    text = errors.one_line(error, first_line=True)
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0]


def split_batches(cfg: TrainerConfig, world: int) -> TrainerConfig:
    """Global batch and minibatch sizes as per-rank ones for `world` ranks (a launcher checks before it starts)."""
    for name in ("batch_size", "minibatch_size"):
        value = getattr(cfg, name)
        if value % world:
            raise ValueError(f"{name} {value} does not split over {world} ranks; use a multiple of {world}")
    data = cfg.model_dump()
    data.update(batch_size=cfg.batch_size // world, minibatch_size=cfg.minibatch_size // world)
    return type(cfg).model_validate(data)


class DistributedHelper:
    """Rank queries and collectives; every method also works without a process group.

    Under `torchrun` (WORLD_SIZE > 1 in the environment) it joins the process group from torchrun's
    RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT: nccl for CUDA tensors, gloo for CPU tensors.
    """

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 300.0) -> None:
        self.device = self.local_device(device)
        self._owns_group = False
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
            self._owns_group = True

    @staticmethod
    def local_device(device: torch.device | str) -> torch.device:
        """`cuda` means this process's GPU (LOCAL_RANK) under torchrun; other devices pass through."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    @property
    def is_distributed(self) -> bool:
        """Whether more than one process takes part."""
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def get_rank(self) -> int:
        """This process's global rank (0 without a process group)."""
        return dist.get_rank() if self.is_distributed else 0

    def get_world_size(self) -> int:
        """Number of processes (1 without a process group)."""
        return dist.get_world_size() if self.is_distributed else 1

    def is_master(self) -> bool:
        """Whether this process does the rank-0-only work (logging, checkpoints)."""
        return self.get_rank() == 0

    def seed_offset(self) -> int:
        """Added to the configured seed so every rank explores differently."""
        return self.get_rank() * 1_000_003

    def wrap_policy(self, policy: nn.Module) -> nn.Module:
        """DDP-wrap the policy when distributed; the unwrapped module keeps the plain state dict."""
        if not self.is_distributed:
            return policy
        device = next(policy.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(policy, device_ids=device_ids)

    def scale_batches_by_world_size(self, cfg: TrainerConfig) -> TrainerConfig:
        """Turn global batch and minibatch sizes into per-rank ones, so a run's totals do not grow with ranks."""
        return split_batches(cfg, self.get_world_size())

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Name a failed collective (a peer died: the backend's error says only 'connection reset')."""
        try:
            yield
        except RuntimeError as error:  # gloo's and NCCL's errors, DistBackendError among them
            raise CollectiveError(f"rank {dist.get_rank()}: {what} across ranks failed ({backend_reason(error)})") \
                from error

    def synchronize(self) -> None:
        """Barrier across ranks."""
        if self.is_distributed:
            with self._collective("a barrier"):
                dist.barrier()

    def broadcast_from_master(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj]
        with self._collective("a broadcast"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor; the input is left untouched)."""
        if not self.is_distributed:
            return tensor
        out = tensor.clone()
        with self._collective("an all-reduce"):
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise mean over ranks."""
        return self.all_reduce_sum(tensor) / self.get_world_size()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one, so decisions to stop stay in step."""
        if not self.is_distributed:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([float(flag)])).item() > 0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.get_world_size()
        with self._collective("an all-gather"):
            dist.all_gather_object(out, obj)
        return out

    def cleanup(self, synchronize: bool = False) -> None:
        """Leave the process group if this helper created it; safe to call twice.

        `synchronize=True` (normal exits) waits for every rank first, so no rank tears the group (and
        rank 0 its store) down while another still uses it; after an error, leave at once instead.
        """
        if self._owns_group and dist.is_initialized():
            if synchronize:
                dist.barrier()
            dist.destroy_process_group()
        self._owns_group = False
