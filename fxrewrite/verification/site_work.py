"""The rewritten sites while they are being verified: the mutable per-site state (``SiteWork``, frozen into a
``SiteCheck`` at the end), which passes rewrote a site, and which site a node belongs to.

>>> import torch
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.ReLU()))
>>> conv, relu = [n for n in gm.graph.nodes if n.op == "call_module"]
>>> w = SiteWork("0", [conv], None)
>>> w.shapes_ok, w.failures, passes_of(w), site_of(relu, {"0": [conv]})
(True, [], (), '0')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fxrewrite.graph.recorder import SubgraphRunner
from fxrewrite.graph.rewriter import PROVENANCE_KEY
from fxrewrite.verification.numerics import ErrorAccumulator

__all__ = ["SiteWork", "passes_of", "site_of"]


@dataclass
class SiteWork:
    """Mutable per-site state while verifying (turned into a frozen SiteCheck at the end)."""

    name: str
    nodes: list[torch.fx.Node]
    original: torch.fx.Node | None
    failures: list[str] = field(default_factory=list)
    shapes_ok: bool = True
    local: ErrorAccumulator | None = None
    accumulated: ErrorAccumulator | None = None
    unchecked: str = ""
    runner: SubgraphRunner | None = None


def passes_of(w: SiteWork) -> tuple[str, ...]:
    """The passes that rewrote the site (from its nodes' provenance), in order, each once."""
    names = [str(p["pass"]) for n in w.nodes if isinstance(p := n.meta.get(PROVENANCE_KEY), Mapping) and "pass" in p]
    return tuple(dict.fromkeys(names))


def site_of(node: torch.fx.Node, groups: Mapping[str, list[torch.fx.Node]]) -> str | None:
    """The rewritten site a node belongs to, or the nearest rewritten site upstream of it (one index of the
    groups' nodes, then a walk upstream: linear in the graph)."""
    owner = {n: site for site, nodes in groups.items() for n in nodes}
    if node in owner:
        return owner[node]
    seen, frontier = set(), list(node.all_input_nodes)
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in owner:
            return owner[n]
        frontier.extend(n.all_input_nodes)
    return None
