"""The layering rules of docs/architecture.md, checked on the source: no import circle between
modules or packages, and the algorithm packages import neither the config, the Flower layer, the
runner nor the CLI (nor Flower itself), so they stay usable from a notebook or a study."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedalign"
ALGORITHMS = (
    "align",
    "fusion",
    "repair",
    "stats",
    "analysis",
    "drift",
    "pipeline",
    "tensors",
    "types",
    "registry",
    "server_opt",
    "studies",
    "plots",
)
ABOVE_ALGORITHMS = (
    "config",
    "config_reference",
    "fl",
    "runner",
    "cli",
    "bench",
    "components",
    "run_folder",
    "plugins",
    "merge",
    "interrupts",
)


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
    return {m for m in found if m.split(".")[0] in ("fedalign", "flwr")}


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
    """``fedalign.align.spec`` -> ``align``; the package itself is ``fedalign``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_modules():
    assert cycles(module_graph()) == []


def test_no_import_circle_between_packages():
    graph: dict[str, set[str]] = {}
    for module, targets in module_graph().items():
        graph.setdefault(layer(module), set()).update(
            layer(t) for t in targets if layer(t) != layer(module)
        )
    graph.pop("fedalign")  # the public API re-exports every layer; nothing imports it back
    assert cycles(graph) == []


@pytest.mark.parametrize("package", ALGORITHMS)
def test_algorithm_packages_import_no_config_flower_runner_or_cli(package):
    offending = {}
    for path in PACKAGE.rglob("*.py"):
        if layer(module_name(path)) != package:
            continue
        bad = sorted(
            m for m in imports_of(path) if m.startswith("flwr") or layer(m) in ABOVE_ALGORITHMS
        )
        if bad:
            offending[module_name(path)] = bad
    assert offending == {}


def test_shared_types_are_defined_once():
    definitions = [p for p in PACKAGE.rglob("*.py") if "\nStateDict = " in p.read_text()]
    assert [module_name(p) for p in definitions] == ["fedalign.types"]
