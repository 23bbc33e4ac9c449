"""The allocator setting the Trainer applies: freed large blocks are reused, not page-faulted in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from mettle.runtime import keep_freed_memory

FAULTS_PER_ROUND = textwrap.dedent(
    """
    import resource, sys, torch
    if sys.argv[1] == "tuned":
        from mettle.runtime import keep_freed_memory
        assert keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def round():
        x = torch.empty(16 << 20)  # 64 MiB: allocated, written and freed each round
        x.fill_(1.0)
        del x
    for _ in range(12):
        round()  # the heap grows to its working size
    before = faults()
    for _ in range(10):
        round()
    print((faults() - before) / 10)
    """
)


def faults_per_round(mode: str) -> float:
    """Minor page faults per 64 MiB tensor allocated, written and freed, in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", FAULTS_PER_ROUND, mode], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_large_tensors_page_faulting_again() -> None:
    default, tuned = faults_per_round("default"), faults_per_round("tuned")
    assert default > 10_000  # glibc mmaps blocks this large: 16384 fresh 4 KiB pages every round
    assert tuned < 100


def test_keep_freed_memory_is_applied_once_and_reports_it() -> None:
    assert keep_freed_memory() is keep_freed_memory()
