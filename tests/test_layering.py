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


# --------------------------------------------------------------------------- who may import what, by package
AGENT = PACKAGE / "agent"
REGISTRY_FACADES = ("registry.py", "__init__.py")
"""The registry itself, and the package's public face that re-exports `register_policy` and friends."""


def registry_names() -> set[str]:
    """`mettle.agent.registry` and every name `mettle.agent` re-exports from it (`from mettle.agent import ...`)."""
    names = {"mettle.agent.registry"}
    for node in ast.walk(ast.parse((AGENT / "__init__.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "mettle.agent.registry":
            names.update(f"mettle.agent.{alias.asname or alias.name}" for alias in node.names)
    return names


POLICY_MODULES = sorted(p for p in AGENT.rglob("*.py") if p.name not in REGISTRY_FACADES)


@pytest.mark.parametrize("path", POLICY_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_registry_names_policies(path: Path) -> None:
    found = sorted(file_imports(path) & registry_names())
    assert not found, (f"{path.relative_to(PACKAGE)} imports {found}; policies never import the registry: whoever "
                       "saves a policy asks mettle.agent.registry.policy_spec for its name")


LOSS_MODULES = sorted((PACKAGE / "rl" / "loss").rglob("*.py"))
ABOVE_LOSSES = ("mettle.rl.training", "mettle.rl.trainer", "mettle.run", "mettle.cli", "mettle.config")
"""The loop that runs the losses and everything above it; no module of it is allowed into rl/loss/."""


@pytest.mark.parametrize("path", LOSS_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_losses_do_not_reach_up_into_the_training_loop(path: Path) -> None:
    upward = within(file_imports(path), ABOVE_LOSSES)
    assert not upward, (f"{path.relative_to(PACKAGE)} imports {upward}; losses read mettle.rl.hyperparameters, "
                        "mettle.rl.minibatch, mettle.rl.policy_files and the protocols in rl/loss/trainer_view.py")


ENV_MODULES = sorted((PACKAGE / "envs").rglob("*.py"))


@pytest.mark.parametrize("path", ENV_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_envs_do_not_import_the_run_config(path: Path) -> None:
    found = within(file_imports(path), ("mettle.config", "mettle.recipes"))
    assert not found, (f"{path.relative_to(PACKAGE)} imports {found}; the run config sits above envs/, which "
                       "takes its settings as arguments")


# --------------------------------------------------------------------------- no cycles among module-level imports
def module_name(path: Path) -> str:
    """The dotted name of a file of the package (a package's own name for its __init__.py)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def run_time_imports(body: list[ast.stmt], package: str) -> set[str]:
    """What a module imports while it is executed: module-level statements, not functions or TYPE_CHECKING."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names |= imported_modules(ast.unparse(node), package)
        elif isinstance(node, ast.If):
            checking = ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            names |= run_time_imports(node.orelse if checking else node.body + node.orelse, package)
        elif isinstance(node, ast.Try):
            blocks = [node.body, node.orelse, node.finalbody, *(handler.body for handler in node.handlers)]
            names |= set().union(*(run_time_imports(block, package) for block in blocks))
        elif isinstance(node, ast.With):
            names |= run_time_imports(node.body, package)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules its execution imports, with the packages that importing them runs first
    (except its own enclosing packages, which are already being imported when it runs)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for imported in run_time_imports(ast.parse(path.read_text()).body, package):
            parts = imported.split(".")
            prefixes = {".".join(parts[:end]) for end in range(1, len(parts) + 1)}
            targets |= {p for p in prefixes if p in modules and not (name == p or name.startswith(p + "."))}
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (each holds an import cycle), by Tarjan's walk."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in order:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            group = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return found


def test_no_import_cycles_among_module_level_imports() -> None:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    found = cycles(import_graph(modules))
    assert not found, f"module-level imports go round in circles: {found}; move the shared part below both"


def test_the_cycle_finder_sees_a_cycle_through_a_package_init(tmp_path: Path) -> None:
    """A loss importing a module of rl.training at module level would run rl/training/__init__, which imports
    the loop, which imports the losses: one cycle, although no two files import each other."""
    files = {
        "pkg/__init__.py": "",
        "pkg/loss/__init__.py": "from pkg.loss.teacher import Teacher\n",
        "pkg/loss/teacher.py": "from pkg.training.files import load\nclass Teacher: ...\n",
        "pkg/training/__init__.py": "from pkg.training.core import Loop\n",
        "pkg/training/core.py": "from pkg.loss import Teacher\nclass Loop: ...\n",
        "pkg/training/files.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.loss.teacher\n"
                                  "def load():\n    import pkg.loss.teacher\n"),  # neither runs on import
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = {".".join(Path(name).with_suffix("").parts).removesuffix(".__init__"): tmp_path / name
               for name in files}
    assert cycles(import_graph(modules)) == [["pkg.loss", "pkg.loss.teacher", "pkg.training", "pkg.training.core"]]
    del modules["pkg.training.core"]  # what is left imports pkg.loss.teacher only to type-check, or when called
    assert cycles(import_graph(modules)) == []


HANDED_OVER = ("context", "experience")
"""Attributes one object must not set on another: a reader could no longer tell which process a line runs in."""


def assigned_names(targets: list[ast.expr]) -> list[ast.expr]:
    """The expressions a statement binds (tuple targets unpacked), not those it only reads, like `a.b` in `a.b[i]`."""
    return [t for target in targets for t in (assigned_names(target.elts) if isinstance(target, (ast.Tuple, ast.List))
                                              else [target])]


def foreign_assignments(source: str) -> list[str]:
    """`x.context = ...` / `x.y.experience = ...` where x is not `self` itself setting its own attribute."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in assigned_names(targets):
            own = isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
            if isinstance(target, ast.Attribute) and target.attr in HANDED_OVER and not own:
                found.append(f"line {target.lineno}: {ast.unparse(target)}")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_assigns_another_objects_context_or_experience(path: Path) -> None:
    assert foreign_assignments(path.read_text()) == []


def test_the_assignment_walk_sees_a_swapped_context_and_experience() -> None:
    source = ("self.context = c\nself.core.context = c\nctx.experience = e\na, core.context = 1, 2\n"
              "ctx.experience.x[0] = 1\n")
    assert foreign_assignments(source) == ["line 2: self.core.context", "line 3: ctx.experience",
                                           "line 4: core.context"]


ROLLOUT_SIDE = {"env", "get_observations", "send_actions", "collect", "_held", "_pending", "held", "pending"}
"""What belongs to the Collector: the environment, stepping it, and the decisions held between rollouts."""


def test_the_core_loop_neither_steps_an_environment_nor_holds_decisions() -> None:
    tree = ast.parse((PACKAGE / "rl" / "training" / "core.py").read_text())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    used |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert used & ROLLOUT_SIDE == set()
