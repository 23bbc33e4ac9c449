"""Fixtures shared across the test tree (one copy of each; a test module opts in by name), and one torch thread.

The whole suite, and every process it starts, runs torch on one thread (OMP_NUM_THREADS=1, set before torch is
imported): the models are tiny, the machine is shared, and a second spinning thread costs far more than it brings
(`mettle eval` of a CartPole MLP on a busy 2-core machine: 4.1 s on two threads, 0.04 s on one). Training already
defaults to one (`torch_threads=1`); a test that wants more threads sets them itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)  # in case torch was imported before this file (a plugin)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models are faster that way, and threads only contend on a shared machine.

    Opt a whole module in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LONGEST_FIRST = (
    "tests/distributed/test_distributed.py",
    "tests/cli/test_cli_fuzz.py",
    "tests/cli/test_cli_robustness.py",
    "tests/cli/test_cli_exact_resume.py",
    "tests/cli/test_cli_resume.py",
    "tests/cli/test_cli_process_deaths.py",
    "tests/cli/test_cli_sweep.py",
    "tests/cli/test_cli_export.py",
    "tests/rl/test_exact_resume.py",
    "tests/rl/test_trainer.py",
    "tests/test_layering.py",
    "tests/envs/test_vector.py",
    "tests/cli/test_cli_overlap.py",
    "tests/cli/test_cli_untrusted_input.py",
)
"""The slowest modules (`make test PYTEST_ARGS=--durations=0`), longest first.

`make test` gives each xdist worker whole modules in collection order (`--no-loadscope-reorder`; xdist's own order,
most tests first, left the one-test fuzz module for last, a minute and a half with the other worker idle). Starting
the long modules first leaves the many short ones to even out the end.
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the LONGEST_FIRST modules to the front, in that order; the rest keep their collection order."""
    rank = {module: index for index, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
