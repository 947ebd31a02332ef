"""The package's shape, read from its source with ast: no import cycle between blindseg_dist
modules, a config that imports no torch, and no library function over 60 lines."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blindseg_dist"
MAX_LINES = 60
LONG_ALLOWED = {
    "blindseg_dist.cli.build_parser",  # the argparse builder: one add_argument per option, read as a table
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> dict[str, int]:
    """blindseg_dist modules that ``name`` imports anywhere in its file (module level, in functions,
    in classes), relative imports resolved: {module: first line}. ``from pkg import x`` names the
    submodule pkg.x when there is one, else pkg."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            if t in MODULES and t != name:
                found.setdefault(t, node.lineno)
    return found


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one cycle
    through its modules: [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    comps: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, set(c), min(c)) for c in comps]


def _one_cycle(graph: dict[str, dict[str, int]], comp: set[str], start: str) -> list[str]:
    """A path start -> ... -> start inside the component (breadth first: a shortest one)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w in comp and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_the_import_graph_is_read_from_the_source():
    graph = {m: imported_modules(m, p) for m, p in MODULES.items()}
    # a module-level absolute import, a relative one, a function-level one, a package import
    assert "blindseg_dist.errors" in graph["blindseg_dist.config"]
    assert "blindseg_dist.engine.evaluate" in graph["blindseg_dist.tools.demo"]
    assert "blindseg_dist.engine.trainer" in graph["blindseg_dist.cli"]  # imported inside cmd_train
    assert "blindseg_dist.model" in graph["blindseg_dist.tools.flops"]
    # the cycle finder names a cycle it is given
    toy = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert import_cycles(toy) == [["a", "b", "c", "a"]]


def test_no_import_cycle_in_the_package():
    graph = {m: imported_modules(m, p) for m, p in MODULES.items()}
    cycles = import_cycles(graph)
    named = ["  " + " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(c, c[1:])) + f" -> {c[-1]}"
             for c in cycles]
    assert not cycles, "import cycles in blindseg_dist:\n" + "\n".join(named)


def test_config_and_errors_are_leaves_without_torch():
    graph = {m: imported_modules(m, p) for m, p in MODULES.items()}
    assert set(graph["blindseg_dist.errors"]) == set()
    assert set(graph["blindseg_dist.config"]) <= {"blindseg_dist.errors", "blindseg_dist.atomic"}
    assert set(graph["blindseg_dist.atomic"]) == set()
    code = "import sys, blindseg_dist.config; print(sorted(m for m in ('torch', 'numpy', 'cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_command_line_help_loads_no_numpy_nor_torch():
    code = ("import sys\nfrom blindseg_dist.cli import build_parser\nbuild_parser().format_help()\n"
            "print(sorted(m for m in ('torch', 'numpy', 'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def definitions(path: Path) -> set[str]:
    """Qualified names (Class, function, Class.method, outer.inner) defined in ``path``."""
    names: set[str] = set()

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + child.name)
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text(), str(path)), "")
    return names


def test_step_walkthrough_anchors_exist():
    """docs/STEP.md's `file.py:name` anchors (under blindseg_dist/) name functions that exist."""
    anchors = re.findall(r"`([\w/]+\.py):([\w.]+)`", (ROOT / "docs" / "STEP.md").read_text())
    assert len(anchors) >= 20, anchors
    bad = [f"{path}:{name}" for path, name in anchors
           if not (PACKAGE / path).is_file() or name not in definitions(PACKAGE / path)]
    assert not bad, "docs/STEP.md anchors without a definition: " + ", ".join(bad)


def function_lengths() -> dict[str, int]:
    """Lines (def to last line, docstring included) of every function and method in the package,
    by qualified name (module.Class.method). A nested function counts in its parent's lines and is
    also measured on its own (module.outer.inner)."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lengths[qual] = child.end_lineno - child.lineno + 1
                visit(child, qual)
            else:
                visit(child, prefix)

    for name, path in MODULES.items():
        visit(ast.parse(path.read_text(), str(path)), name)
    return lengths


def test_no_library_function_over_60_lines():
    lengths = function_lengths()
    assert lengths["blindseg_dist.cli.build_parser"] > MAX_LINES  # the measure sees a long function
    long = {q: n for q, n in lengths.items() if n > MAX_LINES and q not in LONG_ALLOWED}
    assert not long, f"functions over {MAX_LINES} lines (split them): " + ", ".join(
        f"{q} ({n})" for q, n in sorted(long.items(), key=lambda kv: -kv[1]))
    stale = sorted(q for q in LONG_ALLOWED if lengths.get(q, 0) <= MAX_LINES)
    assert not stale, f"allowed as long but no longer over {MAX_LINES} lines (remove from LONG_ALLOWED): {stale}"
