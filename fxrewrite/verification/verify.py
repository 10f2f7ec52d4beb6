"""Verification of a rewrite: shape equivalence without compute, numeric drift per rewritten site and at every
model output, and gates that name the failing site.

1. **Shapes.** FakeTensors are propagated through the original and the rewritten graph (no real compute, no
   allocation: a model on the meta device or one too big to run checks in seconds). Every model output must agree
   in shape, dtype, device and memory format, and every rewritten site must have the same input and output shapes
   (and dtype, device) as the original convolution. A model that ``rewrite`` returns carries the metadata it was
   rewritten with: for the same inputs only its rewritten sites are re-propagated (FakeTensors from their recorded
   inputs; a plain conv's output comes from the shape formula, cheaper than running it on zeros at any input size)
   and compared with the original conv's recorded output, since an unchanged node cannot change shape; anything
   else (or ``shapes="full"``) propagates both models whole.
2. **Numerics** (real tensors only; skipped with a reason for meta models or fake inputs). Both models run in eval
   mode, with TF32 off, on the example inputs (or ``batches``). Per rewritten site, *local* figures compare the new
   subgraph with the original convolution on the same input (the original model's input at that site);
   *accumulated* figures compare the rewritten model's value at that point with the original model's. The same
   figures are given at every model output. Figures: relative L2 error ``||a - b|| / ||b||``, max abs error, SQNR
   ``10 log10(||b||^2 / ||a - b||^2)`` dB and cosine similarity (b is the original), accumulated over batches in
   float64.
3. **Gates.** A shape mismatch, a non-finite value where the original is finite, a rewritten model that fails to
   run, or an error above tolerance (relative L2 > ``rtol`` and max abs > ``atol``) at a site (local figures) or at
   an output fails the verification; each failure message names the site.

The default tolerance is *float level* for the dtype (``FLOAT_LEVEL``): the level an exact rewrite meets (the
maths is exact; only floating-point summation order differs). A lossy rewrite needs an explicit ``rtol``, or
``rtol=math.inf`` to report figures without an error gate; ``Verification.level`` says which level was checked.

>>> import torch, fxrewrite
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
>>> result = fxrewrite.rewrite(model, (torch.randn(1, 3, 16, 16),), passes="depthwise-separable{rank=exact}")
>>> v = verify(model, result.module, (torch.randn(2, 3, 16, 16),))
>>> v.ok, v.numerics_checked, [s.site for s in v.sites], v.sites[0].output_after.shape
(True, True, ['0', '2'], (2, 8, 14, 14))
>>> v.sites[1].local.rel_l2 < 1e-5 and v.outputs[0].error.cosine > 0.99999
True
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.capture import LeafSpec, as_graph_module
from fxrewrite.graph.site_nodes import first_input, original_nodes, site_groups
from fxrewrite.util.inputs import example_inputs_tuple
from fxrewrite.util.runtime import device_of, eval_mode, tensors_of
from fxrewrite.verification.compare import compare_batch
from fxrewrite.verification.formatting import first_line, fmt_g, site_label
from fxrewrite.verification.numerics import ErrorAccumulator, full_precision, numerics_blocker
from fxrewrite.verification.records import FLOAT_LEVEL, ErrorStats, OutputCheck, SiteCheck
from fxrewrite.verification.result import Verification
from fxrewrite.verification.shape_check import (
    ShapeRun,
    check_output_shapes,
    check_site_shapes,
    cost_totals,
    failing_node,
    failure_point,
    group_cost,
    node_meta,
    propagate,
    propagate_changed,
)
from fxrewrite.verification.site_work import SiteWork, passes_of, site_of

__all__ = ["cli_exit_code", "gc_paused", "verify"]


def _default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return FLOAT_LEVEL.get(dtype, FLOAT_LEVEL[torch.float32])


def _level(rtol: float, atol: float, dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if math.isinf(rtol):
        return f"no error gate (figures only; {name})"
    float_rtol, _ = _default_tolerance(dtype)
    kind = "float level" if rtol <= float_rtol else "approximate level"
    return f"{kind} (rtol={rtol:g}, atol={atol:g}, {name})"


def _main_dtype(inputs: Sequence[Any], module: nn.Module) -> torch.dtype:
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.dtype
    for t in tensors_of(module):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while verifying (or rewriting): its full collections walk every live object
    (a graph of thousands of nodes, modules, recorded values), so their cost grows with the graph and the total
    time with its square. Values are freed by reference counting as before; cycles wait for the next collection.
    Nested uses leave it as the outermost found it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def verify(original: nn.Module, rewritten: nn.Module, example_inputs: Any, *, rtol: float | None = None,
           atol: float | None = None, numerics: bool = True, batches: Iterable[Any] | None = None,
           sites: Iterable[str] = (), concrete_args: Mapping[str, Any] | None = None,
           leaf_modules: Iterable[LeafSpec] = (),
           autowrap_functions: Iterable[Callable[..., Any]] = (), shapes: str = "changed",
           reference: torch.fx.GraphModule | None = None, costs: tuple[Any, Any] | None = None) -> Verification:
    """Check that ``rewritten`` computes what ``original`` does, site by site; see the module docstring.

    ``rtol``/``atol`` default to float level for the dtype (``FLOAT_LEVEL``); ``rtol=math.inf`` keeps the figures
    without an error gate. ``batches`` (an iterable of input tuples) replaces the example inputs for numerics.
    ``sites`` names rewritten sites that carry no provenance node of their own (``rewrite`` passes its records').
    Capture options are used when ``original`` has to be traced. Neither model is modified (each submodule's
    train/eval flag is restored; parameters are never copied).

    ``shapes="changed"`` (the default) checks shapes at the cost of what changed when ``rewritten`` carries the
    metadata its rewrite recorded for these inputs (what ``rewrite`` returns): only the rewritten sites are
    re-propagated, from their recorded inputs, and compared with the original conv's recorded output; otherwise,
    or when anything differs, both models are propagated whole. ``shapes="full"`` always propagates both whole:
    for a graph edited by hand outside its rewritten sites.

    What ``rewrite`` already has, it hands over: ``reference``, ``original``'s graph as captured (before the
    passes) over ``original``'s own modules (``graph.capture.graph_module_over``), instead of a second trace;
    ``costs``, the ``ModelCost`` of the original and the rewritten graph for these inputs, used where the recorded
    metadata stands for both models instead of counting them again.
    """
    with gc_paused():
        return _verify(original, rewritten, example_inputs, rtol, atol, numerics, batches, sites, concrete_args,
                       leaf_modules, autowrap_functions, shapes, reference, costs)


def _verify(original: nn.Module, rewritten: nn.Module, example_inputs: Any, rtol: float | None, atol: float | None,
            numerics: bool, batches: Iterable[Any] | None, sites: Iterable[str],
            concrete_args: Mapping[str, Any] | None, leaf_modules: Iterable[LeafSpec],
            autowrap_functions: Iterable[Callable[..., Any]], shapes: str, reference: torch.fx.GraphModule | None,
            costs: tuple[Any, Any] | None) -> Verification:
    inputs = example_inputs_tuple(example_inputs)
    dtype = _main_dtype(inputs, original)
    default_rtol, default_atol = _default_tolerance(dtype)
    rtol = default_rtol if rtol is None else float(rtol)
    atol = default_atol if atol is None else float(atol)
    if rtol < 0 or atol < 0:
        raise ConfigError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    if shapes not in ("changed", "full"):
        raise ConfigError(f"shapes must be 'changed' or 'full', got {shapes!r}")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # only interpreted (shapes, recorded runs), so no Python code is generated for either
    ref_gm = reference if reference is not None else as_graph_module(
        original, concrete_args=concrete_args, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
        runnable=False)
    new_gm = as_graph_module(rewritten, runnable=False)
    groups = site_groups(new_gm, sites)
    originals = original_nodes(ref_gm, groups)
    work = [SiteWork(name, nodes, originals.get(name)) for name, nodes in groups.items()]
    by_name = {w.name: w for w in work}
    model_failures: list[str] = []  # failures not attributable to one site (output failures name a site)

    with eval_mode(original, rewritten):
        blocker = "numerics=False was passed" if not numerics else numerics_blocker(original, rewritten, inputs)
        known = propagate_changed(ref_gm, new_gm, rewritten, groups, originals, inputs, original,
                                  costs=costs) if shapes == "changed" else None
        try:
            ref = known[0] if known else propagate(ref_gm, inputs, device_of(original))
        except Exception as exc:
            raise ConfigError(f"the original model does not run on the example inputs (shape propagation failed "
                              f"at {failure_point(ref_gm)}): {first_line(exc)}") from exc
        try:
            new: ShapeRun | None = known[1] if known else propagate(new_gm, inputs, device_of(rewritten))
        except Exception as exc:
            new = None
            node = failing_node(new_gm)
            site = site_of(node, groups) if node is not None else None
            message = (f"{site_label(site)}: the rewritten model fails shape propagation at {failure_point(new_gm)}: "
                       f"{first_line(exc)}")
            (by_name[site].failures if site in by_name else model_failures).append(message)
        upstream_failed = False
        for w in work:
            check_site_shapes(w, upstream_failed=upstream_failed)
            upstream_failed = upstream_failed or bool(w.failures)
        first_bad = next((w.name for w in work if w.failures), None)
        output_failures: list[str] = []
        outputs = check_output_shapes(ref, new, output_failures, first_bad)
        timings["shapes"] = time.perf_counter() - start

        if blocker is None and new is None:
            blocker = "the rewritten model failed shape propagation"
        if blocker is None and any(not o.shapes_ok for o in outputs):
            blocker = "output shapes differ"
        numeric_batches = 0
        if blocker is None:
            start = time.perf_counter()
            run_batches = [inputs] if batches is None else [example_inputs_tuple(b, "each batch") for b in batches]
            out_acc = [ErrorAccumulator() for _ in outputs]
            with torch.no_grad(), full_precision():
                for batch in run_batches:
                    compare_batch(ref_gm, new_gm, batch, work, out_acc, model_failures)
            numeric_batches = len(run_batches)
            outputs = [_with_error(o, acc.stats()) for o, acc in zip(outputs, out_acc, strict=True)]
            timings["numerics"] = time.perf_counter() - start

    sites = [_finish_site(w, ref, new, rtol, atol, blocker) for w in work]
    outputs = [_gate_output(o, sites, rtol, atol, output_failures) for o in outputs]
    failures = model_failures + [f for w in work for f in w.failures] + output_failures
    return Verification(
        ok=not failures, failures=tuple(dict.fromkeys(failures)), sites=tuple(sites), outputs=tuple(outputs),
        numerics_checked=blocker is None, numerics_reason=blocker or "", rtol=rtol, atol=atol,
        level=_level(rtol, atol, dtype), dtype=str(dtype).removeprefix("torch."), batches=numeric_batches,
        cost_before=cost_totals(ref.cost), cost_after=cost_totals(new.cost if new else None),
        timings=MappingProxyType(timings))


def _with_error(o: OutputCheck, stats: ErrorStats) -> OutputCheck:
    if o.before is None or stats.numel == 0:
        return o
    return OutputCheck(o.name, o.before, o.after, o.shapes_ok, stats, o.status, o.reason)


def _finish_site(w: SiteWork, ref: ShapeRun, new: ShapeRun | None, rtol: float, atol: float,
                 blocker: str | None) -> SiteCheck:
    local = w.local.stats() if w.local else None
    accumulated = w.accumulated.stats() if w.accumulated else None
    if local is not None and local.reference_nonfinite:
        w.failures.append(f"site {w.name}: the original conv's output has {local.reference_nonfinite} non-finite "
                          "value(s) (NaN or inf) on these inputs: nothing can be compared there; find their cause "
                          "(weights, batch-norm statistics, inputs, overflow) before rewriting")
    elif local is not None and local.nonfinite:
        w.failures.append(f"site {w.name}: {local.nonfinite} non-finite value(s) in the rewritten site's output "
                          "where the original conv's is finite")
    elif local is not None and local.exceeds(rtol, atol):
        w.failures.append(f"site {w.name}: local relative L2 error {fmt_g(local.rel_l2)} > rtol {rtol:g} (max abs "
                          f"{fmt_g(local.max_abs)} > atol {atol:g}; rewritten by {', '.join(passes_of(w))})")
    if w.failures:
        status, reason = "failed", "; ".join(f.removeprefix(f"site {w.name}: ") for f in w.failures)
    elif local is None:
        status = "unchecked"
        reason = w.unchecked or ("numerics skipped" if blocker else "no numeric comparison")
    else:
        status, reason = "ok", ""
    orig_names = [w.original.name] if w.original is not None else []
    return SiteCheck(
        site=w.name, passes=passes_of(w), nodes=tuple(n.name for n in w.nodes),
        original_node=w.original.name if w.original is not None else None,
        input_before=node_meta(first_input(w.original)) if w.original is not None else None,
        input_after=node_meta(first_input(w.nodes[0])),
        output_before=node_meta(w.original), output_after=node_meta(w.nodes[-1]),
        shapes_ok=w.shapes_ok, local=local, accumulated=accumulated,
        cost_before=group_cost(ref, orig_names) if orig_names else None,
        cost_after=group_cost(new, [n.name for n in w.nodes]),
        status=status, reason=reason)


def _gate_output(o: OutputCheck, sites: Sequence[SiteCheck], rtol: float, atol: float,
                 failures: list[str]) -> OutputCheck:
    e = o.error
    if e is None or not o.shapes_ok:
        return o
    if e.reference_nonfinite:
        reason = (f"the original model's output has {e.reference_nonfinite} non-finite value(s) (NaN or inf) on these "
                  f"inputs ({e.nonfinite} more in the rewrite's): nothing can be compared there; find their cause "
                  "(weights, batch-norm statistics, inputs, overflow) before rewriting")
    elif e.nonfinite:
        culprit = next((s.site for s in sites if s.accumulated is not None and s.accumulated.nonfinite), None)
        reason = (f"{e.nonfinite} non-finite value(s) where the original is finite; first non-finite at "
                  f"{site_label(culprit)}")
    elif e.exceeds(rtol, atol):
        over = [s for s in sites if s.accumulated is not None and s.accumulated.exceeds(rtol, atol)]
        worst = max((s for s in sites if s.accumulated is not None), key=lambda s: s.accumulated.rel_l2,  # type: ignore[union-attr]
                    default=None)
        culprit = over[0].site if over else (worst.site if worst is not None else None)
        reason = (f"relative L2 error {fmt_g(e.rel_l2)} > rtol {rtol:g} (max abs {fmt_g(e.max_abs)} > atol {atol:g}); "
                  f"the error first exceeds the tolerance at {site_label(culprit)}")
    else:
        return o
    failures.append(f"{o.name}: {reason}")
    return OutputCheck(o.name, o.before, o.after, o.shapes_ok, e, "failed", reason)


def cli_exit_code(verification: Verification) -> int:
    """The exit code of ``fxrewrite verify`` / a gated ``fxrewrite rewrite``: 0 ok, 1 a gate failed.

    >>> cli_exit_code(Verification(True, (), (), (), False, "numerics=False", 1e-4, 1e-5, "float level", "float32", 0))
    0
    """
    return 0 if verification.ok else 1
