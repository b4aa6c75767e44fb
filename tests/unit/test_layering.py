"""The layering rules of docs/design.md, checked in fresh interpreters so they cannot pass by
accident (a module imported earlier by another test would hide a violation). The import
graph inside the project is checked by import-linter (``[tool.importlinter]`` in
pyproject.toml), run here too."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_IMPORT_ALL = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    roots = {roots!r}
    imported = []
    for root in roots:
        package = importlib.import_module(root)
        imported.append(root)
        if {walk!r} and hasattr(package, "__path__"):
            for info in pkgutil.walk_packages(package.__path__, prefix=root + "."):
                if info.name.endswith(".__main__"):
                    continue  # running it would start the program
                importlib.import_module(info.name)
                imported.append(info.name)
    print(json.dumps({{"imported": imported, "modules": sorted(sys.modules)}}))
    """
)


def _modules_after_import(roots: list[str], *, walk: bool) -> tuple[list[str], set[str]]:
    code = _IMPORT_ALL.format(roots=roots, walk=walk)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["imported"], set(report["modules"])


def _top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_operator_package_never_imports_torch() -> None:
    imported, modules = _modules_after_import(["peer_recovery_operator"], walk=True)
    assert "peer_recovery_operator" in imported
    assert "torch" not in _top_level(modules), "the operator image must not need torch"


def test_operator_imports_nothing_of_the_runtime_but_the_contract() -> None:
    _, modules = _modules_after_import(["peer_recovery_operator"], walk=True)
    runtime = {m for m in modules if m == "peer_recovery" or m.startswith("peer_recovery.")}
    outside = sorted(
        m for m in runtime if m != "peer_recovery" and not m.startswith("peer_recovery.contract")
    )
    assert "peer_recovery.contract.names" in runtime
    assert not outside, f"the operator imported runtime modules {outside}"


@pytest.mark.parametrize("root", ["peer_recovery", "peer_recovery.contract"])
def test_light_runtime_modules_never_import_torch(root: str) -> None:
    _, modules = _modules_after_import([root], walk=False)
    assert "torch" not in _top_level(modules), f"importing {root} must stay cheap"


def test_runtime_never_imports_kopf_or_kubernetes_at_module_level() -> None:
    imported, modules = _modules_after_import(["peer_recovery"], walk=True)
    assert "peer_recovery.contract.names" in imported
    leaked = _top_level(modules) & {"kopf", "kubernetes"}
    assert not leaked, f"runtime modules imported {sorted(leaked)} at module level"


def test_no_top_level_module_named_operator_shadows_the_stdlib() -> None:
    for folder in (ROOT, ROOT / "runtime", ROOT / "operator"):
        assert not (folder / "operator.py").exists()
        assert not (folder / "operator" / "__init__.py").exists()
    result = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "site-packages" not in result.stdout and str(ROOT) not in result.stdout


def test_the_import_contracts_hold() -> None:
    """pyproject.toml's import-linter contracts (the layers of docs/design.md)."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_import_cycles_counting_imports_inside_functions() -> None:
    """No module reaches itself through imports, wherever in the module they are written."""
    import grimp

    graph = grimp.build_graph("peer_recovery", "peer_recovery_operator")
    cycles = _strongly_connected(
        {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    )
    assert not cycles, f"import cycles: {cycles}"


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_check_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _strongly_connected(edges) == [["a", "b", "c"]]
    assert _strongly_connected({"a": {"b"}, "b": set()}) == []


def test_benchmarks_import_nothing_from_tests() -> None:
    """What benchmarks share with tests lives in testbed/, so neither imports the other."""
    import ast

    offenders = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            offenders += [f"{path.name}: {m}" for m in modules if m.split(".")[0] == "tests"]
    assert not offenders, offenders
