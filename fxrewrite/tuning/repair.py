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
sums; no activation is stored); with ``torch.distributed`` initialised every sum (and count) is all-reduced before
it is used, so calibration can be split over processes or machines and gives the single-process result::

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
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from fxrewrite.errors import ConfigError, FxRewriteError
from fxrewrite.graph.capture import LeafSpec, as_graph_module
from fxrewrite.graph.recorder import node_values
from fxrewrite.graph.rewriter import set_conv_weight
from fxrewrite.graph.site_nodes import original_nodes, site_groups
from fxrewrite.maths.im2col import im2col
from fxrewrite.util.distributed import all_reduce, is_distributed, world_size
from fxrewrite.util.formatting import json_float
from fxrewrite.util.inputs import InputFn, batch_size_of, calibration_inputs, check_reiterable, to_device
from fxrewrite.util.runtime import device_of, eval_mode

DEFAULT_RIDGE = 1e-4
BN_MODES = ("match", "reestimate", None)
OUTPUT = "<output>"
CHECK_OUTPUT = "<output, check half>"
_CHUNK_ELEMENTS = 1 << 24  # float64 im2col elements per chunk (128 MiB): bounds the transient memory of a batch

class RepairError(FxRewriteError):
    """Repair could not run (bad calibration data, a site that cannot be refit, mismatched models)."""


# ---------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SiteRepair:
    """One rewritten site: which conv was refit and the site output's relative L2 error against the original.

    ``error_before``/``error_after`` are end to end (the data-free rewrite / the final repaired model, each run on its
    own from the model inputs); ``fit_before``/``fit_after`` are the least-squares residual of that one conv with the
    old / new weights on the inputs it saw during the refit (upstream already repaired, before BatchNorm
    re-estimation). ``columns`` is the number of output pixels the fit used (batch x height x width, all processes).
    ``check_before``/``check_after`` are the held-out check: that conv's residual on the check half of the data
    with the data-free weights / the weights fit on the fit half alone (module docstring).

    ``status``: "repaired" (refit), "kept" (the refit failed the held-out check, or there was no check half: the
    data-free weights are kept, ``reason`` says why) or "skipped" (the site has no conv to refit).
    """

    site: str
    conv: str | None
    status: str  # "repaired", "kept" or "skipped"
    reason: str = ""
    error_before: float = math.nan
    error_after: float = math.nan
    fit_before: float = math.nan
    fit_after: float = math.nan
    columns: int = 0
    check_before: float = math.nan
    check_after: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {k: json_float(v) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class RepairResult:
    """The repaired module (a new GraphModule; the inputs are untouched) and what the repair did."""

    module: torch.fx.GraphModule
    sites: tuple[SiteRepair, ...]
    output_error_before: float
    output_error_after: float
    batches: int
    samples: int
    ridge: float
    bn: str | None = "match"
    bn_layers: tuple[str, ...] = ()
    bn_matched: tuple[tuple[str, int, int], ...] = ()  # bn="match": (layer, channels changed, channels)
    world_size: int = 1
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def site(self, name: str) -> SiteRepair:
        for s in self.sites:
            if s.site == name:
                return s
        raise KeyError(f"no site {name!r}; sites: {[s.site for s in self.sites]}")

    def rows(self) -> list[list[str]]:
        rows = [[s.site, s.conv or "-", s.status if not s.reason else f"{s.status}: {s.reason}",
                 _fmt(s.error_before), _fmt(s.error_after), f"{_fmt(s.check_before)} -> {_fmt(s.check_after)}",
                 f"{s.columns:,}"] for s in self.sites]
        rows.append(["(model output)", "", "", _fmt(self.output_error_before), _fmt(self.output_error_after), "",
                     ""])
        return rows

    def table(self, tablefmt: str = "simple") -> str:
        head = ["site", "refit conv", "status", "rel. L2 before", "rel. L2 after", "held-out check", "columns"]
        return tabulate(self.rows(), headers=head, tablefmt=tablefmt, disable_numparse=True)

    def __str__(self) -> str:
        bn = f"BatchNorm {self.bn}: {len(self.bn_layers)} layer(s)" if self.bn_layers else "no BatchNorm changed"
        if self.bn_matched:
            bn += (f", {sum(k for _, k, _ in self.bn_matched):,} of {sum(c for _, _, c in self.bn_matched):,} "
                   "channels passed the held-out check")
        lines = [f"repair: {self.batches} calibration batch(es), {self.samples} sample(s), world size "
                 f"{self.world_size}, ridge {self.ridge:g} x mean Gram diagonal (towards the data-free weights), "
                 f"{bn}, {self.seconds:.2f} s",
                 "rel. L2 = ||rewritten - original|| / ||original|| of each site's output on the calibration data; "
                 "held-out check = the refit conv's residual on the odd samples of each batch, data-free weights "
                 "-> weights fit on the even samples",
                 self.table(), *self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        return self.table("github")

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [s.to_dict() for s in self.sites],
                "output_error_before": json_float(self.output_error_before),
                "output_error_after": json_float(self.output_error_after), "batches": self.batches,
                "samples": self.samples, "ridge": self.ridge, "bn": self.bn, "bn_layers": list(self.bn_layers),
                "bn_matched": [list(m) for m in self.bn_matched],
                "world_size": self.world_size, "seconds": self.seconds, "notes": list(self.notes)}


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4g}"


# ------------------------------------------------------------------------------------------------ data helpers


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


def output_leaves(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a (nested) model output."""
    leaves = torch.utils._pytree.tree_leaves(value)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


# ---------------------------------------------------------------------------------------------- least squares


def _targets(y: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, O, H, W) -> (groups, O/groups, N*H*W), matching ``im2col``'s column order."""
    n, o = y.shape[:2]
    return y.reshape(n, groups, o // groups, -1).permute(1, 2, 0, 3).reshape(groups, o // groups, -1)


class _NormalEquations:
    """Sums over batches for one conv's least-squares refit: G = sum X X^T, C = sum Y X^T, sum ||Y||^2, count."""

    def __init__(self, conv: nn.Conv2d, device: torch.device | None) -> None:
        g, o = conv.groups, conv.out_channels
        d = conv.in_channels // g * conv.kernel_size[0] * conv.kernel_size[1] + (conv.bias is not None)
        kw = {"dtype": torch.float64, "device": device}
        self.conv = conv
        self.gram = torch.zeros(g, d, d, **kw)
        self.cross = torch.zeros(g, o // g, d, **kw)
        self.stats = torch.zeros(2, **kw)  # sum ||Y||^2, number of columns

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        conv = self.conv
        n = x.shape[0]
        per_sample = max(1, self.gram.shape[1] * max(1, y[0, 0].numel()))
        step = max(1, _CHUNK_ELEMENTS // per_sample)
        for i in range(0, n, step):
            cols = im2col(conv, x[i:i + step].detach()).to(torch.float64)
            tgt = _targets(y[i:i + step].detach().to(torch.float64), conv.groups)
            if cols.shape[-1] != tgt.shape[-1]:
                raise RepairError(f"conv input gives {cols.shape[-1]} output columns but the original site output has "
                                  f"{tgt.shape[-1]}: the rewritten site does not produce the original's shape")
            if conv.bias is not None:
                cols = torch.cat([cols, cols.new_ones(cols.shape[0], 1, cols.shape[2])], dim=1)
            self.gram += cols @ cols.transpose(1, 2)
            self.cross += tgt @ cols.transpose(1, 2)
            self.stats[0] += tgt.square().sum()
            self.stats[1] += tgt.shape[-1]

    def merged(self, other: _NormalEquations) -> _NormalEquations:
        """The sums of both (the equations of the union of their columns)."""
        out = copy.copy(self)
        out.gram, out.cross, out.stats = self.gram + other.gram, self.cross + other.cross, self.stats + other.stats
        return out

    def weights(self) -> torch.Tensor:
        """The conv's current weights as (groups, O/groups, D) (bias as the last column)."""
        conv = self.conv
        g = conv.groups
        w = conv.weight.detach().to(torch.float64).reshape(g, conv.out_channels // g, -1)
        if conv.bias is not None:
            w = torch.cat([w, conv.bias.detach().to(torch.float64).reshape(g, -1, 1)], dim=2)
        return w

    def residual(self, w: torch.Tensor) -> float:
        """Relative residual ||W X - Y|| / ||Y|| from the sums (no data needed)."""
        err2 = ((w @ self.gram) * w).sum() - 2 * (w * self.cross).sum() + self.stats[0]
        y2 = float(self.stats[0])
        return math.sqrt(max(float(err2), 0.0) / y2) if y2 > 0 else (0.0 if float(err2) <= 0 else math.inf)

    def solve(self, ridge: float) -> torch.Tensor:
        w0 = self.weights()
        d = self.gram.shape[-1]
        mean_diag = self.gram.diagonal(dim1=1, dim2=2).mean(dim=1)  # per group
        lam = torch.where(mean_diag > 0, ridge * mean_diag, torch.ones_like(mean_diag))[:, None, None]
        eye = torch.eye(d, dtype=self.gram.dtype, device=self.gram.device)
        rhs = (self.cross + lam * w0).transpose(1, 2)
        return torch.linalg.solve(self.gram + lam * eye, rhs).transpose(1, 2)

    def assign(self, w: torch.Tensor, module: torch.fx.GraphModule, qualname: str) -> None:
        conv = self.conv
        if conv.bias is not None:
            w, b = w[..., :-1], w[..., -1]
            with torch.no_grad():
                conv.bias.copy_(b.reshape(-1).to(conv.bias.dtype))
        set_conv_weight(module, qualname, w.reshape(conv.weight.shape))


# ------------------------------------------------------------------------------------------------------ repair


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


class _Progress:
    def __init__(self, enabled: bool, total: int | None, desc: str) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # progress is cosmetic
                return
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def update(self, desc: str | None = None) -> None:
        if self.bar is not None:
            if desc is not None:
                self.bar.set_description(desc, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
            a, b = (_halves(a)[1], _halves(b)[1]) if check_half else (a, b)
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
             sites: Sequence[_Site], progress: _Progress, label: str) -> dict[str, float]:
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


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch split into its fit half (even samples) and its check half (odd samples)."""
    return t[0::2], t[1::2]


def _refit(original: torch.fx.GraphModule, model: torch.fx.GraphModule, batches: Callable[[], Iterable[Any]],
           site: _Site, ridge: float, progress: _Progress) -> _Fit:
    """Refit the site's conv if the refit passes the held-out check (module docstring); else keep its weights."""
    assert site.conv is not None and site.original is not None
    conv = model.get_submodule(site.conv)
    assert isinstance(conv, nn.Conv2d)
    x_node = site.output.args[0]
    assert isinstance(x_node, torch.fx.Node)
    fit, check = _NormalEquations(conv, conv.weight.device), _NormalEquations(conv, conv.weight.device)
    for inputs in batches():
        _, y = next(node_values(original, inputs, [site.original], stop=site.original))
        _, x = next(node_values(model, inputs, [x_node], stop=x_node))
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or y.dim() != 4:
            raise RepairError(f"site {site.name!r}: expected 4-D tensors at the conv input and the original site "
                              "output")
        (x_fit, x_check), (y_fit, y_check) = _halves(x.to(conv.weight.device)), _halves(y.to(conv.weight.device))
        fit.add(x_fit, y_fit)
        if x_check.shape[0]:
            check.add(x_check, y_check)
        progress.update(f"refit {site.name}")
    all_reduce(fit.gram, fit.cross, fit.stats, check.gram, check.cross, check.stats)
    full = fit.merged(check)
    columns = int(full.stats[1])
    if columns == 0:
        raise RepairError(f"site {site.name!r}: the calibration data gave no output columns")
    w0 = fit.weights()
    before = full.residual(w0)
    unknowns = fit.gram.shape[-1]
    if float(check.stats[1]) == 0:
        return _Fit(False, "no held-out samples to check the refit on (every calibration batch has one sample); "
                    "use batches of 2 or more", before, before, columns, math.nan, math.nan)
    trial = fit.solve(ridge)
    check_before, check_after = check.residual(w0), check.residual(trial)
    if not torch.isfinite(trial).all():
        raise RepairError(f"site {site.name!r}: the least-squares solve gave non-finite weights; raise ridge "
                          f"(now {ridge:g}) or check the calibration data for inf/nan")
    if not check_after <= check_before:
        return _Fit(False, f"refit kept out: held-out residual {check_before:.3g} -> {check_after:.3g} (fit on "
                    f"{int(fit.stats[1]):,} columns for {unknowns} unknowns per output); give more calibration "
                    "images", before, before, columns, check_before, check_after)
    after = full.residual(trial)
    fit.assign(trial, model, site.conv)
    return _Fit(True, "", before, after, columns, check_before, check_after)


def _batchnorm(model: torch.fx.GraphModule, node: torch.fx.Node) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm with running statistics that ``node`` calls (None if it calls something else)."""
    if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    bn = model.get_submodule(str(node.target))
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None and bn.running_var is not None:
        return bn
    return None


def _reestimate(model: torch.fx.GraphModule, node: torch.fx.Node, batches: Callable[[], Iterable[Any]],
                progress: _Progress) -> None:
    """Recompute the running statistics of the BatchNorm at ``node`` from scratch: the cumulative average over
    batches of its input's batch mean and unbiased variance (momentum=None, that layer alone in train mode, the
    model run up to it); momentum and train flag are restored. Across processes the averages are combined weighted
    by batch counts."""
    bn = _batchnorm(model, node)
    assert bn is not None
    momentum, training = bn.momentum, bn.training
    try:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
        for inputs in batches():
            next(node_values(model, inputs, [node], stop=node))
            progress.update(f"re-estimate {node.target}")
    finally:
        bn.momentum = momentum
        bn.train(training)
    if is_distributed():
        n = bn.num_batches_tracked.to(torch.float64)
        mean, var, total = bn.running_mean.to(torch.float64) * n, bn.running_var.to(torch.float64) * n, n.clone()
        all_reduce(mean, var, total)
        bn.running_mean.copy_(mean / total)
        bn.running_var.copy_(var / total)
        bn.num_batches_tracked.copy_(total.to(bn.num_batches_tracked.dtype))


_MOMENTS = 6  # per-channel sums: r, o, r^2, o^2, r o, count


def _channel_sums(xr: torch.Tensor, xo: torch.Tensor, sums: torch.Tensor) -> None:
    """Add per-channel sum r, sum o, sum r^2, sum o^2, sum r o and count of (N, C, ...) tensors to ``sums`` (6, C),
    float64."""
    r = xr.detach().to(torch.float64).transpose(0, 1).reshape(xr.shape[1], -1)
    o = xo.detach().to(torch.float64).transpose(0, 1).reshape(xo.shape[1], -1)
    sums[0] += r.sum(dim=1)
    sums[1] += o.sum(dim=1)
    sums[2] += r.square().sum(dim=1)
    sums[3] += o.square().sum(dim=1)
    sums[4] += (r * o).sum(dim=1)
    sums[5] += r.shape[1]


def _moment_map(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the a > 0, b with a r + b having the mean and variance of o (a = 1 where either is constant)."""
    n = sums[5].clamp_min(1)
    m_r, m_o = sums[0] / n, sums[1] / n
    var_r = (sums[2] / n - m_r.square()).clamp_min(0)
    var_o = (sums[3] / n - m_o.square()).clamp_min(0)
    ok = (var_r > 1e-12 * (sums[2] / n)) & (var_o > 1e-12 * (sums[3] / n))
    a = torch.where(ok, (var_o / torch.where(ok, var_r, torch.ones_like(var_r))).sqrt(), torch.ones_like(var_r))
    return a, m_o - a * m_r


def _map_error(sums: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per channel, sum (a r + b - o)^2 from the sums of ``_channel_sums``."""
    s_r, s_o, s_rr, s_oo, s_ro, n = sums
    return a.square() * s_rr + 2 * a * b * s_r + b.square() * n - 2 * a * s_ro - 2 * b * s_o + s_oo


def _match(original: torch.fx.GraphModule, model: torch.fx.GraphModule, node: torch.fx.Node,
           ref: torch.fx.Node, batches: Callable[[], Iterable[Any]], progress: _Progress) -> int:
    """Fold into the running statistics of the BatchNorm at ``node`` the per-channel map a r + b (a > 0) that gives
    its input r in the rewritten model the mean and variance of its input o in the original (node ``ref``) on the
    data: mean' = (mean - b) / a, var' = (var + eps) / a^2 - eps, so BN'(r) = BN(a r + b) and the BatchNorm's output
    has the original's per-channel mean and variance. Identical inputs give a = 1, b = 0 (statistics unchanged).

    Only the channels that pass the held-out check (the map fit on the fit half brings r closer to o on the check
    half) and whose folded variance stays positive are changed; returns their number."""
    bn = _batchnorm(model, node)
    assert bn is not None and isinstance(ref.args[0], torch.fx.Node)
    x_node, o_node = node.args[0], ref.args[0]
    assert isinstance(x_node, torch.fx.Node)
    fit, check = (torch.zeros(_MOMENTS, bn.num_features, dtype=torch.float64, device=bn.running_mean.device)
                  for _ in range(2))
    for inputs in batches():
        _, xo = next(node_values(original, inputs, [o_node], stop=o_node))
        _, xr = next(node_values(model, inputs, [x_node], stop=x_node))
        (r_fit, r_check), (o_fit, o_check) = _halves(xr.to(fit.device)), _halves(xo.to(fit.device))
        _channel_sums(r_fit, o_fit, fit)
        _channel_sums(r_check, o_check, check)
        progress.update(f"match {node.target}")
    all_reduce(fit, check)
    a, b = _moment_map(fit)
    mean, var = bn.running_mean.to(torch.float64), bn.running_var.to(torch.float64)
    new_var = (var + bn.eps) / a.square() - bn.eps
    identity = _map_error(check, torch.ones_like(a), torch.zeros_like(b))
    keep = (check[5] > 0) & (_map_error(check, a, b) < identity) & (new_var > 0)
    bn.running_mean.copy_(torch.where(keep, (mean - b) / a, mean))
    bn.running_var.copy_(torch.where(keep, new_var, var))
    return int(keep.sum())


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
        elif node in downstream and _batchnorm(model, node) is not None:
            ref = orig_calls.get(str(node.target))
            matchable = ref is not None and bool(ref.args) and isinstance(ref.args[0], torch.fx.Node)
            if bn == "reestimate" or matchable:
                steps.append(("bn", (node, ref)))
    return steps


def repair(original: nn.Module, rewritten: torch.fx.GraphModule, data: Iterable[Any], *,
           ridge: float = DEFAULT_RIDGE, bn: bool | str | None = "match", progress: bool = True,
           input_fn: InputFn | None = None, copy_module: bool = True, concrete_args: Mapping[str, Any] | None = None,
           leaf_modules: Iterable[LeafSpec] = (), autowrap_functions: Iterable[Callable[..., Any]] = ()
           ) -> RepairResult:
    """Refit the rewritten sites of ``rewritten`` (the output of ``fxrewrite.rewrite``) on calibration ``data`` so
    each site's output matches ``original``'s, then adjust the downstream BatchNorm statistics.

    ``data`` is a re-iterable of input tuples (a list, or a DataLoader; ``input_fn`` maps each item to the model's
    positional inputs, e.g. ``lambda b: (b[0],)`` for (input, label) pairs). It is read once per refit site, twice
    to measure, and for ``bn="match"`` once per downstream BatchNorm (``"reestimate"``: once). ``ridge`` is relative
    to the mean diagonal of each Gram matrix and pulls towards the data-free weights. ``bn``: ``"match"`` (default,
    True), ``"reestimate"`` or None (False): see the module docstring. Neither input module is changed
    (``copy_module=False`` repairs ``rewritten`` in place, for callers that own it); both are run in eval mode.
    Capture options are those used to trace ``original``. Under torch.distributed every process must call this with
    its own non-empty share of the data; sums are all-reduced over the default process group.
    """
    start = time.perf_counter()
    bn = {True: "match", False: None}.get(bn, bn) if isinstance(bn, bool) else bn
    if bn not in BN_MODES:
        raise ConfigError(f"repair: bn must be one of {BN_MODES} (or True for 'match', False for None), got {bn!r}")
    if not isinstance(rewritten, torch.fx.GraphModule):
        raise ConfigError(f"repair needs the rewritten GraphModule (RewriteResult.module), got "
                          f"{type(rewritten).__name__}")
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
    bar = _Progress(progress, None if length is None else length * (len(steps) + 2), "repair")
    fits: dict[str, _Fit] = {}
    bn_layers: list[str] = []
    bn_matched: list[tuple[str, int, int]] = []
    with eval_mode(reference, model), torch.no_grad():
        try:
            before = _measure(reference, model, batches, sites, bar, "measure (before)")
            for kind, step in steps:  # graph order: each step sees everything upstream of it already repaired
                if kind == "refit":
                    fits[step.name] = _refit(reference, model, batches, step, float(ridge), bar)
                elif bn == "match":
                    kept = _match(reference, model, step[0], step[1], batches, bar)
                    bn_layers.append(str(step[0].target))
                    bn_matched.append((str(step[0].target), kept, model.get_submodule(str(step[0].target))
                                       .num_features))
                else:
                    _reestimate(model, step[0], batches, bar)
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
                        time.perf_counter() - start, (reverted,) if reverted else ())
