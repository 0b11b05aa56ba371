"""The layering rules of docs/architecture.md, checked on the source: no import circle between
modules or packages, and the algorithm packages import neither the config, the Flower layer, the
runner nor the CLI (nor Flower itself), so they stay usable from a notebook or a study."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedalign"
LAYERS: dict[str, set[str]] = {
    "core": set(),
    "data": {"core"},
    "models": {"core"},
    "client": {"core", "models"},
    "algorithms": {"core", "models", "client"},
    "report": {"core"},
    "config": {"core", "data", "models", "client", "algorithms", "report"},
    "fl": {"core", "data", "models", "client", "algorithms", "report", "config"},
    "runs": {"core", "data", "models", "client", "algorithms", "report", "config", "fl"},
    "cli": {"core", "data", "models", "client", "algorithms", "report", "config", "fl", "runs"},
}
"""Each folder of the package and the folders it may import (besides its own): the table of
docs/architecture.md. The package's ``__init__`` (the public API) may import every layer."""
WITHOUT_FLOWER = ("core", "data", "models", "client", "algorithms", "report", "config")
"""Layers that import neither Flower nor Ray: usable from a notebook, a study, an offline merge."""
ROOT_MODULES = 8
"""At most this many modules at the package root: the public API, and little else."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every fedalign module ``path`` imports, at any depth of the file (function-level too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "fedalign"}


def third_party_imports(path: Path) -> set[str]:
    """Every absolute import of ``path`` outside fedalign, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] != "fedalign"}


def module_graph() -> dict[str, set[str]]:
    """Module -> the fedalign modules it imports (a module's own parent packages, which Python
    initialises before it anyway, are not edges)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imports_of(path) if m in paths and not (name + ".").startswith(m + ".")}
        for name, path in paths.items()
    }


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> str:
    """``fedalign.algorithms.align.spec`` -> ``algorithms``; the package itself is ``fedalign``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_modules():
    assert cycles(module_graph()) == []


def test_every_module_sits_in_a_layer_folder():
    """A module at the root or in a folder the table does not name would escape the rules."""
    modules = [module_name(p) for p in PACKAGE.rglob("*.py")]
    assert sorted({layer(m) for m in modules} - {"fedalign"} - LAYERS.keys()) == []
    root = [p.name for p in PACKAGE.glob("*.py")]
    assert len(root) <= ROOT_MODULES, root


def test_each_layer_imports_only_the_layers_below_it():
    offending = {}
    for module, targets in module_graph().items():
        own = layer(module)
        if own == "fedalign":
            continue
        bad = sorted(t for t in targets if layer(t) not in LAYERS[own] | {own})
        if bad:
            offending[module] = bad
    assert offending == {}


def test_the_layer_table_has_no_circle():
    assert cycles(LAYERS) == []


@pytest.mark.parametrize("package", WITHOUT_FLOWER)
def test_lower_layers_import_no_flower_or_ray(package):
    offending = {}
    for path in PACKAGE.rglob("*.py"):
        if layer(module_name(path)) != package:
            continue
        bad = sorted(m for m in third_party_imports(path) if m.split(".")[0] in ("flwr", "ray"))
        if bad:
            offending[module_name(path)] = bad
    assert offending == {}


def test_shared_types_are_defined_once():
    definitions = [p for p in PACKAGE.rglob("*.py") if "\nStateDict = " in p.read_text()]
    assert [module_name(p) for p in definitions] == ["fedalign.core.types"]


def test_import_and_a_strategy_lookup_load_neither_flower_nor_ray():
    """``import fedalign`` is cheap and a name lookup (a strategy, the Strategy base class) does
    not start Flower: they load when a run starts."""
    code = (
        "import sys, fedalign; before = ('flwr' in sys.modules, 'ray' in sys.modules); "
        "fedalign.STRATEGIES.get('pfnm'); fedalign.Strategy; fedalign.load_config; "
        "print(before, 'flwr' in sys.modules, 'ray' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "(False, False) False False"
