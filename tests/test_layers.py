"""The layers (ARCHITECTURE.md) hold: ``lmc.core`` imports no other layer; ``lmc.passes`` and ``lmc.targets``
import only the core and themselves, never each other; ``lmc.models`` (test model builders) only the core;
``lmc.compiler`` (the driver) may import anything. Imports inside functions count: a deferred import is
still a dependency. Module-level imports form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"core": "lmc.core", "passes": "lmc.passes", "targets": "lmc.targets", "compiler": "lmc.compiler",
          "models": "lmc.models"}
ALLOWED = {
    "lmc.core": {"lmc.core"},
    "lmc.passes": {"lmc.core", "lmc.passes"},
    "lmc.targets": {"lmc.core", "lmc.targets"},
    "lmc.models": {"lmc.core", "lmc.models"},
    "lmc.compiler": {"lmc", "lmc.core", "lmc.passes", "lmc.targets", "lmc.compiler", "lmc.models"},
}
FIXTURES = "exporters"      # models/exporters/: fixture generators run by hand (torch), not a package


def _modules():
    for folder, package in LAYERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            if folder == "models" and rel.parts[0] == FIXTURES:
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), package, path


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported lmc module, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "lmc" or name.startswith("lmc."):
                found.append((name, id(node) in top))
    return found


def _layer(module: str) -> str:
    for package in sorted(ALLOWED, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return "lmc"


def test_no_upward_or_sideways_imports():
    wrong = []
    for module, package, path in _modules():
        for name, _ in _imports(path):
            if _layer(name) not in ALLOWED[package]:
                wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_no_import_cycles():
    known = {m for m, _, _ in _modules()}
    graph = nx.DiGraph()
    for module, _, path in _modules():
        graph.add_node(module)
        for name, top in _imports(path):
            target = name if name in known else name.rsplit(".", 1)[0]
            if top and target in known and target != module and not target.endswith(module.rsplit(".", 1)[-1] + ".__init__"):
                graph.add_edge(module, target)
    cycles = [c for c in nx.simple_cycles(graph) if len(c) > 1]
    assert not cycles, cycles[:5]


def test_the_layers_exist_as_folders():
    for folder in LAYERS:
        assert (REPO / folder / "__init__.py").is_file(), folder
