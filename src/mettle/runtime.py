"""Process-wide settings that make CPU training fast, applied once by the Trainer."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import torch

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter numbers (malloc.h)."""
FREED_MEMORY_KEPT = 1 << 30
"""Bytes of freed memory glibc may keep for reuse instead of returning them to the kernel."""
OLDER_GLIBC_MMAP_MAX = 32 << 20
"""The largest mmap threshold glibc releases before about 2.35 accept (HEAP_MAX_SIZE / 2 on 64-bit)."""


@functools.cache
def keep_freed_memory(limit: int = FREED_MEMORY_KEPT) -> bool:
    """Make glibc reuse freed blocks up to `limit` bytes instead of unmapping them; True when applied.

    By default glibc serves every block over a few MiB with a fresh mmap and unmaps it on free, so each
    large temporary tensor (the token encoder's [rows, tokens, embed] activations) page-faults all its
    pages again: that made arena training 1.3-1.5x slower. Not glibc (macOS, musl): no-op.
    """
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.debug("no glibc mallopt here (%s); the allocator keeps its defaults", path)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = bool(mallopt(M_TRIM_THRESHOLD, limit))
    mapped = any(bool(mallopt(M_MMAP_THRESHOLD, value)) for value in (limit, min(limit, OLDER_GLIBC_MMAP_MAX)))
    if not (trimmed and mapped):
        logger.warning("glibc refused to keep freed memory (mallopt trim %s, mmap %s): large tensors will "
                       "page-fault on every allocation; set keep_freed_memory=false to silence this", trimmed, mapped)
    return trimmed and mapped


def check_torch_compile(device: torch.device) -> None:
    """Fail before training, naming the fix, when torch.compile cannot build CPU kernels here."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without this helper: let torch.compile report for itself
        return
    try:
        get_cpp_compiler()
    except Exception as error:  # inductor raises its own InvalidCxxCompiler
        raise ValueError(
            f"torch_compile=true needs a C++ compiler for CPU kernels, and none was found ({error}); "
            "install g++ (or set CXX), or set torch_compile=false"
        ) from None


def use_torch_threads(count: int) -> None:
    """Torch's intra-op threads in this process (0 keeps torch's default): small policies run fastest on one,
    in a process that only acts (eval, play) as much as in training (on 2 cores, 2 threads made eval 100x slower)."""
    if count:
        torch.set_num_threads(count)
