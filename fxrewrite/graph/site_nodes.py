"""Which nodes belong to which rewritten site: by provenance (the rewriter records the site and pass on every node
it makes), by module path, and the inserted ops on a site's input edge.

>>> import torch
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 1)))
>>> sorted(original_nodes(gm)), first_input(original_nodes(gm)["1"]).name
(['0', '1'], '_0')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fxrewrite.graph.patterns import attr_of
from fxrewrite.graph.rewriter import PROVENANCE_KEY
from fxrewrite.graph.sites import ConvSite
from fxrewrite.util.runtime import submodule


def provenance_site(node: torch.fx.Node) -> str | None:
    prov = node.meta.get(PROVENANCE_KEY)
    return str(prov["site"]) if isinstance(prov, Mapping) and "site" in prov else None


def site_groups(gm: torch.fx.GraphModule, sites: Iterable[str] = ()) -> dict[str, list[torch.fx.Node]]:
    """Rewritten sites of ``gm`` and their nodes in graph order (the last one produces the site's output).

    A site's nodes are those whose provenance names it (or a site nested in it, such as ``conv.1`` rewritten by a
    later pass), the ``call_module`` nodes of the modules at its qualified name (a conv whose weights a pass changed
    in place), and inserted ops (nodes with provenance that are not module calls, such as a channel shuffle shared
    with another consumer) on its input edge. ``sites`` adds names that carry no provenance node of their own (e.g.
    from a report's records). Sites are listed in graph order.

    >>> import torch
    >>> from fxrewrite.graph.capture import trace
    >>> from fxrewrite.passes import parse_pipeline, PassManager
    >>> gm = PassManager(parse_pipeline("depthwise-separable"))(trace(torch.nn.Conv2d(4, 4, 3))).graph_module
    >>> {k: [n.name for n in v] for k, v in site_groups(gm).items()}
    {'conv': ['conv_0', 'conv_1']}
    """
    named = {s for s in (provenance_site(n) for n in gm.graph.nodes) if s is not None} | set(sites)
    groups: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:  # linear: each key is looked up by its dotted prefixes, never against every site
        for key in (provenance_site(node), str(node.target) if node.op == "call_module" else None):
            site = _top_site(key, named) if key else None
            if site is not None:
                groups.setdefault(site, []).append(node)
                break
    for nodes in groups.values():
        inp = first_input(nodes[0])
        while inp is not None and inp.op != "call_module" and provenance_site(inp) is not None:
            nodes.insert(0, inp)
            inp = first_input(inp)
    return groups


def _top_site(key: str, named: set[str]) -> str | None:
    """The outermost name in ``named`` that is ``key`` or a dotted prefix of it (``conv`` for ``conv.1.0``)."""
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in named:
            return prefix
    return None


def first_input(node: torch.fx.Node) -> torch.fx.Node | None:
    arg = node.args[0] if node.args else node.kwargs.get("input")
    return arg if isinstance(arg, torch.fx.Node) else None


def original_nodes(gm: torch.fx.GraphModule, sites: Iterable[str] | None = None) -> dict[str, torch.fx.Node]:
    """For each site (every module call and functional call when ``sites`` is None), the first node of the
    original graph that computes it: the module call at that qualified name, or the functional node of that name."""
    wanted = None if sites is None else set(sites)
    found: dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        key = str(node.target) if node.op == "call_module" else node.name if node.op == "call_function" else None
        if key is not None and (wanted is None or key in wanted) and key not in found:
            found[key] = node
    return found


def site_weight(gm: torch.fx.GraphModule, site: ConvSite,
                nodes: Mapping[str, torch.fx.Node] | None = None) -> torch.Tensor | None:
    """The weight tensor a conv site multiplies: the module's ``weight``, or the constant a functional conv reads
    (None when the weight is computed in the graph). ``nodes`` (name -> node) saves a scan per call."""
    if site.kind == "module":
        weight = getattr(submodule(gm, site.name), "weight", None)
        return weight if isinstance(weight, torch.Tensor) else None
    node = (nodes or {n.name: n for n in gm.graph.nodes}).get(site.node)
    arg = None if node is None else (node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        value = attr_of(arg, gm)
        return value if isinstance(value, torch.Tensor) else None
    return None


def nonfinite_weights(gm: torch.fx.GraphModule, sites: Iterable[ConvSite]) -> list[str]:
    """One sentence per site whose weight holds NaN or infinite values: factorising such a weight fails or spreads
    the bad values, so a rewrite refuses it before any work.

    >>> conv = torch.nn.Conv2d(2, 2, 3)
    >>> with torch.no_grad():
    ...     conv.weight[0, 0, 0, 0] = float("nan")
    >>> from fxrewrite.graph.capture import trace
    >>> from fxrewrite.graph.sites import find_sites
    >>> gm = trace(conv)
    >>> print(nonfinite_weights(gm, find_sites(gm))[0][:55])
    site 'conv': weight has 1 non-finite value (NaN or inf)
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for site in sites:
        weight = site_weight(gm, site, nodes)
        if weight is None or weight.is_meta or not weight.is_floating_point():
            continue
        w = weight.detach()
        # a finite sum means every value is finite (NaN and inf propagate): one reduction, no mask allocated; only
        # a non-finite sum (or an overflowing one) counts the values
        bad = 0 if torch.isfinite(w.sum()) else int((~torch.isfinite(w)).sum())
        if bad:
            out.append(f"site {site.name!r}: weight has {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf) "
                       f"of {weight.numel()}; fix the trained weights (or leave the site out with select=) before "
                       "rewriting")
    return out
