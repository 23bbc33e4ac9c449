"""DistributedHelper: the one place that knows whether we run on one process or many."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class DistributedHelper:
    """Rank queries and collectives; every method also works without a process group.

    Under `torchrun` (WORLD_SIZE > 1 in the environment) it joins the process group: nccl on
    CUDA, gloo otherwise.
    """

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 300.0) -> None:
        self.device = torch.device(device)
        self._owns_group = False
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
            self._owns_group = True

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
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(policy, device_ids=device_ids)

    def synchronize(self) -> None:
        """Barrier across ranks."""
        if self.is_distributed:
            dist.barrier()

    def broadcast_from_master(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor; the input is left untouched)."""
        if not self.is_distributed:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise mean over ranks."""
        return self.all_reduce_sum(tensor) / self.get_world_size()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def cleanup(self) -> None:
        """Leave the process group if this helper created it; safe to call twice."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False
