"""Imports point one way (cli -> run -> rl -> (agent, envs) -> contracts), so the lower layers import without cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mettle

PACKAGE = Path(mettle.__file__).parent
UPPER = ("mettle.rl", "mettle.cli", "mettle.run")
"""What envs/ and agent/ sit below and must not import, even for type checking only."""


def imported_modules(source: str, package: str) -> set[str]:
    """Every module `source` imports at any depth (TYPE_CHECKING blocks, function bodies), relative ones resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from mettle import rl`
    return names


def file_imports(path: Path) -> set[str]:
    """The modules one file of the package imports."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rpartition(".")[0]
    return imported_modules(path.read_text(), package)


def within(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    """The names that are one of `prefixes` or inside one."""
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


LOWER = sorted([*(PACKAGE / "envs").rglob("*.py"), *(PACKAGE / "agent").rglob("*.py")])


@pytest.mark.parametrize("path", LOWER, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_envs_and_agent_do_not_import_upward(path: Path) -> None:
    upward = within(file_imports(path), UPPER)
    assert not upward, f"{path.relative_to(PACKAGE)} imports {upward}; take the contract from mettle.contracts"


def test_contracts_imports_nothing_from_mettle() -> None:
    ours = within(file_imports(PACKAGE / "contracts.py"), ("mettle",))
    assert not ours, f"contracts.py imports {ours}; it is the bottom layer"


def test_the_walk_sees_type_checking_relative_and_from_package_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..rl.training import Experience\n"
        "def f():\n    from mettle import cli\n"
    )
    found = within(imported_modules(source, "mettle.envs"), UPPER)
    assert found == ["mettle.cli", "mettle.rl.training", "mettle.rl.training.Experience"]


def fresh_interpreter_prints(probe: str) -> str:
    """What `probe` prints in a new Python process: module imports seen from a clean sys.modules."""
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()


def test_building_environments_loads_nothing_from_the_layers_above() -> None:
    """Also indirectly: importing every env module (the factory included) pulls in no mettle.rl, run or cli."""
    modules = ["mettle.envs.factory", "mettle.envs.gymnasium", "mettle.envs.pettingzoo", "mettle.envs.mettagrid",
               "mettle.envs.vector", "mettle.agent.registry"]
    probe = f"import sys; import {', '.join(modules)}; print(sorted(m for m in sys.modules if m.startswith({UPPER!r})))"
    loaded = fresh_interpreter_prints(probe)
    assert loaded == "[]", loaded


def test_starting_the_cli_does_not_import_the_compiler() -> None:
    """Every trainer, actor and torchrun rank imports the CLI's modules: dynamo would add ~2 s to each start."""
    probe = "import sys, mettle.cli, mettle.agent.token; print('torch._dynamo' in sys.modules)"
    loaded = fresh_interpreter_prints(probe)
    assert loaded == "False", "a module-level torch.compiler/_dynamo use imports the compiler at start"
