"""The numeric comparison of one batch: the original model runs once, recording each rewritten site's input and
output; then the rewritten model runs once, and at each site's last node its value is compared with the original's
(accumulated error) and the site's subgraph is re-run on the original's input (local error).

>>> import torch
>>> from fxrewrite.verification.site_work import SiteWork
>>> model = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()))
>>> conv = next(n for n in model.graph.nodes if n.op == "call_module")
>>> work, failures = [SiteWork("0", [conv], conv)], []
>>> compare_batch(model, model, (torch.randn(1, 1, 5, 5),), work, [], failures)
>>> work[0].local.stats().rel_l2, work[0].accumulated.stats().rel_l2, failures
(0.0, 0.0, [])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from fxrewrite.errors import ConfigError, FxRewriteError
from fxrewrite.graph.recorder import SubgraphRunner, ValueRecorder
from fxrewrite.graph.site_nodes import first_input
from fxrewrite.verification.formatting import first_line, site_label
from fxrewrite.verification.numerics import ErrorAccumulator
from fxrewrite.verification.site_work import SiteWork, site_of

__all__ = ["compare_batch"]


def compare_batch(ref_gm: torch.fx.GraphModule, new_gm: torch.fx.GraphModule, batch: tuple[Any, ...],
                  work: list[SiteWork], out_acc: list[ErrorAccumulator], failures: list[str]) -> None:
    """One batch: record the original's values at each site, then run the rewritten model and compare as it goes."""
    active = [w for w in work if w.original is not None and w.shapes_ok]
    by_orig = {w.original.name: w for w in active if w.original is not None}
    recorded: dict[str, dict[str, Any]] = {w.name: {} for w in active}
    inputs_seen: dict[tuple[str, tuple[int, ...]], Any] = {}  # one copy of an input that several sites read

    def on_ref(node: torch.fx.Node, value: Any) -> None:
        # Copies of the conv's input (as the conv read it) and of its output: a later in-place op of the original
        # model (ReLU(inplace=True), x += y) overwrites the tensors themselves before the rewritten model runs.
        rec = recorded[by_orig[node.name].name]
        rec["y"] = _copy_tensors(value)
        source = first_input(node)
        if source is not None and source in ref_runner.env:
            x = ref_runner.env[source]
            key = (source.name, tuple(t._version for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)))
            if key not in inputs_seen:  # the version counters tell an input modified in place since its copy
                inputs_seen[key] = _copy_tensors(x)
            rec["x"] = inputs_seen[key]

    ref_runner = ValueRecorder(ref_gm, set(by_orig), on_ref)
    try:
        ref_out = ref_runner.run(*batch)
    except Exception as exc:
        raise ConfigError(f"the original model fails on the example inputs: {first_line(exc)}") from exc

    by_last = {w.nodes[-1].name: w for w in active}

    def on_new(node: torch.fx.Node, value: Any) -> None:
        w = by_last[node.name]
        rec = recorded[w.name]
        if not isinstance(value, torch.Tensor) or not isinstance(rec.get("y"), torch.Tensor):
            return
        w.accumulated = w.accumulated or ErrorAccumulator()
        w.accumulated.add(value, rec["y"])
        if w.runner is None and not w.unchecked:
            try:
                w.runner = SubgraphRunner(new_gm, w.nodes, first_input(w.nodes[0]),  # type: ignore[arg-type]
                                          compiled=False)
            except FxRewriteError as exc:
                w.unchecked = str(exc)
        if w.runner is not None and "x" in rec:
            w.local = w.local or ErrorAccumulator()
            w.local.add(w.runner(rec["x"]), rec["y"])

    runner = ValueRecorder(new_gm, set(by_last), on_new)
    try:
        new_out = runner.run(*batch)
    except Exception as exc:
        groups = {w.name: w.nodes for w in work}
        site = site_of(runner.current, groups) if runner.current is not None else None
        where = f" at node {runner.current.name}" if runner.current is not None else ""
        message = f"{site_label(site)}: the rewritten model raises{where}: {first_line(exc)}"
        (next(w for w in work if w.name == site).failures if site in groups else failures).append(message)
        return
    ref_leaves = pytree.tree_leaves(ref_out)
    new_leaves = pytree.tree_leaves(new_out)
    for acc, a, b in zip(out_acc, new_leaves, ref_leaves, strict=False):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            acc.add(a, b)


def _copy_tensors(value: Any) -> Any:
    """``value`` with every tensor in it cloned (detached), so that in-place ops on the originals do not reach it."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), value)
