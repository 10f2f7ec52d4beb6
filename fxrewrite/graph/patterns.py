"""Patterns: a small, declarative way to say "this subgraph", matched purely against a GraphModule.

A ``Pattern`` is a set of named ``NodePattern`` predicates plus data edges ``(producer, consumer)``. A node predicate
can check:

- ``op``: the fx op (``"call_module"``, ``"call_function"``, ...; a tuple allows several);
- ``module_type``: the called module's exact type (``type(m) is T``; ``subclasses=True`` accepts subclasses);
- ``target``: the called function or method name (a tuple allows several);
- ``attrs``: module attributes, each compared for equality or, when the expected value is a callable, tested with it
  (``{"groups": 1, "in_channels": lambda c: c >= 16}``);
- ``where``: any predicate ``(node, gm) -> bool``.

``Pattern.match(gm)`` returns every ``Match`` (pattern name -> fx node); ``Pattern.match_node(gm, node)`` returns the
``Match`` anchored at ``node`` (the first pattern node) or a ``MatchFailure`` whose ``reason`` says why not. With
``single_use=True`` (the default) a producer inside the match may not feed nodes outside it (what a fusion needs).
Matching is pure: it never edits the graph. Multi-node patterns are matched with networkx's ``DiGraphMatcher``
(subgraph monomorphism on the data-flow graph; ``match_node`` searches only the anchor's neighbourhood);
single-node patterns take a direct scan. ``CONV2D_MODULE`` and ``CONV2D_FUNCTION`` are the patterns
``fxrewrite.graph.sites`` finds convolutions with.

>>> import torch
>>> from torch import nn
>>> from fxrewrite.graph.capture import trace
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.util.runtime import submodule

Predicate = Callable[[torch.fx.Node, torch.fx.GraphModule], bool]
FX_OPS = ("placeholder", "get_attr", "call_function", "call_module", "call_method", "output")
_MISSING = object()


def _attr_ok(actual: Any, expected: Any) -> bool:
    if callable(expected) and not isinstance(expected, type):
        return actual is not _MISSING and bool(expected(actual))
    if isinstance(actual, torch.Tensor) or isinstance(expected, torch.Tensor):
        return isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor) and torch.equal(actual, expected)
    try:
        return bool(actual == expected)
    except Exception:
        return False


@dataclass(frozen=True)
class NodePattern:
    """Predicates one fx node must satisfy; unset fields match anything.

    ``module_type`` matches the exact type (``type(m) is T``), never a subclass, unless ``subclasses=True``.
    ``attrs`` checks module attributes: equality, or a callable expected value is called on the attribute
    (``{"groups": 1}``, ``{"in_channels": lambda c: c % 4 == 0}``); ``where`` is any extra predicate.

    >>> NodePattern("c", op="call_modul")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fxrewrite.errors.ConfigError: pattern node 'c': unknown op 'call_modul'; valid: placeholder, get_attr, ...
    """

    name: str
    op: str | tuple[str, ...] | None = None
    module_type: type[nn.Module] | tuple[type[nn.Module], ...] | None = None
    subclasses: bool = False
    target: Any = None
    attrs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    where: Predicate | None = None

    def __post_init__(self) -> None:
        ops = self.op if isinstance(self.op, tuple) else (self.op,) if self.op is not None else ()
        bad = [o for o in ops if o not in FX_OPS]
        if bad:
            raise ConfigError(f"pattern node {self.name!r}: unknown op {bad[0]!r}; valid: {', '.join(FX_OPS)}")
        if not isinstance(self.attrs, MappingProxyType):
            object.__setattr__(self, "attrs", MappingProxyType(dict(self.attrs)))

    def failure(self, node: torch.fx.Node, gm: torch.fx.GraphModule) -> str | None:
        """Why ``node`` does not satisfy this pattern node (None when it does)."""
        return self._check(node, gm, explain=True)

    def matches(self, node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
        """Whether ``node`` satisfies this pattern node: :meth:`failure` without writing the reason (what a scan over
        every node of a graph needs)."""
        return self._check(node, gm, explain=False) is None

    def _check(self, node: torch.fx.Node, gm: torch.fx.GraphModule, explain: bool) -> str | None:
        if self.op is not None:
            ops = self.op if isinstance(self.op, tuple) else (self.op,)
            if node.op not in ops:
                return f"{node.name}: op is {node.op}, not {' or '.join(ops)}" if explain else ""
        if self.target is not None:
            targets = self.target if isinstance(self.target, tuple) else (self.target,)
            if not any(node.target is t or node.target == t for t in targets):
                return (f"{node.name}: target is {_target_name(node.target)}, not "
                        + " or ".join(_target_name(t) for t in targets)) if explain else ""
        module = None
        if self.module_type is not None or self.attrs:
            if node.op != "call_module":
                return f"{node.name}: not a module call (op is {node.op})" if explain else ""
            module = submodule(gm, str(node.target))
        if self.module_type is not None:
            types = self.module_type if isinstance(self.module_type, tuple) else (self.module_type,)
            ok = isinstance(module, types) if self.subclasses else type(module) in types
            if not ok:
                return (f"{node.name}: module type is {type(module).__name__}, not "
                        + " or ".join(t.__name__ for t in types) + (" (or a subclass)" if self.subclasses else "")
                        ) if explain else ""
        for key, expected in self.attrs.items():
            actual = getattr(module, key, _MISSING)
            if not _attr_ok(actual, expected):
                if not explain:
                    return ""
                shown = "missing" if actual is _MISSING else repr(actual)
                wanted = getattr(expected, "__name__", None) if callable(expected) else None
                return (f"{node.name}: {key}={shown}" + (f" fails {wanted}" if wanted else f", not {expected!r}"))
        if self.where is not None and not self.where(node, gm):
            return f"{node.name}: predicate {getattr(self.where, '__name__', 'where')} is false" if explain else ""
        return None


def _candidates(p: NodePattern, graph: torch.fx.Graph) -> Iterable[torch.fx.Node]:
    """The nodes that can satisfy ``p`` by its op alone, in graph order, from the graph's index of nodes by op (a
    scan of every node costs a Python call per node)."""
    ops = p.op if isinstance(p.op, tuple) else (p.op,)
    if p.op is None or ("call_function" in ops and p.target is None):  # the index wants a function's target
        return graph.nodes
    targets = p.target if isinstance(p.target, tuple) else (p.target,)
    found = [graph.find_nodes(op=op, target=t) if op == "call_function" else graph.find_nodes(op=op)
             for op in ops for t in (targets if op == "call_function" else (None,))]
    if len(found) == 1:
        return found[0]
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(dict.fromkeys(n for nodes in found for n in nodes), key=order.__getitem__)


def _target_name(target: Any) -> str:
    return getattr(target, "__name__", None) or str(target)


@dataclass(frozen=True)
class Match:
    """A successful match: pattern node name -> graph node."""

    nodes: Mapping[str, torch.fx.Node]

    def __getitem__(self, name: str) -> torch.fx.Node:
        return self.nodes[name]


@dataclass(frozen=True)
class MatchFailure:
    """A failed match at a node: the reason, as text (MLIR's notifyMatchFailure). It is falsy."""

    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class Pattern:
    """A connected subgraph pattern; the first node is the anchor for ``match_node``.

    >>> Pattern(nodes=(NodePattern("a"), NodePattern("b")))
    Traceback (most recent call last):
    ...
    fxrewrite.errors.ConfigError: pattern nodes ['a', 'b'] are not connected by its edges ()
    """

    nodes: tuple[NodePattern, ...]
    edges: tuple[tuple[str, str], ...] = ()
    single_use: bool = True  # producers inside the match may have no users outside it

    def __post_init__(self) -> None:
        names = [p.name for p in self.nodes]
        if not names:
            raise ConfigError("a pattern needs at least one node")
        if len(set(names)) != len(names):
            raise ConfigError(f"pattern node names must be unique: {names}")
        unknown = {n for e in self.edges for n in e} - set(names)
        if unknown:
            raise ConfigError(f"pattern edges name unknown nodes {sorted(unknown)}; known: {names}")
        if len(names) > 1 and not nx.is_weakly_connected(self._graph()):
            raise ConfigError(f"pattern nodes {names} are not connected by its edges {self.edges}")

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
        for name in dict.fromkeys(src for src, _ in self.edges):
            node = mapping[name]
            outside = [u.name for u in node.users if u not in inside]
            if outside:
                return f"{node.name} is also used by {outside} outside the match (single_use=True)"
        return None

    def _mappings(self, gm: torch.fx.GraphModule, data: nx.DiGraph) -> Iterator[dict[str, torch.fx.Node]]:
        matcher = _Matcher(data, self._graph(), gm)
        for iso in matcher.subgraph_monomorphisms_iter():
            yield {p: n for n, p in iso.items()}

    def match(self, gm: torch.fx.GraphModule) -> list[Match]:
        """Every match in graph order of the anchor (overlapping matches included)."""
        if len(self.nodes) == 1:
            p = self.nodes[0]
            return [Match(MappingProxyType({p.name: n})) for n in _candidates(p, gm.graph) if p.matches(n, gm)]
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        found: dict[frozenset[tuple[str, torch.fx.Node]], Match] = {}
        for mapping in self._mappings(gm, _data_graph(gm)):
            if self._external_users(mapping) is None:
                found.setdefault(frozenset(mapping.items()), Match(MappingProxyType(mapping)))
        anchor = self.nodes[0].name
        return sorted(found.values(), key=lambda m: order[m[anchor]])

    def match_node(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | MatchFailure:
        """The match whose anchor (first pattern node) is ``node``, or why there is none."""
        anchor = self.nodes[0]
        why = anchor.failure(node, gm)
        if why is not None:
            return MatchFailure(why)
        if len(self.nodes) == 1:
            return Match(MappingProxyType({anchor.name: node}))
        near = _data_graph(gm, _neighbourhood(node, radius=len(self.nodes) - 1))
        shared_reason = None
        for mapping in self._mappings(gm, near):
            if mapping[anchor.name] is not node:
                continue
            shared_reason = self._external_users(mapping)
            if shared_reason is None:
                return Match(MappingProxyType(mapping))
        if shared_reason is not None:
            return MatchFailure(shared_reason)
        return MatchFailure(self._neighbour_reason(gm, node))

    def _neighbour_reason(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
        by_name = {p.name: p for p in self.nodes}
        anchor = self.nodes[0].name
        for src, dst in self.edges:
            if anchor not in (src, dst):
                continue
            other, role = (dst, "user") if src == anchor else (src, "input")
            neighbours = list(node.users) if role == "user" else node.all_input_nodes
            fails = [by_name[other].failure(n, gm) for n in neighbours]
            if all(f is not None for f in fails):
                detail = "; ".join(f for f in fails if f) or f"{node.name} has no {role}s"
                return f"{node.name}: no {role} matches pattern node {other!r} ({detail})"
        return (f"{node.name}: the rest of the pattern ({[p.name for p in self.nodes[1:]]}) does not match around "
                "it")


class _Matcher(DiGraphMatcher):
    """VF2 whose node test is the pattern node's predicates on the fx node (the data graph's nodes are fx nodes)."""

    def __init__(self, data: nx.DiGraph, pattern: nx.DiGraph, gm: torch.fx.GraphModule) -> None:
        super().__init__(data, pattern)
        self.gm = gm
        self._ok: dict[tuple[torch.fx.Node, str], bool] = {}

    def semantic_feasibility(self, G1_node: Any, G2_node: Any) -> bool:  # networkx names the arguments
        key = (G1_node, G2_node)
        if key not in self._ok:
            self._ok[key] = self.G2.nodes[G2_node]["pattern"].matches(G1_node, self.gm)
        return self._ok[key]


def _neighbourhood(node: torch.fx.Node, radius: int) -> set[torch.fx.Node]:
    """Nodes within ``radius`` data edges of ``node``, in either direction."""
    seen, frontier = {node}, [node]
    for _ in range(radius):
        frontier = [m for n in frontier for m in (*n.all_input_nodes, *n.users) if m not in seen]
        seen.update(frontier)
    return seen


def _data_graph(gm: torch.fx.GraphModule, only: set[torch.fx.Node] | None = None) -> nx.DiGraph:
    """The data-flow graph of ``gm`` (or of the nodes in ``only``): fx nodes, an edge from each node to each user.

    The fx nodes are the graph's keys and carry no attributes, so networkx never copies them.
    """
    data = nx.DiGraph()
    for node in gm.graph.nodes:
        if only is not None and node not in only:
            continue
        data.add_node(node)
        for user in node.users:
            if only is None or user in only:
                data.add_edge(node, user)
    return data


def module_of(node: torch.fx.Node, gm: torch.fx.GraphModule) -> nn.Module | None:
    """The module a ``call_module`` node calls (None for other ops)."""
    return submodule(gm, str(node.target)) if node.op == "call_module" else None


def attr_of(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Any:
    """The value a ``get_attr`` node reads."""
    return operator.attrgetter(str(node.target))(gm)


CONV2D_MODULE = NodePattern("conv", op="call_module", module_type=nn.Conv2d, subclasses=True)
"""A call of an ``nn.Conv2d`` (subclasses too: ``fxrewrite.graph.sites`` gives those a reason instead of a rewrite)."""

CONV2D_FUNCTION = NodePattern("conv", op="call_function", target=(F.conv2d, torch.conv2d))
"""A call of ``F.conv2d`` / ``torch.conv2d`` (the same builtin in current torch)."""
