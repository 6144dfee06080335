"""The package's import structure (docs/architecture.md §1): no import cycles between wct's modules or subpackages, no library
module importing an entry point, no entry point importing another. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wct"
ENTRY_POINTS = {"wct.quantize", "wct.evaluate", "wct.train", "wct.export", "wct.generate", "wct.serve"}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the wct modules it imports (``from wct.x import y`` counts as wct.x.y when that is a module, as
    import-linter's graph counts it)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed to wct's subpackages and top-level modules (wct.quant, wct.nn, wct.models, ...)."""
    unit = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    out: dict[str, set[str]] = {}
    for src, dsts in graph.items():
        out.setdefault(unit(src), set()).update(unit(d) for d in dsts if unit(d) != unit(src))
    return out


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every cycle between modules or between subpackages, and every import of an entry point (by a library
    module or by another entry point)."""
    found = [f"cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    found += [f"package cycle: {' <-> '.join(c)}" for c in cycles(package_graph(graph))]
    found += [f"{src} imports the entry point {dst}" for src, dsts in sorted(graph.items()) for dst in sorted(dsts)
              if dst in ENTRY_POINTS]
    return found


def test_the_package_has_no_cycles_and_no_upward_imports():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and "wct.quant.owq" in graph["wct.training.base"]  # the graph is really read
    found = violations(graph)
    print("\n".join(found) or f"{len(graph)} modules, {sum(map(len, graph.values()))} imports: no cycle, no "
          "upward import")
    assert found == []


def copy_package(tmp_path: Path) -> Path:
    root = tmp_path / "wct"
    for p in PACKAGE.rglob("*.py"):
        (root / p.relative_to(PACKAGE)).parent.mkdir(parents=True, exist_ok=True)
        (root / p.relative_to(PACKAGE)).write_text(p.read_text())
    return root


@pytest.mark.parametrize("planted, target, expected", [
    ("wct/format/layout.py", "wct.nn.owq_linear", "cycle: "),  # pack is imported by nn.owq_linear
    ("wct/generate.py", "wct.export", "wct.generate imports the entry point wct.export"),
    ("wct/training/run.py", "wct.train", "wct.training.run imports the entry point wct.train"),
])
def test_the_check_fails_on_a_planted_violation(tmp_path, planted, target, expected):
    root = copy_package(tmp_path)
    before = violations(import_graph(root))
    path = tmp_path / planted
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    import {target}  # noqa\n")
    new = [v for v in violations(import_graph(root)) if v not in before]
    hits = [v for v in new if v.startswith(expected)]
    assert hits and (expected != "cycle: " or {"wct.format.layout", target} <= set(hits[0][7:].split(" <-> ")))


def test_every_module_imports():
    """A moved or renamed name breaks the import of every module that still asks for it: import them all."""
    import importlib
    import pkgutil

    import wct

    names = [m.name for m in pkgutil.walk_packages(wct.__path__, "wct.") if not m.name.endswith("__main__")]
    assert len(names) > 30
    for name in names:
        importlib.import_module(name)


SCRIPTS = PACKAGE.parent / "scripts"
TESTS = PACKAGE.parent / "tests"


def imported_names(path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute imports, inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def dev_tool_imports(root: Path) -> list[str]:
    """``module imports tool`` for each module under ``root`` that imports a development tool (a file of
    scripts/, or the scripts folder itself): the runtime package must work without them."""
    tools = {p.stem for p in SCRIPTS.glob("*.py")} | {"scripts"}
    return [f"{p.relative_to(root.parent)} imports {n}" for p in sorted(root.rglob("*.py"))
            for n in sorted(imported_names(p)) if n.split(".")[0] in tools]


def test_the_runtime_package_imports_no_development_tool():
    assert {"gpu_check", "ptx_budget", "kernel_budget"} <= {p.stem for p in SCRIPTS.glob("*.py")}
    assert not (PACKAGE / "gpu_check.py").exists() and not (PACKAGE / "kernels" / "budget.py").exists()
    assert dev_tool_imports(PACKAGE) == []


def test_the_dev_tool_check_fails_on_a_planted_import(tmp_path):
    root = copy_package(tmp_path)
    (root / "kernels" / "op.py").write_text((root / "kernels" / "op.py").read_text() + "\nimport ptx_budget\n")
    assert dev_tool_imports(root) == ["wct/kernels/op.py imports ptx_budget"]


def other_tests_imported(path: Path) -> list[str]:
    """The other test files ``path`` imports (shared helpers belong in conftest.py or tests/helpers.py)."""
    files = {p.stem for p in TESTS.glob("test_*.py")}
    return sorted(n for n in imported_names(path) if n.removeprefix("tests.") in files)


def test_no_test_file_imports_another():
    found = {p.name: other_tests_imported(p) for p in sorted(TESTS.glob("test_*.py"))}
    assert len(found) > 30
    assert {k: v for k, v in found.items() if v} == {}


def test_the_test_import_check_fails_on_a_planted_import(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text("def test_x():\n    from test_train import base  # noqa\n    import tests.test_io\n")
    assert other_tests_imported(planted) == ["test_train", "tests.test_io"]
