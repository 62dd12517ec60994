"""The layers (ARCHITECTURE.md) hold: ``lmc.core`` imports no other layer; ``lmc.passes`` and ``lmc.targets``
import only the core and themselves, never each other; ``lmc.models`` (test model builders) only the core;
``lmc.compiler`` (the driver) may import anything. Imports inside functions count: a deferred import is
still a dependency. Module-level imports form no cycle. An ``lmc`` import inside a function says why it is
there in a comment on its line or the line above (an import cycle, the command line's start-up time):
otherwise it belongs at module level, where the dependency shows."""

from __future__ import annotations

import ast
import io
import tokenize
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


def _is_lmc_import(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and bool(node.module) and (node.module == "lmc" or node.module.startswith("lmc."))
    return isinstance(node, ast.Import) and any(a.name == "lmc" or a.name.startswith("lmc.") for a in node.names)


def deferred_imports_without_reason(source: str) -> list[int]:
    """Lines of the ``lmc`` imports inside a function that give no reason: no comment on the statement's own
    lines, none on the line just above it, and none just above the run of import statements it stands in
    (one comment may head a few imports together)."""
    deferred = []                               # (statement, first line of its run of imports)

    def visit(node: ast.AST, in_function: bool) -> None:
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            statements = getattr(node, field, None)
            if not isinstance(statements, list):
                continue
            run_start = None
            for stmt in statements:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    run_start = stmt.lineno if run_start is None else run_start
                    if in_function and _is_lmc_import(stmt):
                        deferred.append((stmt, run_start))
                else:
                    run_start = None
                visit(stmt, in_function or isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(source), False)
    if not deferred:
        return []
    comments, own_line = set(), set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.add(tok.start[0])
            if not tok.line[: tok.start[1]].strip():
                own_line.add(tok.start[0])
    return [stmt.lineno for stmt, run_start in deferred
            if not (stmt.lineno - 1 in own_line or run_start - 1 in own_line
                    or any(n in comments for n in range(stmt.lineno, stmt.end_lineno + 1)))]


def test_deferred_lmc_imports_say_why():
    found = [f"{path.relative_to(REPO)}:{line}" for _, _, path in _modules()
             for line in deferred_imports_without_reason(path.read_text())]
    assert not found, "lmc imports inside functions without a reason comment (hoist them):\n" + "\n".join(found)


def test_the_reason_check_catches_an_uncommented_deferred_import():
    source = """
import numpy as np
try:
    from lmc.core import ir              # module level (in a try): not deferred
except ImportError:
    ir = None


def silent():
    x = 1
    from lmc.core.errors import LmcError
    return LmcError


def explained():
    # deferred: an import cycle with lmc.compiler.build
    import json

    from lmc.compiler.build import build
    from lmc.compiler.verify import verify
    return build, verify, json


def same_line():
    from lmc.core import shapes  # deferred: startup time
    return shapes


class Holder:
    def method(self):
        if self:
            # a comment two lines up does not count

            from lmc.targets import emit
        import numpy                      # not lmc: not this check's business
        return emit, numpy
"""
    lines = source.splitlines()
    missing = deferred_imports_without_reason(source)
    assert [lines[n - 1].strip() for n in missing] == ["from lmc.core.errors import LmcError",
                                                        "from lmc.targets import emit"]
