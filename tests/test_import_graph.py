"""The package's internal imports run one way: no module imports itself back.

Every module under ``src/flatness`` is parsed with :mod:`ast`, imports inside
functions included (a function-level import only hides a cycle from Python's
import system, not from a reader). The test fails on any cycle and prints it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import flatness

ROOT = Path(flatness.__file__).resolve().parent


def _module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, name: str, path: Path) -> str:
    """The absolute module named by a ``from`` import in ``name`` (at ``path``)."""
    if node.level == 0:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Each module of the package at ``root`` -> the package's modules it imports."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, name, path)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    # ``from pkg import submodule`` imports the submodule.
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in components]


def knots(graph: dict[str, set[str]]) -> list[str]:
    """Each cycle with every import edge inside its strongly connected component."""
    lines = []
    for cycle in find_cycles(graph):
        members = set(cycle)
        # Grow to the whole component: modules on a path from and to the cycle.
        changed = True
        while changed:
            changed = False
            for v in graph:
                if v not in members and graph[v] & members and _reaches(graph, members, v):
                    members.add(v)
                    changed = True
        edges = sorted(f"{v} -> {w}" for v in members for w in graph[v] & members)
        lines.append(" -> ".join(cycle) + "\n    edges inside: " + "; ".join(edges))
    return lines


def _reaches(graph: dict[str, set[str]], targets: set[str], v: str) -> bool:
    """Whether some module in ``targets`` imports ``v``, directly or not."""
    seen, todo = set(), [t for t in targets]
    while todo:
        u = todo.pop()
        for w in graph[u]:
            if w == v:
                return True
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return False


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A concrete cycle through the first module of a strongly connected component."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first, back to ``start``
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def test_graph_sees_function_level_imports(tmp_path):
    # A cycle hidden in a function body, through relative, absolute and
    # ``from package import module`` imports, must be found.
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("def g():\n    from .a import x\n")
    graph = import_graph(pkg)
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.c"},
        "pkg.c": {"pkg.a"},
    }
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(fake) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = knots(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


#: Which way imports run (docs/architecture.rst): a module imports only from
#: its own layer or a lower one.  A new module gets a layer here.
LAYERS = {
    0: "_checks _data _distributed _functional _geometry _guard _options _params _results _rng",
    1: "_apgd _apgd_reference _ensemble _fsdp _hvp _kfac _lanczos _per_sample _products",
    2: "_calibration _descriptive _diagonal _diversity _gn_diagonal _landscape _minimum _noise _rescaling "
       "_sharpbalance",
    3: "diversity hessian landscape nonuniformity optim optim._base optim._checks optim._family "
       "optim._family_functional optim._functional optim._preconditioner optim._settings optim._stage "
       "optim._state optim.bsam optim.consistent optim.esam optim.gsam optim.mesa optim.sam optim.subset "
       "optim.wsam",
    4: "sharpness",
    5: "_cli __main__ flatness",
}


def test_imports_run_down_the_layers():
    layer = {("flatness." + m if m != "flatness" else m): n for n, ms in LAYERS.items() for m in ms.split()}
    graph = import_graph()
    assert set(graph) == set(layer), f"modules without a layer: {sorted(set(graph) - set(layer))}"
    upward = [f"{a} (layer {layer[a]}) -> {b} (layer {layer[b]})"
              for a in sorted(graph) for b in sorted(graph[a]) if layer[b] > layer[a]]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)
