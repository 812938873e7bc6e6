"""The package's layout holds: click only in cli/, small modules with a docstring, no import cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "clm_runner"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 400


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imported_modules(path: Path) -> set[str]:
    """clm_runner modules `path` imports, at its top or inside functions (a lazy import is a dependency too)."""
    known = {module_name(p) for p in MODULES}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clm_runner"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known} - {module_name(path)}


def test_only_the_cli_imports_click() -> None:
    outside = [
        module_name(p)
        for p in MODULES
        if "click"
        in {a.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Import) for a in n.names}
        | {n.module for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom)}
        and p.parent.name != "cli"
    ]
    assert outside == []


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_each_module_is_small_and_says_what_it_holds(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and docstring.strip(), f"{module_name(path)} has no docstring saying its one job"


def test_no_import_cycle() -> None:
    graph = {module_name(p): imported_modules(p) for p in MODULES}
    # Importing clm_runner.x.y runs clm_runner.x's __init__ first: that is not a dependency of y on x.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dependency in sorted(graph[module]):
            if state.get(dependency) == 1:
                cycle = path[path.index(dependency) :] + [dependency]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dependency not in state:
                visit(dependency)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_every_test_path_the_build_files_name_exists() -> None:
    """make fault-test / make fuzz / CI name test files by path; a move must carry them along."""
    named = {
        match
        for build_file in (REPO / "Makefile", REPO / ".ci" / "run")
        for match in re.findall(r"tests/[\w/]+\.py", build_file.read_text())
    }
    assert named, "the Makefile names its fault and fuzz test files"
    assert [path for path in sorted(named) if not (REPO / path).is_file()] == []


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                # A module's declared public names (clm_runner.PerplexityMetric is served by __getattr__).
                names.update(ast.literal_eval(node.value))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def test_docs_name_only_modules_and_functions_that_exist() -> None:
    """The regroup left docs pointing at clm_runner.summary and clm_runner.performance, which had moved."""
    docs = [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "benchmarks").glob("*.py")),
    ]
    dangling = []
    for doc in docs:
        for dotted in set(re.findall(r"\bclm_runner(?:\.\w+)+", doc.read_text())):
            parts = dotted.split(".")
            # The longest prefix that is a module; what follows it must be defined there.
            for cut in range(len(parts), 0, -1):
                base = REPO.joinpath(*parts[:cut])
                module = (
                    base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
                )
                if module.is_file():
                    rest = parts[cut:]
                    if rest and rest[0] not in _defined_names(module):
                        dangling.append(f"{doc.name}: {dotted}")
                    break
            else:
                dangling.append(f"{doc.name}: {dotted}")
    assert dangling == []
