"""Every test module runs with only the ``test`` extra installed.

CI installs the package with its ``test`` extra (plus the peers); a user runs
the README's test command with the ``test`` extra alone.  A test module that
imports an optional package (tqdm, matplotlib, a peer library ...) must
either find it in the ``test`` extra of ``pyproject.toml`` or guard it with
``pytest.importorskip``.  This test reads every test module's syntax tree
and fails on an unguarded import, so the rule holds without installing
anything.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

#: distribution name -> import name, where they differ
IMPORT_NAMES = {"scikit-learn": "sklearn", "pytorch-optimizer": "pytorch_optimizer", "pyyaml": "yaml"}


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for req in requirements:
        dist = re.match(r"\s*([A-Za-z0-9_.\-]+)", req).group(1).lower().replace("_", "-")
        names.add(IMPORT_NAMES.get(dist, dist.replace("-", "_")))
    return names


def _project() -> dict:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib.loads(text)["project"]
    tomli = pytest.importorskip("tomli")  # pragma: no cover - Python 3.10
    return tomli.loads(text)["project"]


def allowed_modules() -> set[str]:
    """Top-level modules a test may import unguarded."""
    project = _project()
    local = {p.stem for p in TESTS.glob("*.py")}  # shared helpers in tests/
    return (
        set(sys.stdlib_module_names)
        | {"flatness", "_pytest"}
        | _requirement_names(project["dependencies"])
        | _requirement_names(project["optional-dependencies"]["test"])
        | local
    )


def _skipped_names(node: ast.AST) -> set[str]:
    """Top-level names given to ``pytest.importorskip`` anywhere in ``node``."""
    names = set()
    for call in ast.walk(node):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr == "importorskip" and call.args
                and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
            names.add(call.args[0].value.split(".")[0])
    return names


def _catches_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types):
            return True
    return False


def unguarded_imports(source: str, allowed: set[str]) -> list[tuple[int, str]]:
    """``(line, module)`` of each import of a module outside ``allowed``
    that no ``pytest.importorskip`` in its scope (the enclosing function, or
    the module for module-level code) and no ``except ImportError`` guards."""
    tree = ast.parse(source)
    module_skips = {name for stmt in tree.body for name in _skipped_names(stmt)
                    if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    found = []

    def visit(node: ast.AST, skips: set[str], guarded: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            skips = skips | _skipped_names(node)
        if isinstance(node, ast.Try) and _catches_import_error(node):
            for child in node.body:
                visit(child, skips, True)
            for child in (*node.handlers, *node.orelse, *node.finalbody):
                visit(child, skips, guarded)
            return
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        for module in modules:
            top = module.split(".")[0]
            if top not in allowed and top not in skips and not guarded:
                found.append((node.lineno, module))
        for child in ast.iter_child_nodes(node):
            visit(child, skips, guarded)

    visit(tree, module_skips, False)
    return found


def test_checker_catches_unguarded_imports():
    allowed = {"pytest", "torch"}
    bad = "import matplotlib\nfrom tqdm import tqdm\n\ndef test_a():\n    import curvlinops\n"
    assert unguarded_imports(bad, allowed) == [(1, "matplotlib"), (2, "tqdm"), (5, "curvlinops")]
    good = (
        "import torch\n"
        "pytest.importorskip('sklearn')\nimport sklearn.datasets\n"
        "def test_b():\n    pytest.importorskip('curvlinops')\n    import curvlinops\n"
        "def test_c():\n    try:\n        import matplotlib\n    except ImportError:\n        return\n"
    )
    assert unguarded_imports(good, allowed) == []
    # a skip in one test does not license the import in another
    leak = "def test_d():\n    pytest.importorskip('tqdm')\ndef test_e():\n    import tqdm\n"
    assert unguarded_imports(leak, allowed) == [(4, "tqdm")]


def test_allowed_modules_come_from_the_test_extra():
    allowed = allowed_modules()
    assert {"torch", "numpy", "scipy", "pytest", "hypothesis", "sklearn", "os"} <= allowed
    assert not {"matplotlib", "curvlinops", "backpack", "pyhessian", "pytorch_optimizer"} & allowed


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_optional_packages_are_guarded(path):
    bad = unguarded_imports(path.read_text(encoding="utf-8"), allowed_modules())
    assert not bad, (
        f"{path.name} imports optional packages without pytest.importorskip and without "
        f"them in the 'test' extra of pyproject.toml: "
        + ", ".join(f"line {line}: {module}" for line, module in bad)
    )
