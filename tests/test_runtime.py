"""The allocator setting the Trainer applies: large freed blocks stay in the heap for reuse, not unmapped."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys
import textwrap

import pytest

import mettle.rl.trainer
from mettle.agent.mlp import MLPPolicy
from mettle.envs.testing import BanditEnvironment
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig

MAPPED_BYTES_WHILE_ALIVE = textwrap.dedent(
    """
    import ctypes, sys, torch
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "tuned":
        from mettle.runtime import keep_freed_memory
        assert keep_freed_memory()
    x = torch.empty(16 << 20)  # 64 MiB
    x.fill_(1.0)
    print(libc.mallinfo2().hblkhd)  # bytes glibc holds in separate mmaps, which free() unmaps
    """
)


def has_mallinfo2() -> bool:
    """glibc >= 2.33, where mallinfo2 reports the mmapped bytes."""
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")
    except OSError:
        return False


def mapped_bytes(mode: str) -> int:
    """Bytes in separately mmapped blocks while a 64 MiB tensor is alive, in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", MAPPED_BYTES_WHILE_ALIVE, mode], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not has_mallinfo2(), reason="glibc's mallopt/mallinfo2")
def test_keep_freed_memory_moves_large_tensors_from_mmap_to_the_reusable_heap() -> None:
    assert mapped_bytes("default") >= 64 << 20  # its own mmap: unmapped on free, page-faulted in again next time
    assert mapped_bytes("tuned") < 64 << 20  # from the heap, whose freed blocks are reused


@pytest.mark.parametrize("switch", [True, False])
def test_trainer_applies_keep_freed_memory_only_when_switched_on(switch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(mettle.rl.trainer, "keep_freed_memory", lambda: calls.append(True) or True)
    cfg = TrainerConfig(total_timesteps=64, batch_size=64, minibatch_size=32, bptt_horizon=4, keep_freed_memory=switch)
    Trainer(cfg, BanditEnvironment(num_envs=4), MLPPolicy(), "cpu")
    assert calls == ([True] if switch else [])
