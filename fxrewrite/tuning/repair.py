"""Data-aware repair: refit each rewritten site's last convolution on calibration data, and fix BatchNorm statistics.

The repair is one sweep in graph order over two kinds of step, each seeing everything upstream of it already
repaired (the rewritten model is run up to the step, the original model up to the same point):

**Refit** (each rewritten site): the *last* convolution of the site (the 1x1 conv of a (grouped-)separable or
bottleneck form, or the grouped kxk conv of the grouped form) is refit by least squares so that the site's output
matches the **original** model's output at that site, with that conv's inputs taken from the **rewritten** model (so
each fit also corrects the drift accumulated upstream); the sums run over the fit half of the data (below). Per
group j of the conv, with X_j the im2col columns of its input (plus a row of ones when the conv has a bias) and Y_j
the original site output::

    G_j = sum over batches of X_j X_j^T        C_j = sum over batches of Y_j X_j^T
    W_j = (C_j + lam W0_j) (G_j + lam I)^-1,   lam = ridge * trace(G_j) / dim(G_j)

with a ridge pulling towards the data-free weights ``W0`` (so an exact rewrite stays exact, and directions the data
never excites keep their data-free values); ``ridge`` defaults to 1e-4.

**BatchNorm** (each BatchNorm downstream of a refit site; those upstream of every rewrite see the original inputs
and are left alone; BatchNorms inside leaf modules are not reached):

- ``bn="match"`` (default): the running mean and variance absorb the per-channel map a r + b (a > 0) that gives the
  BatchNorm's input r in the rewritten model the mean and variance of its input o in the original on the calibration
  data, so its output has the original's per-channel mean and variance. This is re-estimation aimed at the
  original: where the original's running statistics equal the calibration data's, the two coincide; where they
  differ (stale statistics, other data) the original's behaviour is kept. Identical inputs give a = 1, b = 0, so an
  exact rewrite stays exact.
- ``bn="reestimate"``: the running statistics are recomputed from scratch: the cumulative average over batches of
  the input's batch mean and unbiased variance (``momentum=None``, that layer in train mode during its pass; momentum
  and train flag restored after). This forgets the trained statistics (it changes even an exact rewrite where they
  differ from the calibration data's); it suits stale statistics or calibration data from the deployment
  distribution.
- ``bn=None``: statistics untouched.

**Held-out check** (why: with a handful of calibration images, a refit conv with hundreds of unknowns per output
sees a few dozen columns and fits noise, and per-channel BatchNorm moments rest on a few images; without a check,
repair lowered every calibration-set figure yet raised the error on new images on 11 of 20 torchvision families at 4
random images). Each batch is split by sample: the even samples are the *fit half*, the odd ones the *check half*.
Every fit (refit weights, BatchNorm maps) uses the fit half only, so the check half stays held out all the way down
the graph (upstream fits never saw it), and each fit is kept only where it helps there:

- a refit is accepted when its conv's residual on the check half with the fit-half weights is at most that with
  the data-free weights; otherwise the site is reported ``kept`` (data-free weights) with the residuals, the columns
  and the unknowns per output. With no check half (every batch holds one sample) no refit is accepted.
- ``bn="match"`` changes a channel only when a r + b (fit on the fit half) is closer to o than r on the check half
  (sum of squares) and the folded variance (var + eps) / a^2 - eps stays positive (a variance clamped to 0 would
  change the gain to 1 / sqrt(eps)); ``RepairResult.bn_matched`` counts the channels changed per layer.
- last, the whole model: if the repaired model's output error on the check half is above the data-free one's,
  every change is undone (all sites ``kept``, a note says so). ``bn="reestimate"`` departs from the original by
  design, so this last check is not applied to it.

A held-out split was chosen over a fixed rule (a minimum ratio of columns to unknowns, a bound on BatchNorm scales)
because the cause is not the count alone: deep features of similar inputs are nearly collinear, so 8 columns can
determine a 512-unknown fit well on one model (resnet18's last stage) while 2304 columns for 3 unknowns fail the
check on another (mnasnet0_5's stem); the split measures it. It is deterministic (by sample position), needs
only a second set of sums (memory unchanged in kind), and splits each batch the same way on every process, so the
torch.distributed result equals the single-process one. The price is that fits see half the data: pass twice the
images you would otherwise.

**Bounded memory and distribution.** Between batches only sums are kept (Gram matrices, per-channel moments, error
sums; no activation is stored), within ``memory_cap`` (default 1 GiB): a conv whose refit needs more than the cap
with dense Grams (4 x ``G x D x D`` float64: fit and check Grams, the solver's copy and factorisation) keeps a
``fxrewrite.maths.column_sketch.ColumnSketch`` of its columns and targets instead (``SketchedEquations``) and is
solved by the push-through identity on ``width x width`` systems: exactly the dense solution while the fit half has
at most ``width`` columns ("columns"), else a ridge solve on an unbiased count sketch ("sketch"), whose residuals
(fit and held-out check) are then measured on the data in one more pass, so the held-out check stays exact. The
result's notes name each such site and its method. With ``torch.distributed`` initialised every sum (and count) is
all-reduced before it is used, so calibration can be split over processes or machines and gives the single-process
result::

    # torchrun --nproc-per-node 4 calibrate.py   (each process: its own shard of the data)
    torch.distributed.init_process_group("gloo")   # or "nccl" with the model on the process's GPU
    result = fxrewrite.repair(model, rewritten, my_shard_of_batches)

The result reports, per site, the status, the relative L2 error of the site output against the original model on
the calibration data, before (the data-free rewrite) and after (the repaired model, BatchNorm statistics included),
and the held-out check.

>>> import torch, fxrewrite
>>> from fxrewrite.tuning.repair import repair
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3)).eval()
>>> rewritten = fxrewrite.rewrite(model, (torch.randn(1, 3, 12, 12),), passes="depthwise-separable{rank=1}",
...                             verify=False).module
>>> data = [(torch.randn(8, 3, 12, 12),) for _ in range(4)]
>>> result = repair(model, rewritten, data, progress=False)
>>> [(s.site, s.status, s.reason.split(":")[0]) for s in result.sites]
[('0', 'kept', 'refit kept out'), ('2', 'repaired', '')]
>>> result.output_error_after < result.output_error_before
True
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import ConfigError, FxRewriteError
from fxrewrite.graph.capture import LeafSpec, as_graph_module
from fxrewrite.graph.recorder import node_values
from fxrewrite.graph.rewriter import set_conv_weight
from fxrewrite.graph.site_nodes import original_nodes, site_groups
from fxrewrite.maths.column_sketch import DEFAULT_MEMORY_CAP, sketch_width
from fxrewrite.maths.im2col import im2col
from fxrewrite.maths.lstsq import NormalEquations, SketchedEquations, grouped_targets, relative_residual
from fxrewrite.tuning.bn_match import batchnorm_at, match, reestimate
from fxrewrite.tuning.calibration_data import halves, output_leaves
from fxrewrite.tuning.lockstep import Lockstep, lockstep_bytes, lockstep_ok, step_pairs
from fxrewrite.tuning.progress import Progress
from fxrewrite.tuning.records import RepairResult, SiteRepair
from fxrewrite.util.distributed import all_reduce, world_size
from fxrewrite.util.inputs import InputFn, batch_size_of, calibration_inputs, check_reiterable, to_device
from fxrewrite.util.runtime import device_of, eval_mode

DEFAULT_RIDGE = 1e-4
BN_MODES = ("match", "reestimate", None)
OUTPUT = "<output>"
CHECK_OUTPUT = "<output, check half>"
_CHUNK_ELEMENTS = 1 << 24  # float64 im2col elements per chunk (128 MiB): bounds the transient memory of a batch


class RepairError(FxRewriteError):
    """Repair could not run (bad calibration data, a site that cannot be refit, mismatched models)."""


def load_calibration(path: str, batch_size: int = 32, dtype: torch.dtype | None = None) -> list[tuple[Any, ...]]:
    """Calibration batches from a tensor file (``torch.save`` of a tensor of inputs stacked on dim 0, or a tuple /
    list of such tensors, one per positional input); loaded with ``weights_only=True``.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "calib.pt"); torch.save(torch.zeros(10, 3, 4, 4), path)
    >>> [tuple(b[0].shape) for b in load_calibration(path, batch_size=4)]
    [(4, 3, 4, 4), (4, 3, 4, 4), (2, 3, 4, 4)]
    """
    if batch_size < 1:
        raise ConfigError(f"calibration batch size must be >= 1, got {batch_size}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"calibration file {path!r} not found") from exc
    except Exception as exc:
        raise ConfigError(f"calibration file {path!r} could not be loaded as a tensor file ({exc}); save it with "
                          "torch.save(inputs) where inputs is a tensor (N, ...) or a tuple of such tensors") from exc
    tensors = [obj] if isinstance(obj, torch.Tensor) else list(obj) if isinstance(obj, tuple | list) else None
    if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
        raise ConfigError(f"calibration file {path!r} must hold a tensor (N, ...) or a tuple/list of such tensors, "
                          f"got {type(obj).__name__}")
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors) or n == 0:
        raise ConfigError(f"calibration file {path!r}: every tensor needs the same non-zero size on dim 0, got "
                          f"{[tuple(t.shape) for t in tensors]}")
    if dtype is not None:
        tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    return [tuple(t[i:i + batch_size] for t in tensors) for i in range(0, n, batch_size)]


def _refit_dim(conv: nn.Conv2d) -> int:
    return conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1] + (conv.bias is not None)


def _columns(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, chunk: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(cols, targets)`` of a batch in chunks of about ``chunk`` float64 elements: the im2col columns of the conv
    input ``x`` (plus a row of ones for a bias) and the original output ``y`` (``grouped_targets``)."""
    n = x.shape[0]
    per_sample = max(1, _refit_dim(conv) * max(1, y[0, 0].numel()))
    step = max(1, chunk // per_sample)
    for i in range(0, n, step):
        cols = im2col(conv, x[i:i + step].detach()).to(torch.float64)
        tgt = grouped_targets(y[i:i + step].detach().to(torch.float64), conv.groups)
        if cols.shape[-1] != tgt.shape[-1]:
            raise RepairError(f"conv input gives {cols.shape[-1]} output columns but the original site output has "
                              f"{tgt.shape[-1]}: the rewritten site does not produce the original's shape")
        if conv.bias is not None:
            cols = torch.cat([cols, cols.new_ones(cols.shape[0], 1, cols.shape[2])], dim=1)
        yield cols, tgt


class _ConvWeights:
    """A conv's weights in the (groups, O/groups, D) layout of the refit (bias as the last column)."""

    conv: nn.Conv2d
    chunk: int

    def add_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the conv input ``x`` and the original output ``y`` of a batch, in chunks of bounded memory."""
        for cols, tgt in _columns(self.conv, x, y, self.chunk):
            self.add(cols, tgt)  # type: ignore[attr-defined]

    def weights(self) -> torch.Tensor:
        """The conv's current weights as (groups, O/groups, D) (bias as the last column)."""
        conv = self.conv
        g = conv.groups
        w = conv.weight.detach().to(torch.float64).reshape(g, conv.out_channels // g, -1)
        if conv.bias is not None:
            w = torch.cat([w, conv.bias.detach().to(torch.float64).reshape(g, -1, 1)], dim=2)
        return w

    def assign(self, w: torch.Tensor, module: torch.fx.GraphModule, qualname: str) -> None:
        conv = self.conv
        if conv.bias is not None:
            w, b = w[..., :-1], w[..., -1]
            with torch.no_grad():
                conv.bias.copy_(b.reshape(-1).to(conv.bias.dtype))
        set_conv_weight(module, qualname, w.reshape(conv.weight.shape))


class _ConvEquations(_ConvWeights, NormalEquations):
    """The normal equations of one conv's refit: im2col columns of its input (plus a row of ones for a bias) against
    the original site output (``method`` "gram")."""

    method = "gram"
    exact = True

    def __init__(self, conv: nn.Conv2d, device: torch.device | None, cap: int = DEFAULT_MEMORY_CAP) -> None:
        g, o = conv.groups, conv.out_channels
        NormalEquations.__init__(self, g, o // g, _refit_dim(conv), device)
        self.conv, self.chunk = conv, min(_CHUNK_ELEMENTS, max(1, cap // 64))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.gram, self.cross, self.stats


class _ConvSketch(_ConvWeights, SketchedEquations):
    """The refit's columns as a bounded sketch (``SketchedEquations``; ``method`` "columns" when exact, else
    "sketch"), for a conv whose Gram does not fit the memory cap."""

    def __init__(self, conv: nn.Conv2d, device: torch.device | None, cap: int) -> None:
        g, o = conv.groups, conv.out_channels
        d = _refit_dim(conv)
        SketchedEquations.__init__(self, g, o // g, d, sketch_width(cap, g, d, rows=o // g, copies=2), device)
        self.conv, self.chunk, self.cap = conv, min(_CHUNK_ELEMENTS, max(1, cap // 160)), cap

    @property
    def method(self) -> str:
        return self.sketch.method


def _equations(conv: nn.Conv2d, device: torch.device | None, cap: int) -> _ConvEquations | _ConvSketch:
    """The dense normal equations when the fit's and the check's Grams, the solver's copy and its factorisation
    (4x the Gram) fit ``cap`` bytes; else a sketch."""
    return _ConvEquations(conv, device, cap) if _dense(conv, cap) else _ConvSketch(conv, device, cap)


def _dense(conv: nn.Conv2d, cap: int) -> bool:
    return 4 * 8 * conv.groups * _refit_dim(conv) ** 2 <= cap


@dataclass
class _Site:
    name: str
    output: torch.fx.Node  # the rewritten site's output node
    original: torch.fx.Node | None  # the original graph's node for the site
    conv: str | None = None  # qualified name of the conv to refit (the site's last node)
    reason: str = ""


def _sites(original: torch.fx.GraphModule, model: torch.fx.GraphModule) -> list[_Site]:
    originals = original_nodes(original)
    out = []
    for name, nodes in site_groups(model).items():
        last = nodes[-1]
        site = _Site(name, last, originals.get(name))
        if site.original is None:
            site.reason = "the original model has no node for this site"
        elif last.op != "call_module" or type(model.get_submodule(str(last.target))) is not nn.Conv2d:
            site.reason = f"the site's output node {last.name} is not an nn.Conv2d call"
        elif not last.args or not isinstance(last.args[0], torch.fx.Node):
            site.reason = f"the site's output node {last.name} has no tensor input"
        else:
            site.conv = str(last.target)
        out.append(site)
    return out


def _downstream(model: torch.fx.GraphModule, roots: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        for user in n.users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


class _Errors:
    """Per-key sums err2, ref2 over batches (float64), all-reduced before reading."""

    def __init__(self, keys: Sequence[str], device: torch.device | None) -> None:
        self.index = {k: i for i, k in enumerate(keys)}
        self.sums = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)

    def add(self, key: str, candidate: Any, reference: Any, check_half: bool = False) -> None:
        """Add the errors of ``candidate`` against ``reference`` (of every sample, or with ``check_half`` of the
        check half: the odd samples of each leaf with a batch dimension)."""
        for a, b in zip(output_leaves(candidate), output_leaves(reference), strict=True):
            if check_half and a.dim() == 0:
                continue
            a, b = (halves(a)[1], halves(b)[1]) if check_half else (a, b)
            a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
            self.sums[self.index[key], 0] += (a64 - b64).square().sum().to(self.sums.device)
            self.sums[self.index[key], 1] += b64.square().sum().to(self.sums.device)

    def result(self) -> dict[str, float]:
        all_reduce(self.sums)
        out = {}
        for k, i in self.index.items():
            err2, ref2 = float(self.sums[i, 0]), float(self.sums[i, 1])
            out[k] = 0.0 if err2 == 0 else math.sqrt(err2 / ref2) if ref2 > 0 else math.inf
        return out


def _measure(original: torch.fx.GraphModule, model: torch.fx.GraphModule, batches: Callable[[], Iterable[Any]],
             sites: Sequence[_Site], progress: Progress, label: str) -> dict[str, float]:
    """End-to-end relative L2 error of every site output and of the model output, and of the model output on the
    check half (one run of each model per batch, in lockstep, so at most a site's two values are held at once)."""
    errors = _Errors([*(s.name for s in sites), OUTPUT, CHECK_OUTPUT], device_of(model))
    orig_watch = {s.original: s.name for s in sites if s.original is not None}
    orig_out = next(n for n in reversed(original.graph.nodes) if n.op == "output")
    model_out = next(n for n in reversed(model.graph.nodes) if n.op == "output")
    model_watch = {s.output: s.name for s in sites}
    for inputs in batches():
        pending: dict[str, Any] = {}
        ref = node_values(original, inputs, [*orig_watch, orig_out])
        for node, value in node_values(model, inputs, [*model_watch, model_out]):
            key = OUTPUT if node is model_out else model_watch[node]
            if key != OUTPUT and key not in orig_watch.values():
                continue
            while key not in pending:
                onode, ovalue = next(ref)
                pending[OUTPUT if onode is orig_out else orig_watch[onode]] = ovalue
            reference = pending.pop(key)
            errors.add(key, value, reference)
            if key == OUTPUT:
                errors.add(CHECK_OUTPUT, value, reference, check_half=True)
        progress.update(label)
    return errors.result()


@dataclass(frozen=True)
class _Fit:
    """What one refit decided (see ``SiteRepair``)."""

    accepted: bool
    reason: str
    fit_before: float
    fit_after: float
    columns: int
    check_before: float
    check_after: float
    method: str = ""  # how it was solved when not from the dense Gram (_method_note)


def _site_values(original: torch.fx.GraphModule, model: torch.fx.GraphModule, batches: Callable[[], Iterable[Any]],
                 site: _Site, conv: nn.Conv2d, progress: Progress, label: str, runs: Lockstep | None = None
                 ) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """Per batch, the conv input and the original site output, each split into (fit half, check half) (from the
    paused ``runs`` when given, else by running both models up to them)."""
    assert site.original is not None
    x_node, y_node = site.output.args[0], site.original
    assert isinstance(x_node, torch.fx.Node)
    pairs = runs.pairs(x_node, y_node) if runs is not None else step_pairs(original, model, batches, x_node, y_node)
    for x, y in pairs:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or y.dim() != 4:
            raise RepairError(f"site {site.name!r}: expected 4-D tensors at the conv input and the original site "
                              "output")
        yield halves(x.to(conv.weight.device)), halves(y.to(conv.weight.device))
        progress.update(label)


def _measured_residuals(original: torch.fx.GraphModule, model: torch.fx.GraphModule,
                        batches: Callable[[], Iterable[Any]], site: _Site, conv: nn.Conv2d, weights: Sequence[Any],
                        chunk: int, progress: Progress) -> torch.Tensor:
    """``out[h, j] = (||W_j X - Y||^2, ||Y||^2)`` on half ``h`` (0 fit, 1 check) measured on the data, for a
    sketched refit whose residuals the sketch only estimates (one more pass over the data)."""
    out = torch.zeros(2, len(weights), 2, dtype=torch.float64, device=conv.weight.device)
    for (x_fit, x_check), (y_fit, y_check) in _site_values(original, model, batches, site, conv, progress,
                                                            f"refit {site.name} (residuals)"):
        for h, (x, y) in enumerate(((x_fit, y_fit), (x_check, y_check))):
            if not x.shape[0]:
                continue
            for cols, tgt in _columns(conv, x, y, chunk):
                for j, w in enumerate(weights):
                    out[h, j, 0] += (w @ cols - tgt).square().sum()
                    out[h, j, 1] += tgt.square().sum()
    all_reduce(out)
    return out


def _refit(original: torch.fx.GraphModule, model: torch.fx.GraphModule, batches: Callable[[], Iterable[Any]],
           site: _Site, ridge: float, progress: Progress, cap: int = DEFAULT_MEMORY_CAP,
           runs: Lockstep | None = None) -> _Fit:
    """Refit the site's conv if the refit passes the held-out check (module docstring); else keep its weights."""
    assert site.conv is not None and site.original is not None
    conv = model.get_submodule(site.conv)
    assert isinstance(conv, nn.Conv2d)
    fit, check = _equations(conv, conv.weight.device, cap), _equations(conv, conv.weight.device, cap)
    for (x_fit, x_check), (y_fit, y_check) in _site_values(original, model, batches, site, conv, progress,
                                                            f"refit {site.name}", runs):
        fit.add_batch(x_fit, y_fit)
        if x_check.shape[0]:
            check.add_batch(x_check, y_check)
    all_reduce(*fit.tensors(), *check.tensors())
    columns = int(fit.stats[1] + check.stats[1])
    if columns == 0:
        raise RepairError(f"site {site.name!r}: the calibration data gave no output columns")
    w0 = fit.weights()
    unknowns = w0.shape[-1]
    method = _method_note(fit, check)

    def full(w: torch.Tensor) -> float:  # the residual on both halves, from the sums
        (e1, y1), (e2, y2) = fit.residual_sums(w), check.residual_sums(w)
        return relative_residual(e1 + e2, y1 + y2)

    if float(check.stats[1]) == 0:
        before = full(w0) if fit.exact and check.exact else math.nan
        return _Fit(False, "no held-out samples to check the refit on (every calibration batch has one sample); "
                    "use batches of 2 or more", before, before, columns, math.nan, math.nan, method)
    trial = fit.solve(ridge, w0)
    if not torch.isfinite(trial).all():
        raise RepairError(f"site {site.name!r}: the least-squares solve gave non-finite weights; raise ridge "
                          f"(now {ridge:g}) or check the calibration data for inf/nan")
    if fit.exact and check.exact:
        check_before, check_after = check.residual(w0), check.residual(trial)
        before, after = full(w0), full(trial)
    else:  # a sketch only estimates residuals: measure them (one more pass)
        sums = _measured_residuals(original, model, batches, site, conv, [w0, trial], fit.chunk, progress)
        check_before, check_after = (relative_residual(*map(float, sums[1, j])) for j in range(2))
        before, after = (relative_residual(*map(float, sums[:, j].sum(dim=0))) for j in range(2))
    if not check_after <= check_before:
        return _Fit(False, f"refit kept out: held-out residual {check_before:.3g} -> {check_after:.3g} (fit on "
                    f"{int(fit.stats[1]):,} columns for {unknowns} unknowns per output); give more calibration "
                    "images", before, before, columns, check_before, check_after, method)
    fit.assign(trial, model, site.conv)
    return _Fit(True, "", before, after, columns, check_before, check_after, method)


def _method_note(fit: _ConvEquations | _ConvSketch, check: _ConvEquations | _ConvSketch) -> str:
    """How a refit was solved, when not from the dense Gram (for RepairResult.notes)."""
    if isinstance(fit, _ConvEquations) or isinstance(check, _ConvEquations):
        return ""
    d, g = fit.dim, fit.conv.groups
    why = (f"the {g} x {d:,} x {d:,} float64 Gram ({g * d * d * 8 / 2**30:.2f} GiB, 4x that to solve) is over "
           f"the {fit.cap / 2**20:g} MiB memory cap")
    if fit.exact and check.exact:
        return (f"columns: {why}; refit exactly on the {fit.sketch.count:,} fit columns themselves (push-through "
                "solve, no d x d matrix)")
    return (f"sketch: {why}; refit on a count sketch of {fit.sketch.width:,} columns of the "
            f"{int(fit.stats[1]):,} fit columns (ridge solve on the sketch), residuals measured on the data")


def _plan(original: torch.fx.GraphModule, model: torch.fx.GraphModule, sites: Sequence[_Site], bn: str | None
          ) -> list[tuple[str, Any]]:
    """The steps of the repair in graph order: ("refit", site) at each refit site's output node, ("bn", (node, ref))
    at each BatchNorm downstream of a refit site (for "match", only those the original calls under the same name)."""
    refit = {s.output: s for s in sites if s.conv is not None}
    downstream = _downstream(model, refit) if bn else set()
    orig_calls = {str(n.target): n for n in original.graph.nodes if n.op == "call_module"}
    steps: list[tuple[str, Any]] = []
    for node in model.graph.nodes:
        if node in refit:
            steps.append(("refit", refit[node]))
        elif node in downstream and batchnorm_at(model, node) is not None:
            ref = orig_calls.get(str(node.target))
            matchable = ref is not None and bool(ref.args) and isinstance(ref.args[0], torch.fx.Node)
            if bn == "reestimate" or matchable:
                steps.append(("bn", (node, ref)))
    return steps


def _lockstep(original: torch.fx.GraphModule, model: torch.fx.GraphModule, steps: Sequence[tuple[str, Any]],
              batches: Callable[[], Iterable[Any]], bn: Any, samples: int, cap: int, data: Any) -> Lockstep | None:
    """Paused runs of both models (``fxrewrite.tuning.lockstep``: each runs once over the data, not once per step)
    when the data is a list or tuple (held in memory already; other iterables are streamed, step by step), every
    refit uses the dense Gram, no changed module is called twice, BatchNorms are matched (not re-estimated) and the
    runs' live values fit half the memory cap; else None (step by step)."""
    bound = lockstep_bytes(model, samples)
    if (not isinstance(data, list | tuple) or bn == "reestimate" or not steps or bound is None or bound > cap // 2
            or not lockstep_ok(model, [s.conv if kind == "refit" else str(s[0].target) for kind, s in steps])
            or not all(_dense(model.get_submodule(s.conv), cap) for kind, s in steps if kind == "refit")):
        return None
    return Lockstep(original, model, list(batches()), [(s.output.args[0], s.original) if kind == "refit" else
                                                       (s[0].args[0], s[1].args[0]) for kind, s in steps])


def repair(original: nn.Module, rewritten: torch.fx.GraphModule, data: Iterable[Any], *,
           ridge: float = DEFAULT_RIDGE, bn: bool | str | None = "match", progress: bool = True,
           input_fn: InputFn | None = None, copy_module: bool = True, concrete_args: Mapping[str, Any] | None = None,
           leaf_modules: Iterable[LeafSpec] = (), autowrap_functions: Iterable[Callable[..., Any]] = (),
           memory_cap: int = DEFAULT_MEMORY_CAP) -> RepairResult:
    """Refit the rewritten sites of ``rewritten`` (the output of ``fxrewrite.rewrite``) on calibration ``data`` so
    each site's output matches ``original``'s, then adjust the downstream BatchNorm statistics.

    ``data`` is a re-iterable of input tuples (a list, or a DataLoader; ``input_fn`` maps each item to the model's
    positional inputs, e.g. ``lambda b: (b[0],)`` for (input, label) pairs). It is read twice to measure and once
    per refit site and per BatchNorm matched (``"reestimate"``: once), or, a list within the memory cap, once for all
    of them (``fxrewrite.tuning.lockstep``). ``ridge`` is relative to each Gram's mean diagonal and pulls towards the
    data-free weights. ``bn``: ``"match"`` (default, True), ``"reestimate"`` or None (False): see the module
    docstring. Neither input module is changed (``copy_module=False`` repairs ``rewritten`` in place); both run in eval.
    Capture options are those used to trace ``original``. Under torch.distributed every process must call this with
    its own non-empty share of the data; sums are all-reduced over the default process group.

    ``memory_cap`` (bytes, default 1 GiB; ``rewrite(..., calibration_options={"memory_cap": ...})``) bounds what a
    refit keeps: a conv whose Gram needs more (4x the ``G x D x D`` float64 Gram: fit, check, solve) is refit
    without it (module docstring, "Bounded memory"), and ``RepairResult.notes`` says which sites and how.
    """
    start = time.perf_counter()
    bn = {True: "match", False: None}.get(bn, bn) if isinstance(bn, bool) else bn
    if bn not in BN_MODES:
        raise ConfigError(f"repair: bn must be one of {BN_MODES} (or True for 'match', False for None), got {bn!r}")
    if not isinstance(rewritten, torch.fx.GraphModule):
        raise ConfigError(f"repair needs the rewritten GraphModule (RewriteResult.module), got "
                          f"{type(rewritten).__name__}")
    if isinstance(memory_cap, bool) or not isinstance(memory_cap, int) or memory_cap < 1 << 20:
        raise ConfigError(f"memory_cap must be a number of bytes >= 1 MiB (1 << 20), got {memory_cap!r}")
    if not (isinstance(ridge, int | float) and ridge > 0 and math.isfinite(ridge)):
        raise ConfigError(f"ridge must be a positive number (relative to the Gram diagonal), got {ridge!r}")
    check_reiterable(data)
    model = copy.deepcopy(rewritten) if copy_module else rewritten
    reference = as_graph_module(original, concrete_args=concrete_args, leaf_modules=leaf_modules,
                                autowrap_functions=autowrap_functions)
    sites = _sites(reference, model)
    if not sites:
        raise ConfigError("repair: the rewritten model has no rewritten sites (no node carries fxrewrite provenance); "
                          "pass the module returned by fxrewrite.rewrite")
    device = device_of(model)
    counts = {"batches": 0, "samples": 0}

    def batches() -> Iterator[tuple[Any, ...]]:
        n = s = 0
        for item in data:
            inputs = to_device(calibration_inputs(item, input_fn), device)
            n, s = n + 1, s + batch_size_of(inputs)
            yield inputs
        if n == 0:
            raise ConfigError("repair: the calibration data is empty")
        counts["batches"], counts["samples"] = n, s

    steps = _plan(reference, model, sites, bn)
    saved = {name: {k: v.detach().clone() for k, v in model.get_submodule(name).state_dict().items()}
             for name in (step.conv if kind == "refit" else str(step[0].target) for kind, step in steps)}
    length = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    bar = Progress(progress, None if length is None else length * (len(steps) + 2), "repair")
    fits: dict[str, _Fit] = {}
    bn_layers: list[str] = []
    bn_matched: list[tuple[str, int, int]] = []
    with eval_mode(reference, model), torch.no_grad():
        try:
            before = _measure(reference, model, batches, sites, bar, "measure (before)")
            runs = _lockstep(reference, model, steps, batches, bn, counts["samples"], memory_cap, data)
            for kind, step in steps:  # graph order: each step sees everything upstream of it already repaired
                if kind == "refit":
                    fits[step.name] = _refit(reference, model, batches, step, float(ridge), bar, memory_cap, runs)
                elif bn == "match":
                    pairs = None if runs is None else runs.pairs(step[0].args[0], step[1].args[0])
                    kept = match(reference, model, step[0], step[1], batches, bar, pairs)
                    bn_layers.append(str(step[0].target))
                    bn_matched.append((str(step[0].target), kept, model.get_submodule(str(step[0].target))
                                       .num_features))
                else:
                    reestimate(model, step[0], batches, bar)
                    bn_layers.append(str(step[0].target))
            after = _measure(reference, model, batches, sites, bar, "measure (after)")
        finally:
            bar.close()
    reverted = ""
    if bn != "reestimate" and after[CHECK_OUTPUT] > before[CHECK_OUTPUT]:  # the last check: the whole model
        reverted = (f"reverted: the repaired model's output error on the check half rose {before[CHECK_OUTPUT]:.3g} "
                    f"-> {after[CHECK_OUTPUT]:.3g}; give more calibration images")
        for name, state in saved.items():
            model.get_submodule(name).load_state_dict(state)
        after, bn_matched = before, [(name, 0, count) for name, _, count in bn_matched]
    methods = [f"site {name!r} refit by {fit.method}" for name, fit in fits.items() if fit.method]
    samples = torch.tensor([counts["batches"], counts["samples"]], dtype=torch.float64, device=device)
    all_reduce(samples)
    records = []
    for s in sites:
        fit = fits.get(s.name)
        if fit is None:
            records.append(SiteRepair(s.name, s.conv, "skipped", s.reason, before[s.name], after[s.name]))
        else:
            kept = not fit.accepted or bool(reverted)
            records.append(SiteRepair(s.name, s.conv, "kept" if kept else "repaired", fit.reason or reverted,
                                      before[s.name], after[s.name], fit.fit_before,
                                      fit.fit_before if reverted else fit.fit_after, fit.columns, fit.check_before,
                                      fit.check_after))
    return RepairResult(model, tuple(records), before[OUTPUT], after[OUTPUT], int(samples[0]), int(samples[1]),
                        float(ridge), bn, () if reverted else tuple(bn_layers), tuple(bn_matched), world_size(),
                        time.perf_counter() - start, tuple(methods) + ((reverted,) if reverted else ()))
