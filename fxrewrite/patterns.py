"""Patterns: a small, declarative way to say "this subgraph", matched purely against a GraphModule.

A ``Pattern`` is a set of named ``NodePattern`` predicates (op, exact module type, target function, module
attributes, and a free predicate) plus data edges ``(producer, consumer)``. ``Pattern.match(gm)`` returns every
``Match`` (pattern name -> fx node); ``Pattern.match_node(gm, node)`` returns one ``Match`` anchored at ``node`` or a
``MatchFailure`` with a reason. Matching never edits the graph. Multi-node patterns are matched with networkx's
``DiGraphMatcher`` (subgraph monomorphism on the data-flow graph); single-node patterns take a direct scan.

>>> import torch
>>> from torch import nn
>>> from fxrewrite.capture import trace
>>> conv_bn = Pattern(
...     nodes=(NodePattern("conv", op="call_module", module_type=nn.Conv2d),
...            NodePattern("bn", op="call_module", module_type=nn.BatchNorm2d)),
...     edges=(("conv", "bn"),))
>>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
>>> [(m["conv"].target, m["bn"].target) for m in conv_bn.match(gm)]
[('0', '1')]
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import networkx as nx
import torch
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import nn

Predicate = Callable[[torch.fx.Node, torch.fx.GraphModule], bool]


@dataclass(frozen=True)
class NodePattern:
    """Predicates one fx node must satisfy; unset fields match anything.

    ``module_type`` matches the exact type (``type(m) is T``), never a subclass, unless ``subclasses=True``.
    ``attrs`` compares module attributes for equality (``{"groups": 1}``); ``where`` is any extra predicate.
    """

    name: str
    op: str | None = None
    module_type: type[nn.Module] | tuple[type[nn.Module], ...] | None = None
    subclasses: bool = False
    target: Any = None
    attrs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    where: Predicate | None = None

    def failure(self, node: torch.fx.Node, gm: torch.fx.GraphModule) -> str | None:
        """Why ``node`` does not satisfy this pattern node (None when it does)."""
        if self.op is not None and node.op != self.op:
            return f"{node.name}: op is {node.op}, not {self.op}"
        if self.target is not None and node.target != self.target:
            return f"{node.name}: target is {node.target}, not {self.target}"
        module = None
        if self.module_type is not None or self.attrs:
            if node.op != "call_module":
                return f"{node.name}: not a module call"
            module = gm.get_submodule(str(node.target))
        if self.module_type is not None:
            types = self.module_type if isinstance(self.module_type, tuple) else (self.module_type,)
            ok = isinstance(module, types) if self.subclasses else type(module) in types
            if not ok:
                return f"{node.name}: module type is {type(module).__name__}"
        for key, expected in self.attrs.items():
            actual = getattr(module, key, None)
            if actual != expected:
                return f"{node.name}: {key}={actual!r}, not {expected!r}"
        if self.where is not None and not self.where(node, gm):
            return f"{node.name}: predicate {getattr(self.where, '__name__', 'where')} is false"
        return None


@dataclass(frozen=True)
class Match:
    """A successful match: pattern node name -> graph node."""

    nodes: Mapping[str, torch.fx.Node]

    def __getitem__(self, name: str) -> torch.fx.Node:
        return self.nodes[name]


@dataclass(frozen=True)
class MatchFailure:
    """A failed match at a node: the reason, as text (MLIR's notifyMatchFailure)."""

    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class Pattern:
    """A connected subgraph pattern; the first node is the anchor for ``match_node``."""

    nodes: tuple[NodePattern, ...]
    edges: tuple[tuple[str, str], ...] = ()
    single_use: bool = True  # interior producers may have no users outside the match

    def __post_init__(self) -> None:
        names = [p.name for p in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"pattern node names must be unique: {names}")
        unknown = {n for e in self.edges for n in e} - set(names)
        if unknown:
            raise ValueError(f"pattern edges name unknown nodes {sorted(unknown)}; known: {names}")

    def _graph(self) -> nx.DiGraph:
        g = nx.DiGraph()
        for p in self.nodes:
            g.add_node(p.name, pattern=p)
        g.add_edges_from(self.edges)
        return g

    def _external_users(self, mapping: Mapping[str, torch.fx.Node]) -> str | None:
        if not self.single_use:
            return None
        inside = set(mapping.values())
        producers = {src for src, _ in self.edges}
        for name in producers:
            node = mapping[name]
            outside = [u.name for u in node.users if u not in inside]
            if outside:
                return f"{node.name} is also used by {outside}"
        return None

    def match(self, gm: torch.fx.GraphModule) -> list[Match]:
        """Every match in graph order of the anchor (overlapping matches included)."""
        if len(self.nodes) == 1:
            p = self.nodes[0]
            return [Match(MappingProxyType({p.name: n})) for n in gm.graph.nodes if p.failure(n, gm) is None]
        data = nx.DiGraph()
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for node in gm.graph.nodes:
            data.add_node(node)
            for user in node.users:
                data.add_edge(node, user)

        def node_match(data_attrs: dict[str, Any], pattern_attrs: dict[str, Any]) -> bool:
            return pattern_attrs["pattern"].failure(data_attrs["fx"], gm) is None

        for node in data.nodes:
            data.nodes[node]["fx"] = node
        matcher = DiGraphMatcher(data, self._graph(), node_match=node_match)
        found: dict[frozenset[tuple[str, torch.fx.Node]], Match] = {}
        for iso in matcher.subgraph_monomorphisms_iter():
            mapping = {p: n for n, p in iso.items()}
            if self._external_users(mapping) is None:
                found.setdefault(frozenset(mapping.items()), Match(MappingProxyType(mapping)))
        anchor = self.nodes[0].name
        return sorted(found.values(), key=lambda m: order[m[anchor]])

    def match_node(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | MatchFailure:
        """The match whose anchor (first pattern node) is ``node``, or why there is none."""
        why = self.nodes[0].failure(node, gm)
        if why is not None:
            return MatchFailure(why)
        if len(self.nodes) == 1:
            return Match(MappingProxyType({self.nodes[0].name: node}))
        for m in self.match(gm):
            if m[self.nodes[0].name] is node:
                return m
        return MatchFailure(f"{node.name}: the rest of the pattern ({[p.name for p in self.nodes[1:]]}) does not "
                            "match around it")


def module_of(node: torch.fx.Node, gm: torch.fx.GraphModule) -> nn.Module | None:
    """The module a ``call_module`` node calls (None for other ops)."""
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def attr_of(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Any:
    """The value a ``get_attr`` node reads."""
    return operator.attrgetter(str(node.target))(gm)
