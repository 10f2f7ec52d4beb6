"""The package layout stays true: no import cycle, imports run down the layers, no private name crosses a room, no
module over 600 lines. Read from the source with ``ast`` (in-function imports included), not by importing.

The rooms, bottom to top (a room may import from rooms on lower rows only; rooms on one row are independent):

    base        fxrewrite.errors, fxrewrite.version, fxrewrite.util
    graph maths
    measure
    verification
    report
    passes      (the top-level passes/ folder, installed as fxrewrite.passes)
    io
    budget tuning
    frontends
    demos
    root        fxrewrite/__init__.py, fxrewrite/__main__.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS: tuple[tuple[str, ...], ...] = (
    ("base",), ("graph", "maths"), ("measure",), ("verification",), ("report",), ("passes",), ("io",),
    ("budget", "tuning"), ("frontends",), ("demos",), ("root",),
)
LEVEL = {room: i for i, row in enumerate(LAYERS) for room in row}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the installed package (passes/ is fxrewrite.passes)."""
    out: dict[str, Path] = {}
    for base, prefix in ((REPO / "fxrewrite", "fxrewrite"), (REPO / "passes", "fxrewrite.passes")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def room_of(module: str) -> str:
    parts = module.split(".")
    if module in ("fxrewrite", "fxrewrite.__main__"):
        return "root"
    if parts[1] in ("errors", "version", "util"):
        return "base"
    return parts[1]


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module if _is_package(module) else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        base = base.rsplit(".", 1)[0]
    return f"{base}.{node.module}" if node.module else base


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of an fxrewrite module in ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "fxrewrite"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != "fxrewrite":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return out


def import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    for module in MODULES:
        for target, _name, _line in imports(module):
            if target in MODULES and target != module:
                g.add_edge(module, target)
    return g


def test_every_module_is_in_a_room() -> None:
    assert {room_of(m) for m in MODULES} <= set(LEVEL), sorted({room_of(m) for m in MODULES} - set(LEVEL))


def test_no_import_cycles() -> None:
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles[:20])


def test_imports_run_down_the_layers() -> None:
    bad = []
    for module in MODULES:
        here = room_of(module)
        for target, _name, line in imports(module):
            there = room_of(target)
            if there != here and LEVEL[there] >= LEVEL[here]:
                bad.append(f"{MODULES[module].relative_to(REPO)}:{line}: {here} imports {target} ({there})")
    assert not bad, "layer violations:\n" + "\n".join(bad)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_aliases(module: str) -> dict[str, str]:
    """Local names bound to fxrewrite modules (``from fxrewrite.graph import capture``, ``import x.y as z``)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:
                    out[a.asname or a.name] = f"{target}.{a.name}"
        elif isinstance(node, ast.Import):
            out |= {a.asname: a.name for a in node.names if a.asname and a.name in MODULES}
    return out


def test_no_private_name_crosses_a_room() -> None:
    bad = []
    for module in MODULES:
        for target, name, line in imports(module):
            if name is not None and _private(name) and room_of(target) != room_of(module):
                bad.append(f"{MODULES[module].relative_to(REPO)}:{line}: from {target} import {name}")
        aliases = _module_aliases(module)
        for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and _private(node.attr) and room_of(aliases[node.value.id]) != room_of(module)):
                bad.append(f"{MODULES[module].relative_to(REPO)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names imported across rooms:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(REPO)} has {lines} lines (at most {MAX_LINES})"


def test_the_checker_sees_a_cycle_and_a_violation() -> None:
    """The walk itself works: a known in-package import is found and a made-up upward edge would be refused."""
    assert ("fxrewrite.graph.capture" in {t for t, _n, _l in imports("fxrewrite.frontends.api")})
    assert LEVEL[room_of("fxrewrite.frontends.api")] > LEVEL[room_of("fxrewrite.graph.sites")]
    g = import_graph()
    g.add_edge("fxrewrite.graph.sites", "fxrewrite.frontends.api")
    assert not nx.is_directed_acyclic_graph(g)
