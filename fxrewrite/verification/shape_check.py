"""The shape check of a verification: both models propagated with FakeTensors (no real compute; one real run
where a node needs values), their analytic costs, and the comparison of every model output and every rewritten
site's boundary shapes.

>>> import torch
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten()))
>>> run = propagate(gm, [torch.zeros(2, 3, 6, 6)], None)
>>> run.leaves[0][0], tuple(run.leaves[0][1].shape), cost_totals(run.cost).params
('output', (2, 128), 224)
>>> failures = []
>>> [(c.name, c.shapes_ok, c.after.shape) for c in check_output_shapes(run, run, failures, None)], failures
([('output', True, (2, 128))], [])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxrewrite.graph import shapes
from fxrewrite.graph.shapes import fake_mode, fake_propagate, propagate_nodes
from fxrewrite.graph.site_nodes import first_input
from fxrewrite.util.runtime import tensors_of
from fxrewrite.verification.numerics import numerics_blocker
from fxrewrite.verification.records import CostTotals, OutputCheck, TensorMeta
from fxrewrite.verification.site_work import SiteWork, passes_of

__all__ = ["ShapeRun", "check_output_shapes", "check_site_shapes", "cost_totals", "failing_node", "failure_point",
           "group_cost", "node_meta", "propagate", "propagate_changed"]


@dataclass
class ShapeRun:
    """The fake-propagated copy of one model: node values, output leaves and costs."""

    gm: torch.fx.GraphModule
    leaves: list[tuple[str, Any]]
    spec: Any
    cost: Any  # ModelCost | None
    cost_index: dict[str, list[Any]] | None = None  # the cost's nodes by name (built by group_cost)


def _fake_inputs(mode: Any, inputs: Sequence[Any], device: torch.device | None) -> list[Any]:
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            out.append(x)
            continue
        target = x.device
        if device is not None and (x.device.type == "meta" or device.type == "meta"):
            target = device  # a meta model checks shapes with meta inputs and vice versa
        with mode:
            out.append(torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device=target,
                                           requires_grad=x.requires_grad))
    return out


def propagate(gm: torch.fx.GraphModule, inputs: Sequence[Any], device: torch.device | None) -> ShapeRun:
    """Fake propagation; where a node needs real values (a data-dependent leaf module), one real run instead, as
    ``fxrewrite.graph.shapes.propagate_shapes`` does (with a warning; the caller runs it under ``eval_mode``)."""
    mode = fake_mode()
    try:
        result = fake_propagate(gm, mode, _fake_inputs(mode, inputs, device))
    except Exception as exc:
        if not shapes.is_data_dependent(exc) or numerics_blocker(gm, gm, inputs) is not None:
            raise
        warnings.warn(f"fxrewrite.verify: shape propagation at {failure_point(gm)} needs real values (data-dependent "
                      "control flow, e.g. in a leaf module); running the model once on the example inputs instead.",
                      stacklevel=3)
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
        shapes.propagate_real(gm, inputs, mode)
        result = gm.graph.output_node().meta["val"]
    return _shape_run(gm, result)


def _shape_run(gm: torch.fx.GraphModule, result: Any, cost: Any = None) -> ShapeRun:
    """The run's output leaves and its ``ModelCost`` (``cost`` when the caller has it already)."""
    from fxrewrite.measure.cost import model_cost
    leaves, spec = pytree.tree_flatten_with_path(result)
    named = [("output" + pytree.keystr(path), value) for path, value in leaves]
    if cost is None:
        try:
            cost = model_cost(gm)
        except Exception:  # costs are informational here; a graph the cost model cannot read still verifies
            cost = None
    return ShapeRun(gm, named, spec, cost)


def propagate_changed(ref_gm: torch.fx.GraphModule, new_gm: torch.fx.GraphModule, rewritten: torch.nn.Module,
                      groups: dict[str, list[torch.fx.Node]], originals: dict[str, torch.fx.Node],
                      inputs: Sequence[Any], original: torch.nn.Module, *,
                      costs: tuple[Any, Any] | None = None) -> tuple[ShapeRun, ShapeRun] | None:
    """The shape check at the cost of what changed, or None where it cannot stand for a whole propagation.

    ``rewritten`` (the GraphModule whose graph ``new_gm`` copies, node for node) comes out of the rewrite with
    ``meta["val"]`` on every node, propagated from its example inputs: an
    unchanged node keeps the original's value, and the last node of each rewritten site the original conv's. When
    its placeholders' metadata is that of ``inputs`` (the same shapes, dtypes, devices and strides), the original's
    metadata is read from there (``ref_gm``'s nodes by name, a site's original conv from the site's last node), and
    only the sites' nodes are re-propagated, from their recorded input metadata. If every site's new output has
    the recorded metadata (strides included), nothing downstream can differ, and the two runs are returned. None
    (the caller propagates both models whole) when a placeholder or node lacks recorded metadata or differs from
    ``inputs``, a node of the original has no counterpart, something is on the meta device (``others``: the models),
    a site fails to propagate or its output differs: the full propagation then says exactly what and where.

    ``costs``: the ``ModelCost`` of both models as the rewrite counted them from the same metadata (not counted
    again).

    An edit *outside* the rewritten sites (a module swapped by hand at a node no pass touched) is not seen here:
    ``verify(shapes="full")`` propagates both models whole.
    """
    if not isinstance(rewritten, torch.fx.GraphModule) or _on_meta(inputs, original, rewritten):
        return None
    mine = [n for n in new_gm.graph.nodes if n.op != "output"]
    theirs = [n for n in rewritten.graph.nodes if n.op != "output"]
    if len(mine) != len(theirs) or any(a.name != b.name or "val" not in b.meta
                                   for a, b in zip(mine, theirs, strict=True)):
        return None
    placeholders = [n for n in theirs if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        return None
    for node, x in zip(placeholders, inputs, strict=True):
        val = node.meta["val"]
        if isinstance(x, torch.Tensor) != isinstance(val, torch.Tensor):
            return None
        if isinstance(x, torch.Tensor) and not _same_meta(val, x):
            return None
    for a, b in zip(mine, theirs, strict=True):
        a.meta["val"] = b.meta["val"]
    known = _changed_runs(ref_gm, new_gm, groups, originals, costs or (None, None))
    if known is None:  # a stale value must not hide where the whole propagation stops
        for n in mine:
            n.meta.pop("val", None)
    return known


def _changed_runs(ref_gm: torch.fx.GraphModule, new_gm: torch.fx.GraphModule, groups: dict[str, list[torch.fx.Node]],
                  originals: dict[str, torch.fx.Node],
                  costs: tuple[Any, Any]) -> tuple[ShapeRun, ShapeRun] | None:
    by_name = {n.name: n for n in new_gm.graph.nodes if n.op != "output"}
    site_last = {originals[s].name: nodes[-1] for s, nodes in groups.items() if s in originals}
    ref_vals: dict[torch.fx.Node, Any] = {}
    for node in ref_gm.graph.nodes:
        if node.op == "output":
            continue
        twin = site_last.get(node.name)
        if twin is None:
            twin = by_name.get(node.name)
            if twin is None or (twin.op, twin.target) != (node.op, node.target):
                return None
        ref_vals[node] = twin.meta["val"]
    changed = {n for nodes in groups.values() for n in nodes}
    order = [n for n in new_gm.graph.nodes if n in changed]
    recorded = {n: n.meta["val"] for n in order}
    try:
        propagate_nodes(new_gm, order)
    except Exception:
        return None
    for nodes in groups.values():
        before, after = recorded[nodes[-1]], nodes[-1].meta.get("val")
        if not (isinstance(after, torch.Tensor) and isinstance(before, torch.Tensor) and _same_meta(after, before)):
            return None
    for node, val in ref_vals.items():
        node.meta["val"] = val
    return (_shape_run(ref_gm, _output_value(ref_gm), costs[0]),
            _shape_run(new_gm, _output_value(new_gm), costs[1]))


def _same_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)


def _on_meta(inputs: Sequence[Any], *modules: torch.nn.Module) -> bool:
    if any(isinstance(x, torch.Tensor) and x.device.type == "meta" for x in inputs):
        return True
    return any(t.device.type == "meta" for m in modules for t in tensors_of(m))


def _output_value(gm: torch.fx.GraphModule) -> Any:
    """The model's output as the propagation would return it, from the recorded values of the nodes it names."""
    output = gm.graph.output_node()
    return _plain(torch.fx.node.map_arg(output.args[0], lambda n: n.meta["val"]))


def _plain(value: Any) -> Any:
    """fx's immutable containers as the plain ones a run returns (so that both routes name outputs alike)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        items = [_plain(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def failing_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The first node that shape propagation left without a value (where it failed), or None."""
    for node in gm.graph.nodes:
        if node.op != "output" and "val" not in node.meta:
            return node
    return None


def failure_point(gm: torch.fx.GraphModule) -> str:
    """Where shape propagation failed, for a message: ``node <name> (<op> <target>)``."""
    node = failing_node(gm)
    if node is None:
        return "an unknown node"
    return f"node {node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"


def node_meta(node: torch.fx.Node | None) -> TensorMeta | None:
    """The metadata of a node's propagated value (None for no node or a non-tensor value)."""
    val = node.meta.get("val") if node is not None else None
    return TensorMeta.of(val) if isinstance(val, torch.Tensor) else None


def cost_totals(cost: Any) -> CostTotals | None:
    """The totals of a ``ModelCost`` (None stays None)."""
    return None if cost is None else CostTotals(cost.params, cost.macs, cost.activation_bytes)


def group_cost(run: ShapeRun | None, names: Iterable[str]) -> CostTotals | None:
    """The totals of the nodes ``names`` in a run's ``ModelCost`` (None without one); the cost's nodes are indexed
    by name once per run, so a call per site is linear in the site, not in the graph."""
    if run is None or run.cost is None:
        return None
    if run.cost_index is None:
        run.cost_index = {}
        for c in run.cost.nodes:
            run.cost_index.setdefault(c.node, []).append(c)
    nodes = [c for name in dict.fromkeys(names) for c in run.cost_index.get(name, ())]
    return CostTotals(sum(c.params for c in nodes), sum(c.macs for c in nodes),
                      sum(c.activation_bytes for c in nodes))


def check_output_shapes(ref: ShapeRun, new: ShapeRun | None, failures: list[str],
                        first_bad_site: str | None) -> list[OutputCheck]:
    """The check of every output leaf of ``ref`` against ``new`` (None: the rewritten model failed propagation);
    each failure is appended to ``failures``, naming ``first_bad_site`` when a site's shapes already differ."""
    if new is not None and new.spec != ref.spec:
        failures.append(f"model: the output structure differs: {ref.spec} before, {new.spec} after the rewrite")
    after = dict(new.leaves) if new is not None else {}
    checks = []
    for name, value in ref.leaves:
        before = TensorMeta.of(value) if isinstance(value, torch.Tensor) else None
        other = after.get(name)
        now = TensorMeta.of(other) if isinstance(other, torch.Tensor) else None
        if before is None:  # a non-tensor output: it must be the same value
            ok = new is not None and name in after and (isinstance(other, torch.Tensor) or other == value)
            reason = "" if ok else f"non-tensor output {value!r} became {other!r}"
        elif now is None:
            ok, reason = False, "missing in the rewritten model" if new is not None else "not computed"
        else:
            diff = now.mismatch(before)
            ok, reason = diff is None, diff or ""
        if not ok and new is not None:
            if first_bad_site is not None:
                reason += f"; first differs at site {first_bad_site}"
            failures.append(f"{name}: {reason}")
        checks.append(OutputCheck(name, before, now, ok, None, "ok" if ok else "failed", reason))
    return checks


def check_site_shapes(w: SiteWork, upstream_failed: bool) -> None:
    """Boundary shapes of one site. An input that already differs because an earlier site broke is reported on
    this site but blamed on that one (the failure message names the site whose output first differs)."""
    if w.original is None:
        w.unchecked = "no counterpart in the original graph"
        return
    in_before, in_after = node_meta(first_input(w.original)), node_meta(first_input(w.nodes[0]))
    out_before, out_after = node_meta(w.original), node_meta(w.nodes[-1])
    in_diff = in_after.mismatch(in_before, memory_format=False) if in_before and in_after else None
    out_diff = out_after.mismatch(out_before, memory_format=False) if out_before and out_after else None
    if not in_diff and not out_diff:
        return
    w.shapes_ok = False
    if in_diff and upstream_failed:
        w.unchecked = f"its input changed upstream ({in_diff})"
        return
    by = ", ".join(passes_of(w))
    if in_diff:
        w.failures.append(f"site {w.name}: input {in_diff} (rewritten by {by})")
    if out_diff:
        w.failures.append(f"site {w.name}: output {out_diff} (rewritten by {by})")
