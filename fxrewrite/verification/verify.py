"""Verification of a rewrite: shape equivalence without compute, numeric drift per rewritten site and at every
model output, and gates that name the failing site.

1. **Shapes.** FakeTensors are propagated through the original and the rewritten graph (no real compute, no
   allocation: a model on the meta device or one too big to run checks in seconds). Every model output must agree
   in shape, dtype, device and memory format, and every rewritten site must have the same input and output shapes
   (and dtype, device) as the original convolution.
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

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.utils._pytree as pytree
from tabulate import tabulate
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxrewrite.errors import ConfigError, FxRewriteError, VerificationFailure
from fxrewrite.graph import shapes
from fxrewrite.graph.capture import LeafSpec, as_graph_module
from fxrewrite.graph.recorder import SubgraphRunner, ValueRecorder
from fxrewrite.graph.rewriter import PROVENANCE_KEY
from fxrewrite.graph.shapes import fake_mode
from fxrewrite.graph.site_nodes import first_input, original_nodes, site_groups
from fxrewrite.util.formatting import json_float
from fxrewrite.util.inputs import example_inputs_tuple
from fxrewrite.util.runtime import device_of, eval_mode, tensors_of

__all__ = [
    "FLOAT_LEVEL", "CostTotals", "ErrorStats", "OutputCheck", "SiteCheck", "TensorMeta", "Verification",
    "cli_exit_code", "site_groups", "verify",
]

#: Default (rtol, atol) per dtype: what an exact rewrite meets (relative L2 / max abs error).
FLOAT_LEVEL: Mapping[torch.dtype, tuple[float, float]] = MappingProxyType({
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
})


# ------------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class TensorMeta:
    """Shape, dtype, device and memory format of one tensor (from FakeTensor propagation)."""

    shape: tuple[int, ...]
    dtype: str
    device: str
    memory_format: str

    @staticmethod
    def of(t: torch.Tensor) -> TensorMeta:
        return TensorMeta(tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."), str(t.device),
                          _memory_format(t))

    def mismatch(self, other: TensorMeta, *, memory_format: bool = True) -> str | None:
        """A sentence saying what differs from ``other`` (None when they agree)."""
        diffs = [f"{k} {getattr(other, k)} -> {getattr(self, k)}" for k in ("shape", "dtype", "device")
                 if getattr(self, k) != getattr(other, k)]
        if memory_format and self.memory_format != other.memory_format:
            diffs.append(f"memory format {other.memory_format} -> {self.memory_format}")
        return ", ".join(diffs) or None

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "device": self.device,
                "memory_format": self.memory_format}


@dataclass(frozen=True)
class ErrorStats:
    """Error of a candidate tensor (rewritten) against a reference (original), over all batches.

    Figures are over the elements where both are finite; ``nonfinite`` counts elements that are non-finite in the
    candidate but finite in the reference. ``sqnr_db`` is ``inf`` when the error is exactly zero.
    """

    rel_l2: float
    max_abs: float
    sqnr_db: float
    cosine: float
    numel: int
    nonfinite: int = 0

    def exceeds(self, rtol: float, atol: float) -> bool:
        return self.nonfinite > 0 or (self.rel_l2 > rtol and self.max_abs > atol)

    def to_dict(self) -> dict[str, Any]:
        return {"rel_l2": json_float(self.rel_l2), "max_abs": json_float(self.max_abs),
                "sqnr_db": json_float(self.sqnr_db), "cosine": json_float(self.cosine), "numel": self.numel,
                "nonfinite": self.nonfinite}


@dataclass(frozen=True)
class CostTotals:
    """Analytic totals of one model (``fxrewrite.measure.cost``): parameter elements, MACs, activation bytes."""

    params: int
    macs: int
    activation_bytes: int

    def to_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs, "activation_bytes": self.activation_bytes}


@dataclass(frozen=True)
class SiteCheck:
    """Verification of one rewritten site: boundary shapes, local and accumulated error, analytic costs.

    ``status`` is ``ok``, ``failed`` (``reason`` says why) or ``unchecked`` (numerics skipped or the site has no
    counterpart in the original graph).
    """

    site: str
    passes: tuple[str, ...]
    nodes: tuple[str, ...]
    original_node: str | None
    input_before: TensorMeta | None
    input_after: TensorMeta | None
    output_before: TensorMeta | None
    output_after: TensorMeta | None
    shapes_ok: bool
    local: ErrorStats | None
    accumulated: ErrorStats | None
    cost_before: CostTotals | None
    cost_after: CostTotals | None
    status: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site, "passes": list(self.passes), "nodes": list(self.nodes),
            "original_node": self.original_node,
            **{k: (getattr(self, k).to_dict() if getattr(self, k) is not None else None)
               for k in ("input_before", "input_after", "output_before", "output_after", "local", "accumulated",
                         "cost_before", "cost_after")},
            "shapes_ok": self.shapes_ok, "status": self.status, "reason": self.reason,
        }


@dataclass(frozen=True)
class OutputCheck:
    """Verification of one model output (``output``, ``output[0]``, ``output['out']``...)."""

    name: str
    before: TensorMeta | None
    after: TensorMeta | None
    shapes_ok: bool
    error: ErrorStats | None
    status: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "before": self.before.to_dict() if self.before else None,
                "after": self.after.to_dict() if self.after else None, "shapes_ok": self.shapes_ok,
                "error": self.error.to_dict() if self.error else None, "status": self.status,
                "reason": self.reason}


@dataclass(frozen=True)
class Verification:
    """The result of ``verify``: ``ok``, the failure messages (each names its site or output) and every figure.

    ``level`` says which tolerance was checked (float level, approximate, or no error gate); ``numerics_reason``
    says why numerics were skipped when ``numerics_checked`` is False. ``timings`` (seconds) are informational.
    """

    ok: bool
    failures: tuple[str, ...]
    sites: tuple[SiteCheck, ...]
    outputs: tuple[OutputCheck, ...]
    numerics_checked: bool
    numerics_reason: str
    rtol: float
    atol: float
    level: str
    dtype: str
    batches: int
    cost_before: CostTotals | None = None
    cost_after: CostTotals | None = None
    mode: str = "eval"
    timings: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def exit_code(self) -> int:
        """The CLI exit code: 0 when every gate passed, 1 otherwise."""
        return cli_exit_code(self)

    def site(self, name: str) -> SiteCheck:
        """The check of site ``name`` (KeyError naming the known sites when absent)."""
        for s in self.sites:
            if s.site == name:
                return s
        raise KeyError(f"no rewritten site {name!r}; sites: {[s.site for s in self.sites]}")

    def raise_if_failed(self) -> Verification:
        """Raise ``VerificationFailure`` listing every failure; returns self when every gate passed."""
        if not self.ok:
            raise VerificationFailure("verification failed (" + self.level + "):\n  " + "\n  ".join(self.failures))
        return self

    def summary(self) -> str:
        """One line: PASSED/FAILED, the level and how numerics ran (or why they were skipped)."""
        verdict = "PASSED" if self.ok else f"FAILED ({len(self.failures)} failure(s))"
        if self.numerics_checked:
            how = (f"numerics on {self.batches} batch{'es' if self.batches != 1 else ''} in {self.mode} mode; "
                   f"tolerance: {self.level}")
        else:
            how = f"shapes only; numerics skipped: {self.numerics_reason}"
        return f"verification: {verdict}; {how}"

    def site_rows(self) -> list[list[str]]:
        rows = []
        for s in self.sites:
            before = _fmt_shape(s.output_before)
            after = _fmt_shape(s.output_after)
            shape = before if before == after else f"{before} -> {after}"
            rows.append([s.site, shape, *_fmt_stats(s.local), fmt_rel(s.accumulated), _fmt_sqnr(s.accumulated),
                         _fmt_status(s.status, s.reason)])
        return rows

    SITE_HEADERS = ("site", "output shape", "local rel. L2", "local max abs", "local SQNR dB", "local cosine",
                    "accum. rel. L2", "accum. SQNR dB", "status")
    OUTPUT_HEADERS = ("output", "shape / dtype / memory format", "rel. L2", "max abs", "SQNR dB", "cosine", "status")

    def output_rows(self) -> list[list[str]]:
        rows = []
        for o in self.outputs:
            before = _fmt_meta(o.before)
            after = _fmt_meta(o.after)
            rows.append([o.name, before if before == after else f"{before} -> {after}", *_fmt_stats(o.error),
                         _fmt_status(o.status, o.reason)])
        return rows

    def table(self, tablefmt: str = "simple", *, summary: bool = True) -> str:
        """The summary line (unless ``summary=False``), the per-site and per-output tables and the failures."""
        blocks = [self.summary()] if summary else []
        if self.sites:
            blocks.append(tabulate(self.site_rows(), headers=self.SITE_HEADERS, tablefmt=tablefmt,
                                   disable_numparse=True))
        blocks.append(tabulate(self.output_rows(), headers=self.OUTPUT_HEADERS, tablefmt=tablefmt,
                               disable_numparse=True))
        notes = ["local: the new subgraph vs the original conv on the same input; accum.: the rewritten model vs the "
                 "original at that point. rel. L2 = ||a-b||/||b||, SQNR = 10 log10(||b||^2/||a-b||^2), b = original."]
        if self.failures:
            notes += ["failures:"] + [f"  {f}" for f in self.failures]
        return "\n\n".join(blocks) + "\n" + "\n".join(notes)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "failures": list(self.failures), "level": self.level,
            "rtol": json_float(self.rtol), "atol": json_float(self.atol), "dtype": self.dtype,
            "numerics_checked": self.numerics_checked, "numerics_reason": self.numerics_reason,
            "batches": self.batches, "mode": self.mode,
            "cost_before": self.cost_before.to_dict() if self.cost_before else None,
            "cost_after": self.cost_after.to_dict() if self.cost_after else None,
            "sites": [s.to_dict() for s in self.sites], "outputs": [o.to_dict() for o in self.outputs],
            "timings_s": {k: round(v, 6) for k, v in self.timings.items()},
        }


def cli_exit_code(verification: Verification) -> int:
    """The exit code of ``fxrewrite verify`` / a gated ``fxrewrite rewrite``: 0 ok, 1 a gate failed.

    >>> cli_exit_code(Verification(True, (), (), (), False, "numerics=False", 1e-4, 1e-5, "float level", "float32", 0))
    0
    """
    return 0 if verification.ok else 1


# --------------------------------------------------------------------------------------------- formatting


def _g(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return "0" if x == 0 else f"{x:.3g}"


def fmt_rel(e: ErrorStats | None) -> str:
    if e is None:
        return "-"
    return f"non-finite ({e.nonfinite})" if e.nonfinite else _g(e.rel_l2)


def _fmt_sqnr(e: ErrorStats | None) -> str:
    if e is None:
        return "-"
    return _g(e.sqnr_db) if math.isinf(e.sqnr_db) or math.isnan(e.sqnr_db) else f"{e.sqnr_db:.1f}"


def _fmt_stats(e: ErrorStats | None) -> list[str]:
    if e is None:
        return ["-", "-", "-", "-"]
    return [fmt_rel(e), _g(e.max_abs), _fmt_sqnr(e), f"{e.cosine:.6f}"]


def _fmt_shape(m: TensorMeta | None) -> str:
    return "?" if m is None else "x".join(str(d) for d in m.shape) or "scalar"


def _fmt_meta(m: TensorMeta | None) -> str:
    return "?" if m is None else f"{_fmt_shape(m)} {m.dtype} {m.memory_format}"


def _fmt_status(status: str, reason: str) -> str:
    """A table cell: ``ok``, ``failed`` (the failures list below the table says why) or ``unchecked: why``."""
    return f"{status}: {reason}" if status == "unchecked" and reason else status


def _memory_format(t: torch.Tensor) -> str:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return "channels_last_3d"
    return "contiguous" if t.is_contiguous() else "strided"


# ------------------------------------------------------------------------------------------ graph helpers


# ---------------------------------------------------------------------------------------------- numerics


class _ErrorAccumulator:
    """Sums over batches (float64) from which ErrorStats are computed."""

    def __init__(self) -> None:
        self.err2 = self.ref2 = self.cand2 = self.dot = self.max_abs = 0.0
        self.numel = self.nonfinite = 0

    def add(self, candidate: torch.Tensor, reference: torch.Tensor) -> None:
        a = candidate.detach().to(torch.float64)
        b = reference.detach().to(torch.float64)
        if a.is_complex() or b.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        self.nonfinite += int((~fa & fb).sum())
        both = fa & fb
        if not bool(both.all()):
            a, b = a[both], b[both]
        d = a - b
        self.err2 += float((d * d).sum())
        self.ref2 += float((b * b).sum())
        self.cand2 += float((a * a).sum())
        self.dot += float((a * b).sum())
        if d.numel():
            self.max_abs = max(self.max_abs, float(d.abs().max()))
        self.numel += int(candidate.numel())

    def stats(self) -> ErrorStats:
        if self.err2 == 0.0:
            rel, sqnr = 0.0, math.inf
        else:
            rel = math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else math.inf
            sqnr = 10 * math.log10(self.ref2 / self.err2) if self.ref2 > 0 else -math.inf
        if self.cand2 > 0 and self.ref2 > 0:
            cosine = self.dot / math.sqrt(self.cand2 * self.ref2)
        else:
            cosine = 1.0 if self.cand2 == self.ref2 else 0.0
        return ErrorStats(rel, self.max_abs, sqnr, cosine, self.numel, self.nonfinite)


def error_stats(candidate: torch.Tensor, reference: torch.Tensor) -> ErrorStats:
    """Error figures of ``candidate`` against ``reference`` (one pair of tensors).

    >>> e = error_stats(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    >>> round(e.rel_l2, 6), e.max_abs, round(e.sqnr_db, 3)
    (0.267261, 1.0, 11.461)
    """
    acc = _ErrorAccumulator()
    acc.add(candidate, reference)
    return acc.stats()


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """Turn TF32 off for convolutions and matmuls (CUDA would otherwise round float32 to 10-bit mantissas, and an
    exact rewrite would not meet float level); restore the user's settings afterwards."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul


def numerics_blocker(original: nn.Module, rewritten: nn.Module, inputs: Sequence[Any]) -> str | None:
    for label, module in (("original", original), ("rewritten", rewritten)):
        if any(t.device.type == "meta" for t in tensors_of(module)):
            return f"the {label} model is on the meta device (no data): shapes and costs only"
    if any(isinstance(x, FakeTensor) for x in inputs if isinstance(x, torch.Tensor)):
        return "the example inputs are FakeTensors (no data): shapes and costs only"
    if any(x.device.type == "meta" for x in inputs if isinstance(x, torch.Tensor)):
        return "the example inputs are on the meta device (no data): shapes and costs only"
    return None


# ------------------------------------------------------------------------------------------- shape check


@dataclass
class _ShapeRun:
    """The fake-propagated copy of one model: node values, output leaves and costs."""

    gm: torch.fx.GraphModule
    leaves: list[tuple[str, Any]]
    spec: Any
    cost: Any  # ModelCost | None


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


def _propagate(gm: torch.fx.GraphModule, inputs: Sequence[Any], device: torch.device | None) -> _ShapeRun:
    """Fake propagation; where a node needs real values (a data-dependent leaf module), one real run instead, as
    ``fxrewrite.graph.shapes.propagate_shapes`` does (with a warning; the caller runs it under ``eval_mode``)."""
    from fxrewrite.measure.cost import model_cost
    mode = fake_mode()
    try:
        result = FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*_fake_inputs(mode, inputs, device))
    except Exception as exc:
        if not shapes.is_data_dependent(exc) or numerics_blocker(gm, gm, inputs) is not None:
            raise
        warnings.warn(f"fxrewrite.verify: shape propagation at {_where(gm)} needs real values (data-dependent "
                      "control flow, e.g. in a leaf module); running the model once on the example inputs instead.",
                      stacklevel=3)
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
        shapes.propagate_real(gm, inputs, mode)
        result = gm.graph.output_node().meta["val"]
    leaves, spec = pytree.tree_flatten_with_path(result)
    named = [("output" + pytree.keystr(path), value) for path, value in leaves]
    try:
        cost = model_cost(gm)
    except Exception:  # costs are informational here; a graph the cost model cannot read still verifies
        cost = None
    return _ShapeRun(gm, named, spec, cost)


def _failing_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    for node in gm.graph.nodes:
        if node.op != "output" and "val" not in node.meta:
            return node
    return None


def _node_val(node: torch.fx.Node | None) -> TensorMeta | None:
    val = node.meta.get("val") if node is not None else None
    return TensorMeta.of(val) if isinstance(val, torch.Tensor) else None


def _totals(cost: Any) -> CostTotals | None:
    return None if cost is None else CostTotals(cost.params, cost.macs, cost.activation_bytes)


def _group_cost(cost: Any, names: Iterable[str]) -> CostTotals | None:
    if cost is None:
        return None
    wanted = set(names)
    nodes = [c for c in cost.nodes if c.node in wanted]
    return CostTotals(sum(c.params for c in nodes), sum(c.macs for c in nodes),
                      sum(c.activation_bytes for c in nodes))


# ------------------------------------------------------------------------------------------------ verify


@dataclass
class _SiteWork:
    """Mutable per-site state while verifying (turned into a frozen SiteCheck at the end)."""

    name: str
    nodes: list[torch.fx.Node]
    original: torch.fx.Node | None
    failures: list[str] = field(default_factory=list)
    shapes_ok: bool = True
    local: _ErrorAccumulator | None = None
    accumulated: _ErrorAccumulator | None = None
    unchecked: str = ""
    runner: SubgraphRunner | None = None


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


def verify(original: nn.Module, rewritten: nn.Module, example_inputs: Any, *, rtol: float | None = None,
           atol: float | None = None, numerics: bool = True, batches: Iterable[Any] | None = None,
           sites: Iterable[str] = (), concrete_args: Mapping[str, Any] | None = None,
           leaf_modules: Iterable[LeafSpec] = (),
           autowrap_functions: Iterable[Callable[..., Any]] = ()) -> Verification:
    """Check that ``rewritten`` computes what ``original`` does, site by site; see the module docstring.

    ``rtol``/``atol`` default to float level for the dtype (``FLOAT_LEVEL``); ``rtol=math.inf`` keeps the figures
    without an error gate. ``batches`` (an iterable of input tuples) replaces the example inputs for numerics.
    ``sites`` names rewritten sites that carry no provenance node of their own (``rewrite`` passes its records').
    Capture options are used when ``original`` has to be traced. Neither model is modified (each submodule's
    train/eval flag is restored; parameters are never copied).
    """
    inputs = example_inputs_tuple(example_inputs)
    dtype = _main_dtype(inputs, original)
    default_rtol, default_atol = _default_tolerance(dtype)
    rtol = default_rtol if rtol is None else float(rtol)
    atol = default_atol if atol is None else float(atol)
    if rtol < 0 or atol < 0:
        raise ConfigError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    ref_gm = as_graph_module(original, concrete_args=concrete_args, leaf_modules=leaf_modules,
                             autowrap_functions=autowrap_functions)
    new_gm = as_graph_module(rewritten)
    groups = site_groups(new_gm, sites)
    originals = original_nodes(ref_gm, groups)
    work = [_SiteWork(name, nodes, originals.get(name)) for name, nodes in groups.items()]
    by_name = {w.name: w for w in work}
    model_failures: list[str] = []  # failures not attributable to one site (output failures name a site)

    with eval_mode(original, rewritten):
        try:
            ref = _propagate(ref_gm, inputs, device_of(original))
        except Exception as exc:
            raise ConfigError(f"the original model does not run on the example inputs (shape propagation failed "
                              f"at {_where(ref_gm)}): {_first_line(exc)}") from exc
        try:
            new: _ShapeRun | None = _propagate(new_gm, inputs, device_of(rewritten))
        except Exception as exc:
            new = None
            node = _failing_node(new_gm)
            site = _site_of(node, groups) if node is not None else None
            message = (f"{_site_label(site)}: the rewritten model fails shape propagation at {_where(new_gm)}: "
                       f"{_first_line(exc)}")
            (by_name[site].failures if site in by_name else model_failures).append(message)
        for i, w in enumerate(work):
            _check_site_shapes(w, upstream_failed=any(u.failures for u in work[:i]))
        first_bad = next((w.name for w in work if w.failures), None)
        output_failures: list[str] = []
        outputs = _check_output_shapes(ref, new, output_failures, first_bad)
        timings["shapes"] = time.perf_counter() - start

        blocker = "numerics=False was passed" if not numerics else numerics_blocker(original, rewritten, inputs)
        if blocker is None and new is None:
            blocker = "the rewritten model failed shape propagation"
        if blocker is None and any(not o.shapes_ok for o in outputs):
            blocker = "output shapes differ"
        numeric_batches = 0
        if blocker is None:
            start = time.perf_counter()
            run_batches = [inputs] if batches is None else [example_inputs_tuple(b, "each batch") for b in batches]
            out_acc = [_ErrorAccumulator() for _ in outputs]
            with torch.no_grad(), _full_precision():
                for batch in run_batches:
                    _numerics_batch(ref_gm, new_gm, batch, work, out_acc, model_failures)
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
        cost_before=_totals(ref.cost), cost_after=_totals(new.cost if new else None),
        timings=MappingProxyType(timings))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _where(gm: torch.fx.GraphModule) -> str:
    node = _failing_node(gm)
    if node is None:
        return "an unknown node"
    return f"node {node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"


def _site_of(node: torch.fx.Node, groups: Mapping[str, list[torch.fx.Node]]) -> str | None:
    """The rewritten site a node belongs to, or the nearest rewritten site upstream of it."""
    for site, nodes in groups.items():
        if node in nodes:
            return site
    seen, frontier = set(), list(node.all_input_nodes)
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for site, nodes in groups.items():
            if n in nodes:
                return site
        frontier.extend(n.all_input_nodes)
    return None


def _site_label(site: str | None) -> str:
    return f"site {site}" if site is not None else "model"


def _check_output_shapes(ref: _ShapeRun, new: _ShapeRun | None, failures: list[str],
                         first_bad_site: str | None) -> list[OutputCheck]:
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


def _check_site_shapes(w: _SiteWork, upstream_failed: bool) -> None:
    """Boundary shapes of one site. An input that already differs because an earlier site broke is reported on
    this site but blamed on that one (the failure message names the site whose output first differs)."""
    if w.original is None:
        w.unchecked = "no counterpart in the original graph"
        return
    in_before, in_after = _node_val(first_input(w.original)), _node_val(first_input(w.nodes[0]))
    out_before, out_after = _node_val(w.original), _node_val(w.nodes[-1])
    in_diff = in_after.mismatch(in_before, memory_format=False) if in_before and in_after else None
    out_diff = out_after.mismatch(out_before, memory_format=False) if out_before and out_after else None
    if not in_diff and not out_diff:
        return
    w.shapes_ok = False
    if in_diff and upstream_failed:
        w.unchecked = f"its input changed upstream ({in_diff})"
        return
    by = ", ".join(_passes_of(w))
    if in_diff:
        w.failures.append(f"site {w.name}: input {in_diff} (rewritten by {by})")
    if out_diff:
        w.failures.append(f"site {w.name}: output {out_diff} (rewritten by {by})")


def _passes_of(w: _SiteWork) -> tuple[str, ...]:
    names = [str(p["pass"]) for n in w.nodes if isinstance(p := n.meta.get(PROVENANCE_KEY), Mapping) and "pass" in p]
    return tuple(dict.fromkeys(names))


def _numerics_batch(ref_gm: torch.fx.GraphModule, new_gm: torch.fx.GraphModule, batch: tuple[Any, ...],
                    work: list[_SiteWork], out_acc: list[_ErrorAccumulator], failures: list[str]) -> None:
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
        raise ConfigError(f"the original model fails on the example inputs: {_first_line(exc)}") from exc

    by_last = {w.nodes[-1].name: w for w in active}

    def on_new(node: torch.fx.Node, value: Any) -> None:
        w = by_last[node.name]
        rec = recorded[w.name]
        if not isinstance(value, torch.Tensor) or not isinstance(rec.get("y"), torch.Tensor):
            return
        w.accumulated = w.accumulated or _ErrorAccumulator()
        w.accumulated.add(value, rec["y"])
        if w.runner is None and not w.unchecked:
            try:
                w.runner = SubgraphRunner(new_gm, w.nodes, first_input(w.nodes[0]))  # type: ignore[arg-type]
            except FxRewriteError as exc:
                w.unchecked = str(exc)
        if w.runner is not None and "x" in rec:
            w.local = w.local or _ErrorAccumulator()
            w.local.add(w.runner(rec["x"]), rec["y"])

    runner = ValueRecorder(new_gm, set(by_last), on_new)
    try:
        new_out = runner.run(*batch)
    except Exception as exc:
        groups = {w.name: w.nodes for w in work}
        site = _site_of(runner.current, groups) if runner.current is not None else None
        where = f" at node {runner.current.name}" if runner.current is not None else ""
        message = f"{_site_label(site)}: the rewritten model raises{where}: {_first_line(exc)}"
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


def _with_error(o: OutputCheck, stats: ErrorStats) -> OutputCheck:
    if o.before is None or stats.numel == 0:
        return o
    return OutputCheck(o.name, o.before, o.after, o.shapes_ok, stats, o.status, o.reason)


def _finish_site(w: _SiteWork, ref: _ShapeRun, new: _ShapeRun | None, rtol: float, atol: float,
                 blocker: str | None) -> SiteCheck:
    local = w.local.stats() if w.local else None
    accumulated = w.accumulated.stats() if w.accumulated else None
    if local is not None and local.nonfinite:
        w.failures.append(f"site {w.name}: {local.nonfinite} non-finite value(s) in the rewritten site's output "
                          "where the original conv's is finite")
    elif local is not None and local.exceeds(rtol, atol):
        w.failures.append(f"site {w.name}: local relative L2 error {_g(local.rel_l2)} > rtol {rtol:g} (max abs "
                          f"{_g(local.max_abs)} > atol {atol:g}; rewritten by {', '.join(_passes_of(w))})")
    if w.failures:
        status, reason = "failed", "; ".join(f.removeprefix(f"site {w.name}: ") for f in w.failures)
    elif local is None:
        status = "unchecked"
        reason = w.unchecked or ("numerics skipped" if blocker else "no numeric comparison")
    else:
        status, reason = "ok", ""
    orig_names = [w.original.name] if w.original is not None else []
    return SiteCheck(
        site=w.name, passes=_passes_of(w), nodes=tuple(n.name for n in w.nodes),
        original_node=w.original.name if w.original is not None else None,
        input_before=_node_val(first_input(w.original)) if w.original is not None else None,
        input_after=_node_val(first_input(w.nodes[0])),
        output_before=_node_val(w.original), output_after=_node_val(w.nodes[-1]),
        shapes_ok=w.shapes_ok, local=local, accumulated=accumulated,
        cost_before=_group_cost(ref.cost, orig_names) if orig_names else None,
        cost_after=_group_cost(new.cost, [n.name for n in w.nodes]) if new is not None else None,
        status=status, reason=reason)


def _gate_output(o: OutputCheck, sites: Sequence[SiteCheck], rtol: float, atol: float,
                 failures: list[str]) -> OutputCheck:
    e = o.error
    if e is None or not o.shapes_ok:
        return o
    if e.nonfinite:
        culprit = next((s.site for s in sites if s.accumulated is not None and s.accumulated.nonfinite), None)
        reason = (f"{e.nonfinite} non-finite value(s) where the original is finite; first non-finite at "
                  f"{_site_label(culprit)}")
    elif e.exceeds(rtol, atol):
        over = [s for s in sites if s.accumulated is not None and s.accumulated.exceeds(rtol, atol)]
        worst = max((s for s in sites if s.accumulated is not None), key=lambda s: s.accumulated.rel_l2,  # type: ignore[union-attr]
                    default=None)
        culprit = over[0].site if over else (worst.site if worst is not None else None)
        reason = (f"relative L2 error {_g(e.rel_l2)} > rtol {rtol:g} (max abs {_g(e.max_abs)} > atol {atol:g}); "
                  f"the error first exceeds the tolerance at {_site_label(culprit)}")
    else:
        return o
    failures.append(f"{o.name}: {reason}")
    return OutputCheck(o.name, o.before, o.after, o.shapes_ok, e, "failed", reason)
