"""The tree shows the architecture: three wings over a floor, imports only downward, no circles.

    jobs/, analysis/        entry points and what reads records
    pipeline/run/           the cluster job (Ray, Parquet, MLflow)
    pipeline/method/        what is computed per problem
    pipeline/engine/        how tokens and z are made
    pipeline/config.py, data.py, benchmarks/   the floor

Every import counts, at module level or inside a function (a lazy import is still a dependency);
only imports under `if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "jobs", "analysis")

# The layer of each part of pipeline/, lowest first; a module may import its own layer or lower.
LAYERS = ("floor", "engine", "method", "run")
# Third-party systems each owned by one wing (or one module of it).
OWNED = {
    "ray": ("pipeline/run/", "jobs/", "tests/"),
    "mlflow": ("pipeline/run/tracking.py", "jobs/"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    return {
        _module_name(p): p
        for pkg in PACKAGES
        for p in (root / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }


def imported_names(source: str) -> set[str]:
    """Every dotted name a module imports (`from a.b import c` gives a.b and a.b.c), leaving out
    what is imported only for type checking."""
    tree = ast.parse(source)
    type_only = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for stmt in branch.body
        for node in ast.walk(stmt)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def layer_of(module: str) -> str | None:
    """floor / engine / method / run for a module of pipeline/, None elsewhere (the package
    root `pipeline` wires the registries and sits above all)."""
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYERS else "floor"


def upward_imports(modules: dict[str, str]) -> list[str]:
    """'importer -> imported' for each import from a lower layer into a higher one."""
    found = []
    for name, source in modules.items():
        mine = layer_of(name)
        if mine is None:
            continue
        for target in sorted(imported_names(source)):
            theirs = layer_of(target)
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
                found.append(f"{name} -> {target}")
    return found


def import_cycles(modules: dict[str, str]) -> list[list[str]]:
    """The groups of project modules that import each other in a circle (Tarjan's SCCs)."""
    graph = {
        name: {t for t in imported_names(src) if t in modules and t != name}
        for name, src in modules.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {name: path.read_text() for name, path in _modules().items()}


def test_the_tree_has_three_wings_and_a_floor():
    for wing in ("run", "method", "engine"):
        init = ROOT / "pipeline" / wing / "__init__.py"
        assert init.exists(), f"pipeline/{wing}/ is not a package"
        assert "May import" in init.read_text(), (
            f"pipeline/{wing}/__init__.py: say what it may import"
        )
    floor = sorted(p.name for p in (ROOT / "pipeline").iterdir() if p.suffix == ".py" or p.is_dir())
    assert set(floor) - {"__pycache__"} == {
        "__init__.py", "config.py", "data.py", "benchmarks", "run", "method", "engine"
    }  # fmt: skip


def test_no_module_imports_upward_across_the_wings(sources):
    assert upward_imports(sources) == []


def test_an_upward_import_is_caught():
    # The check itself can fail: an engine module that imports the solver, a floor module that
    # imports a registry, a lazy import inside a function all count; a type-only import does not.
    planted = {
        "pipeline.engine.generation": "def f():\n    from pipeline.method.solver import Solver\n",
        "pipeline.config": "import pipeline.method.methods\n",
        "pipeline.method.solver": "from pipeline.run import records\n",
        "pipeline.run.pool": "from pipeline.method.solver import Solver\n",
        "pipeline.method.latent": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from pipeline.run.records import RecordStore\n"
        ),
    }
    assert upward_imports(planted) == [
        "pipeline.engine.generation -> pipeline.method.solver",
        "pipeline.engine.generation -> pipeline.method.solver.Solver",
        "pipeline.config -> pipeline.method.methods",
        "pipeline.method.solver -> pipeline.run",
        "pipeline.method.solver -> pipeline.run.records",
    ]


def test_no_import_circles(sources):
    assert import_cycles(sources) == []


def test_a_circle_is_caught():
    planted = {
        "jobs.cli": "from jobs import submit\n",
        "jobs.submit": "def f():\n    from jobs.cli import DEFAULT_CONFIG\n",
        "jobs.run": "import jobs.submit\n",
    }
    assert import_cycles(planted) == [["jobs.cli", "jobs.submit"]]


@pytest.mark.parametrize("system", sorted(OWNED))
def test_each_external_system_has_its_owners(sources, system):
    owners = OWNED[system]
    strays = [
        name
        for name, source in sources.items()
        if any(n == system or n.startswith(system + ".") for n in imported_names(source))
        and not _modules()[name].relative_to(ROOT).as_posix().startswith(owners)
    ]
    assert strays == [], f"{system} imported outside {owners}"
