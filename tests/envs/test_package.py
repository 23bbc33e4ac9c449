"""`import mettle.envs` is cheap: simulators are imported only when one of their names is used."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mettle.envs

SIMULATORS = ("mettagrid", "pettingzoo", "gymnasium", "torch")


def imported_after(code: str) -> dict[str, bool]:
    """Run `code` in a fresh interpreter; which simulator packages it left in sys.modules."""
    probe = f"import json, sys\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {SIMULATORS!r}}}))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_package_imports_no_simulator() -> None:
    assert imported_after("import mettle.envs") == dict.fromkeys(SIMULATORS, False)


def test_a_mettagrid_name_imports_mettagrid_only_when_used() -> None:
    loaded = imported_after("import mettle.envs\nassert mettle.envs.MettaGridEnvironment.__name__")
    assert loaded["mettagrid"] and not loaded["pettingzoo"]


def test_every_export_resolves_to_its_defining_module() -> None:
    from mettle.envs.mettagrid import MettaGridEnvironment
    from mettle.envs.vector import VectorEnvironment

    assert mettle.envs.MettaGridEnvironment is MettaGridEnvironment
    assert mettle.envs.VectorEnvironment is VectorEnvironment
    assert all(getattr(mettle.envs, name) is not None for name in mettle.envs.__all__)
    assert set(mettle.envs.__all__) <= set(dir(mettle.envs))
    with pytest.raises(AttributeError, match="no attribute 'NoSuchEnv'"):
        _ = mettle.envs.NoSuchEnv
