"""Budgets: choose one rewrite per convolution site so that the model meets a MAC / parameter / latency target with
the least total predicted error.

``choose_plan(gm, Target(macs=0.5))`` takes a traced GraphModule with shapes (``fxrewrite.graph.shapes.propagate_shapes``)
and, for every eligible site, lists candidates: keep the conv, or each allowed form (``forms``) with each valid rank /
group count. Each candidate's cost (MACs and parameters, the same formulas as ``fxrewrite.measure.cost``) is computed from the
shapes and its predicted error from the trained weight, without data and without building any module:

- depthwise-separable / grouped-separable ``{groups=g, rank=r}``: the energy of the discarded singular values of the
  per-group ``O x (I/g)K`` slices (exactly the weight error the pass will report);
- grouped ``{groups=g}``: the energy outside the block diagonal (``sqrt(1 - kept_energy)``);
- Tucker-2 (``grouped-bottleneck{groups=1, rank=R}``, opt-in form ``"tucker2"``): the error of the truncated HOSVD
  (the pass's ST-HOSVD + HOOI fit usually ends a little below it).

**Calibration** (``calibration=`` batches): the error is instead the relative output error of the site on real
activations, ``sqrt(trace(dW G dW^T) / sum ||y||^2)`` with ``G`` the Gram matrix of the site's unfolded input patches
(``collect_site_stats``: sums over batches, sites in chunks of bounded Gram memory, no activation kept) and ``dW`` the
change the form makes. It is exact for the built factorisations, and every rank of a group count comes from one small
matrix (``separable_output_errors``; ``grouped_output_error``, ``tucker2_output_errors`` likewise).

**Latency** (``Target(latency=0.5, backend="eager")``): every site's original conv and every candidate are timed
once per distinct layer configuration (``fxrewrite.budget.layer_latency``: round-robin median against the original, cached
in memory and optionally on disk); the candidates timed are those Pareto-optimal in MACs, parameters and error, with
ranks on a grid of about two per octave (``LayerLatency.rank_grid``). A candidate not faster than the original conv
on that backend is pruned (each site says how many); the summed site latencies (the measured original total minus
the per-site savings) must meet the target. ``BudgetPlan.latency_check`` compares that prediction with a whole-model
measurement (``fxrewrite.measure.latency``).

**Objective.** Minimise ``sum over sites of w_s * loss(e_s)``, where ``e_s = ||W_s - W_s'||_F / ||W_s||_F`` is the
site's relative weight error (predicted as above) and ``w_s`` its importance (1 for every site unless ``weights=``
says otherwise; ``weights={"layer1.0.conv1": 4.0}`` makes a site count more). The default ``objective="log-cosine"``
uses ``loss(e) = -log(1 - e^2)``: every form here replaces ``W`` by an orthogonal projection of it, so ``1 - e^2`` is
the squared cosine between the new and the old weight; with batch-normalised layers (scale does not matter) the
cosine similarity of the output roughly multiplies along a chain, so the sum of log-cosines approximates the log of
the end-to-end cosine. For small errors it equals ``e^2``; unlike ``objective="squared"`` (``loss(e) = e^2``, the
first-order sum of independent perturbations) it does not pile large errors on a few sites, which measurably costs
accuracy (``benchmarks/bench_budget.py``).

**Optimiser.** A multiple-choice knapsack. ``greedy``: the Lagrangian path, moving one site at a time to the next
vertex of its lower convex hull of (cost, error) with the least error added per unit of cost saved until the target
is met, then a repair pass that spends the remaining slack on the single change that lowers the error most, while it
fits. ``dp``: dynamic programming over sites with costs rounded *up* to ``budget / buckets`` units (so a plan it
finds never exceeds the budget; exact when the costs are integers whose greatest common divisor divides the budget
into at most ``buckets`` units), then the same repair pass; one binding constraint only. ``auto`` (default) runs
both (DP when one constraint binds) and keeps the plan with the lower objective. Losses below float rounding
(weighted loss < 1e-12) count as zero, and every site ends on its cheapest candidate among those no worse than its
choice. The chosen plan never exceeds the target; when no plan can meet it, ``BudgetInfeasible`` says why and which
fraction is reachable.

>>> import torch
>>> from fxrewrite.graph.capture import trace
>>> from fxrewrite.graph.shapes import propagate_shapes
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(16, 32, 3, padding=1))
>>> gm = trace(model)
>>> propagate_shapes(gm, (torch.randn(1, 8, 8, 8),))
>>> plan = choose_plan(gm, Target(macs=0.5))
>>> plan.macs_after <= 0.5 * plan.macs_before
True
>>> result = plan.apply(gm)
>>> from fxrewrite.measure.cost import model_cost
>>> model_cost(result.graph_module).macs == plan.macs_after
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import torch
from tabulate import tabulate
from torch import Tensor, nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.recorder import node_values
from fxrewrite.graph.select import Rule, parse_rules, resolve
from fxrewrite.graph.sites import ConvSite, check_groups, find_sites
from fxrewrite.maths import factorize
from fxrewrite.maths.im2col import im2col
from fxrewrite.measure.cost import model_cost
from fxrewrite.passes import pass_class
from fxrewrite.passes.candidates import KEEP, Candidate, Form, make_candidate
from fxrewrite.util.distributed import all_reduce
from fxrewrite.util.inputs import calibration_inputs, check_reiterable, to_device
from fxrewrite.util.runtime import device_of, eval_mode

__all__ = [
    "DEFAULT_FORMS",
    "KEEP",
    "BudgetInfeasible",
    "BudgetPlan",
    "Candidate",
    "DepthwiseSeparableForm",
    "Form",
    "GroupedForm",
    "GroupedSeparableForm",
    "SiteChoice",
    "SiteStats",
    "Target",
    "Tucker2Form",
    "choose_plan",
    "collect_site_stats",
    "group_spectra",
    "grouped_output_error",
    "make_form",
    "optimise",
    "parse_forms",
    "separable_output_errors",
    "tucker2_output_errors",
]

DEFAULT_FORMS = ("depthwise-separable", "grouped-separable", "grouped")
METHODS = ("auto", "greedy", "dp")
OBJECTIVES = ("log-cosine", "squared")
_EPS = 1e-12
_ZERO = 1e-12  # weighted losses below this are float rounding, not loss
_MAX_LOSS2 = 1.0 - 1e-9  # log-cosine of a site that keeps nothing: -log(1e-9), large but finite


def _site_loss(rel_error: float, objective: str) -> float:
    """One site's term of the objective for relative weight error ``e``: ``e^2`` (squared) or ``-log(1 - e^2)``
    (log-cosine: ``1 - e^2`` is the squared cosine between the new and the old weight for these projections).

    >>> _site_loss(0.6, "squared"), round(_site_loss(0.6, "log-cosine"), 6)  # -log(0.64)
    (0.36, 0.446287)
    """
    e2 = min(rel_error * rel_error, _MAX_LOSS2)
    return e2 if objective == "squared" else -math.log1p(-e2)


class BudgetInfeasible(ConfigError):
    """No choice of the allowed forms meets the target; the message says which fraction is reachable and why."""


def _fraction(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise ConfigError(f"Target: {name} must be a fraction of the original model's total in (0, 1], "
                          f"got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"Target: {name}={value} must be in (0, 1] (a fraction of the original model's total, "
                          f"e.g. {name}=0.5 for at most half)")
    return float(value)


@dataclass(frozen=True)
class Target:
    """Upper bounds on the rewritten model's totals as fractions of the original's (``macs=0.5``: at most half the
    MACs; ``latency=0.5``: at most half the summed latency of the conv sites, measured per layer on ``backend``, see
    ``fxrewrite.budget.layer_latency``). At least one bound must be given; any may be combined.

    >>> Target(macs=0.5).describe()
    'macs <= 0.5x'
    >>> Target(latency=0.6, params=0.5).describe()
    'params <= 0.5x, latency <= 0.6x (eager)'
    >>> Target(macs=1.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    fxrewrite.errors.ConfigError: Target: macs=1.5 must be in (0, 1] ...
    """

    macs: float | None = None
    params: float | None = None
    latency: float | None = None
    backend: str = "eager"

    def __post_init__(self) -> None:
        from fxrewrite.budget.layer_latency import BACKENDS
        macs, params = _fraction("macs", self.macs), _fraction("params", self.params)
        latency = _fraction("latency", self.latency)
        if macs is None and params is None and latency is None:
            raise ConfigError("Target needs macs=, params= and/or latency= (fractions of the original model's "
                              "totals), e.g. Target(macs=0.5)")
        if self.backend not in BACKENDS:
            raise ConfigError(f"Target: unknown latency backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if latency is None and self.backend != "eager":
            raise ConfigError(f"Target: backend={self.backend!r} only applies to a latency target; add latency=, "
                              "e.g. Target(latency=0.5, backend=...)")
        object.__setattr__(self, "macs", macs)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "latency", latency)

    def describe(self) -> str:
        parts = [f"{k} <= {v:g}x" for k, v in (("macs", self.macs), ("params", self.params)) if v is not None]
        if self.latency is not None:
            parts.append(f"latency <= {self.latency:g}x ({self.backend})")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"macs": self.macs, "params": self.params}
        if self.latency is not None:
            out |= {"latency": self.latency, "backend": self.backend}
        return out


# ------------------------------------------------------------------------------------- calibration statistics


@dataclass
class SiteStats:
    """Second moments of one site's input on the calibration data (sums over batches; no activation is kept).

    Per source group ``b`` of the conv (``G`` groups, ``m = O/G`` outputs, ``d = (I/G)K`` columns): ``gram[b]`` the
    Gram matrix ``sum x x^T`` of the unfolded input patches (``fxrewrite.tuning.repair.im2col`` columns) and ``weight[b]``
    the conv weight as ``m x d``, both float64; ``energy`` the output energy ``sum ||W x + bias||^2``. A weight
    change ``dW`` changes the output by ``trace(dW G dW^T) / energy`` (squared, relative): ``output_error(dw)``.
    """

    gram: Tensor
    weight: Tensor
    energy: float
    columns: int
    _cache: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    @property
    def weight_times_gram(self) -> Tensor:
        """``W G`` per source group (``m x d``, float64)."""
        if "wg" not in self._cache:
            self._cache["wg"] = self.weight @ self.gram
        return self._cache["wg"]

    def compute(self, name: str) -> Tensor:
        """``gram``, or ``weight_gram`` (``W^T W`` per source group), in the dtype the quadratic forms use (cached):
        float32 from ``_FP32_FROM`` columns on (resnet's 256- and 512-channel 3x3 convs: 2-3x faster, and on a
        512-channel layer the output errors agree with float64 to about 1e-8), float64 below."""
        if name not in self._cache:
            dtype = torch.float32 if self.gram.shape[-1] >= _FP32_FROM else torch.float64
            if name == "gram":
                self._cache[name] = self.gram.to(dtype)
            elif name == "weight_gram":
                w = self.weight.to(dtype)
                self._cache[name] = w.mT @ w
            else:
                raise ValueError(f"SiteStats.compute: unknown matrix {name!r} (gram or weight_gram)")
        return self._cache[name]

    def output_error(self, dw: Tensor) -> float:
        """Relative output error ``sqrt(trace(dW G dW^T) / energy)`` of a weight change ``dw`` (``G x m x d``)."""
        q = float(((dw.to(torch.float64) @ self.gram) * dw).sum())
        return _relative(q, self.energy)


def _relative(q: float | np.ndarray, energy: float) -> Any:
    """``sqrt(q / energy)`` (0 for a site whose output is zero on the data)."""
    q = np.maximum(q, 0.0)
    if energy <= 0.0:
        return np.zeros_like(q) if isinstance(q, np.ndarray) else 0.0
    out = np.sqrt(q / energy)
    return out if isinstance(out, np.ndarray) else float(out)


_FP32_FROM = 1024  # see SiteStats.compute


class _GramSum:
    """Running sums for one site: Gram and column sums of the im2col columns (float32 per chunk, float64 sums)."""

    def __init__(self, conv: nn.Conv2d, device: torch.device | None) -> None:
        g = conv.groups
        d = conv.in_channels // g * conv.kernel_size[0] * conv.kernel_size[1]
        self.conv = conv
        self.gram = torch.zeros(g, d, d, dtype=torch.float64, device=device)
        self.sums = torch.zeros(g, d, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: Tensor) -> None:
        n = x.shape[0]
        per_sample = max(1, math.prod(int(v) for v in x.shape[1:]) * self.conv.kernel_size[0]
                         * self.conv.kernel_size[1])
        step = max(1, _GRAM_CHUNK // per_sample)
        for i in range(0, n, step):
            cols = im2col(self.conv, x[i:i + step].detach())
            cols = cols if cols.dtype in (torch.float32, torch.float64) else cols.float()
            self.gram += (cols @ cols.mT).to(torch.float64)
            self.sums += cols.sum(dim=-1).to(torch.float64)
            self.count += cols.shape[-1]

    def stats(self) -> SiteStats:
        all_reduce(self.gram, self.sums, self.count)
        conv = self.conv
        g, m = conv.groups, conv.out_channels // conv.groups
        w = conv.weight.detach().to(torch.float64).reshape(g, m, -1).to(self.gram.device)
        energy = float(((w @ self.gram) * w).sum())
        if conv.bias is not None:
            b = conv.bias.detach().to(torch.float64).reshape(g, m).to(self.gram.device)
            energy += float(2 * (b * (w @ self.sums[..., None])[..., 0]).sum() + self.count * b.square().sum())
        return SiteStats(self.gram.cpu(), w.cpu(), energy, int(self.count))


_GRAM_CHUNK = 1 << 24  # float32 im2col elements per chunk (64 MiB): bounds the transient memory of a batch


def _conv_input(node: torch.fx.Node) -> torch.fx.Node:
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, torch.fx.Node):
        raise ConfigError(f"conv node {node.name!r} has no tensor input node; calibration cannot observe it")
    return x


def collect_site_stats(gm: torch.fx.GraphModule, sites: Sequence[ConvSite], data: Iterable[Any], *,
                       input_fn: Callable[[Any], Sequence[Any]] | None = None,
                       max_bytes: int = 1 << 30) -> Iterator[tuple[ConvSite, SiteStats]]:
    """``(site, SiteStats)`` for every site, in graph order, from running ``gm`` (eval mode, no grad) on ``data``
    (input tuples or tensors; ``input_fn`` maps items to inputs). Sites are taken in chunks whose Gram matrices
    fit ``max_bytes`` together (one pass over the data per chunk, stopping at the chunk's last input), and each
    chunk's statistics are yielded before the next is collected, so memory stays bounded."""
    from fxrewrite.passes.base import conv_module
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    todo = sorted(sites, key=lambda s: order[nodes[s.node]])
    chunks: list[list[ConvSite]] = []
    size = 0
    for s in todo:
        d = s.spec.in_channels // s.spec.groups * s.spec.kernel_size[0] * s.spec.kernel_size[1]
        need = s.spec.groups * d * d * 8
        if not chunks or size + need > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(s)
        size += need
    if len(chunks) > 1:
        check_reiterable(data)
    device = device_of(gm)
    for chunk in chunks:
        sums = {s.name: _GramSum(conv_module(gm, s), device) for s in chunk}
        inputs_of: dict[torch.fx.Node, list[str]] = {}
        for s in chunk:
            inputs_of.setdefault(_conv_input(nodes[s.node]), []).append(s.name)
        stop = max(inputs_of, key=order.__getitem__)
        batches = 0
        with torch.no_grad(), eval_mode(gm):
            for item in data:
                for node, value in node_values(gm, to_device(calibration_inputs(item, input_fn), device), inputs_of, stop=stop):
                    if not isinstance(value, Tensor) or value.dim() != 4:
                        raise ConfigError(f"calibration: the input of conv site(s) {inputs_of[node]} is not a 4-D "
                                          "tensor")
                    for name in inputs_of[node]:
                        sums[name].add(value)
                batches += 1
        if batches == 0:
            raise ConfigError("calibration data is empty: give at least one batch of inputs")
        for s in chunk:
            yield s, sums.pop(s.name).stats()


def _block_quad(m: Tensor, r: Tensor) -> Tensor:
    """``out[x, j, y, l] = sum_{a, b} r[x, a, j] M[(x, a), (y, b)] r[y, b, l]`` for block-diagonal factors ``r``
    (``q`` blocks of ``c x k``) and a ``qc x qc`` matrix ``M``: ``R^T M R`` in ``D^2 k + D q k^2`` operations, in
    ``M``'s dtype (see ``SiteStats.compute``)."""
    return _block_quad_(m, r.to(m.dtype))


def _block_quad_(m: Tensor, r: Tensor) -> Tensor:
    q, c, k = r.shape
    t = (m.reshape(q * c, q, c).transpose(0, 1) @ r)  # (y, (x, a), l)
    t = t.reshape(q, q, c, k).permute(1, 2, 0, 3).reshape(q, c, q * k)  # (x, a, (y, l))
    return (r.mT @ t).reshape(q, k, q, k)


def separable_output_errors(stats: SiteStats, groups: int) -> np.ndarray:
    """``errors[r]``: the relative output error on the calibration data of the (grouped-)separable factorisation
    with ``groups`` input groups and rank ``r`` (0 .. the exact rank), the per-group truncated SVD that
    ``factorize.grouped_separable`` builds. With ``A_i = sum_j s_ij u_ij v_ij^T`` the slice of input group ``i``,
    the discarded change is ``sum_{j >= r} s_ij u_ij v_ij^T``, so ``trace(dW G dW^T) = sum_{j, l >= r} Z[j, l]``
    with ``Z[j, l] = sum_{x, y} (s u_xj . s u_yl) (v_xj^T G_xy v_yl)``: one ``k x k`` matrix per group count
    gives every rank."""
    big_g, m, d = stats.weight.shape
    q = groups // big_g
    c = d // q
    k = min(m, c)
    z = torch.zeros(k, k, dtype=torch.float64)
    for b in range(big_g):
        a = stats.weight[b].reshape(m, q, c).transpose(0, 1)  # (q, m, c): the slices A_i of this source group
        if c <= m:  # tall slices (as factorize computes them): right vectors V, left Gram V^T A_x^T A_y V
            with factorize.one_thread():  # batched eigh: threads only synchronise
                right = torch.linalg.eigh(a.mT @ a).eigenvectors.flip(-1)  # (q, c, c), descending
            left = _block_quad(stats.compute("weight_gram")[b], right)
        else:  # wide slices: left vectors U, right factors A^T U = V S
            with factorize.one_thread():
                u = torch.linalg.eigh(a @ a.mT).eigenvectors.flip(-1)  # (q, m, m)
            right = a.mT @ u
            flat = u.transpose(0, 1).reshape(m, q * k).to(stats.compute("gram").dtype)
            left = (flat.mT @ flat).reshape(q, k, q, k)
        z += (left * _block_quad(stats.compute("gram")[b], right)).sum(0).sum(1).to(torch.float64)
    tail = z.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1).diagonal()  # tail[r] = sum_{j, l >= r} z[j, l]
    return _relative(torch.cat([tail, tail.new_zeros(1)]).numpy(), stats.energy)


def grouped_output_error(stats: SiteStats, groups: int) -> float:
    """Relative output error of keeping the block diagonal with ``groups`` groups (``factorize.block_diagonal``):
    ``trace(dW G dW^T) = trace(W G W^T) - 2 trace(W_kept G W^T) + trace(W_kept G W_kept^T)``, the last one
    block by block."""
    big_g, m, d = stats.weight.shape
    q = groups // big_g
    mo, dc = m // q, d // q
    w = torch.diagonal(stats.weight.reshape(big_g, q, mo, q, dc), dim1=1, dim2=3)  # (G, mo, dc, q)
    wg = torch.diagonal(stats.weight_times_gram.reshape(big_g, q, mo, q, dc), dim1=1, dim2=3)
    blocks = torch.diagonal(stats.gram.reshape(big_g, q, dc, q, dc), dim1=1, dim2=3).permute(0, 3, 1, 2)
    kept = w.permute(0, 3, 1, 2)  # (G, q, mo, dc)
    total = float((stats.weight * stats.weight_times_gram).sum())
    q_err = total - 2 * float((w * wg).sum()) + float(((kept @ blocks) * kept).sum())
    return _relative(q_err, stats.energy)


def tucker2_output_errors(stats: SiteStats, u: Tensor, v: Tensor, ranks: Sequence[int]) -> list[float]:
    """Relative output errors of the truncated HOSVD ``W ~ U_r U_r^T W x_I V_r V_r^T`` (``u``, ``v``: the full
    mode-O / mode-I eigenvector bases, descending) for each rank. In the rotated bases the change keeps the core
    entries ``(p, q)`` with ``p >= r`` or ``q >= r``: rows ``p >= r`` count in full, rows ``p < r`` only on the
    input channels ``q >= r``, whose quadratic forms are accumulated row by row (chunked to bound memory)."""
    if stats.weight.shape[0] != 1:
        raise ValueError("tucker2_output_errors needs an ungrouped conv (the candidate is dense)")
    o, d = stats.weight.shape[1:]
    i = v.shape[0]
    k = d // i
    y = torch.einsum("oik,op,iq->pqk", stats.weight[0].reshape(o, i, k), u, v)  # the rotated weight (core)
    g = stats.gram[0].reshape(i, k, i, k)
    g = torch.einsum("akbl,bz->akzl", g, v)
    g = torch.einsum("akzl,aq->qkzl", g, v).reshape(d, d)
    yf = y.reshape(o, d)
    rows = ((yf @ g) * yf).sum(dim=1)  # full-row quadratic forms
    suffix = torch.cat([rows.flip(0).cumsum(0).flip(0), rows.new_zeros(1)])  # suffix[p] = sum_{p' >= p}
    gq = g.reshape(i, k, d)
    step = max(1, (1 << 25) // max(i * d, 1))  # rows per chunk: the (i, rows, d) product stays ~256 MiB
    acc = torch.zeros(i, i, dtype=torch.float64)
    done = 0
    out = []

    def pair_forms(lo: int, hi: int) -> Tensor:  # (hi-lo, i, i): C_p[q, z] = sum_kl y[p,q,k] g[q,k,z,l] y[p,z,l]
        t = torch.bmm(y[lo:hi].transpose(0, 1), gq)  # (i, rows, d)
        t = t.reshape(i, hi - lo, i, k)
        return (t * y[lo:hi].unsqueeze(0)).sum(dim=-1).permute(1, 0, 2)

    for r in ranks:
        r_o, r_i = min(r, o), min(r, i)
        while done < r_o:
            hi = min(done + step, r_o)
            acc += pair_forms(done, hi).sum(dim=0)
            done = hi
        out.append(_relative(float(suffix[r_o] + acc[r_i:, r_i:].sum()), stats.energy))
    return out




def _pixels(shape: tuple[int, ...] | None, channels: int) -> int:
    """Positions per channel (batch x spatial) of an NCHW shape."""
    if shape is None:
        return 0
    return math.prod(int(d) for d in shape) // max(channels, 1)


def _dims(site: ConvSite) -> tuple[int, int, int, int, int]:
    s = site.spec
    return s.in_channels, s.out_channels, s.kernel_size[0] * s.kernel_size[1], s.groups, (s.out_channels if s.bias
                                                                                          else 0)


def _tail_errors(energies: Tensor, total: float) -> np.ndarray:
    """``errors[r]`` = sqrt(energy discarded when every group keeps its top ``r`` singular values / total)."""
    per_index = energies.sum(dim=0) if energies.dim() > 1 else energies  # groups share the rank index
    tail = torch.flip(torch.cumsum(torch.flip(per_index, [0]), 0), [0])  # tail[r] = sum_{j >= r}
    tail = torch.cat([tail, tail.new_zeros(1)]).clamp_min(0.0)
    if total <= 0.0:
        return np.zeros(tail.numel())
    return np.sqrt(np.minimum(tail.numpy() / total, 1.0))


def group_spectra(weight: Tensor, source_groups: int, levels: Iterable[int]) -> dict[int, Tensor]:
    """Squared singular values of the per-group ``O/G x (I/g)K`` slices for each group count ``g`` in ``levels``
    (float64, ``(g, min(O/G, (I/g)K))``, descending), from each slice's small Gram matrix as ``factorize``
    computes the factors. Gram matrices are shared between levels: a coarser level's ``O x O`` Grams are sums of a
    finer level's, a finer level's ``(I/g)K`` square Grams are diagonal blocks of a coarser level's.

    >>> {g: ev.tolist() for g, ev in group_spectra(torch.eye(4).reshape(4, 4, 1, 1) * 2, 1, [2, 4]).items()}
    {2: [[4.0, 4.0], [4.0, 4.0]], 4: [[4.0], [4.0], [4.0], [4.0]]}
    """
    w = weight.detach().to(torch.float64)
    o, i, k = int(w.shape[0]), int(w.shape[1]) * source_groups, int(w.shape[2] * w.shape[3])
    m = o // source_groups
    levels = sorted(set(levels))
    grams: dict[int, Tensor] = {}
    wide = [g for g in levels if m <= (i // g) * k]
    for g in sorted(wide, reverse=True):  # finest first: O x O Grams of coarser groups are sums of finer ones
        finer = next((f for f in sorted(grams) if f % g == 0), None)
        if finer is not None:
            grams[g] = grams[finer].reshape(g, finer // g, m, m).sum(dim=1)
        else:
            a = factorize.group_matrices(w, source_groups, g)
            grams[g] = a @ a.mT
    tall: dict[int, Tensor] = {}
    for g in sorted(set(levels) - set(wide)):  # coarsest first: finer (I/g)K Grams are diagonal blocks
        coarser = next((c for c in sorted(tall) if g % c == 0), None)
        n = (i // g) * k
        if coarser is not None:
            q = g // coarser
            blocks = torch.diagonal(tall[coarser].reshape(coarser, q, n, q, n), dim1=1, dim2=3)  # (c, n, n, q)
            tall[g] = blocks.permute(0, 3, 1, 2).reshape(g, n, n)
        else:
            a = factorize.group_matrices(w, source_groups, g)
            tall[g] = a.mT @ a
    grams |= tall
    return {g: torch.linalg.eigvalsh(grams[g]).flip(-1).clamp_min(0.0) for g in levels}


def _pareto_mask(a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` (each column a quantity to minimise) that no other row dominates; of equal rows, the first."""
    keep = np.zeros(len(a), dtype=bool)
    if not len(a):
        return keep
    _, first = np.unique(a, axis=0, return_index=True)
    first = np.sort(first)
    b = a[first]
    dominated = np.zeros(len(b), dtype=bool)
    for lo in range(0, len(b), 512):  # chunks of the pairwise comparison bound the memory
        c = b[lo:lo + 512]
        le = (b[:, None, :] <= c[None, :, :]).all(axis=2)  # le[i, j]: b[i] <= c[j] everywhere
        lt = (b[:, None, :] < c[None, :, :]).any(axis=2)
        dominated[lo:lo + 512] = (le & lt).any(axis=0)
    keep[first[~dominated]] = True
    return keep


def _separable_candidates(form: str, site: ConvSite, weight: Tensor, group_counts: Iterable[int],
                          max_rank: int | None, with_groups: bool, stats: SiteStats | None = None
                          ) -> list[Candidate]:
    i, o, k, big_g, bias = _dims(site)
    group_counts = list(group_counts)
    if not group_counts:
        return []
    pix = _pixels(site.output_shape, o)
    if stats is None:
        total = float(weight.detach().to(torch.float64).square().sum())
        spectra = group_spectra(weight, big_g, group_counts)
    rows, opts = [], []
    for g in group_counts:
        errors = _tail_errors(spectra[g], total) if stats is None else separable_output_errors(stats, g)
        full = min(o // big_g, (i // g) * k)
        top = full if max_rank is None else min(full, max_rank)
        r = np.arange(1, top + 1)
        per_pixel = g * r * (i // g) * k + o * (g * r // big_g)
        err = np.where(r >= full, 0.0, errors[np.minimum(r, len(errors) - 1)])
        rows.append(np.stack([pix * per_pixel, per_pixel + bias, err], axis=1).astype(np.float64))
        opts.extend((g, int(x)) for x in r)
    a = np.concatenate(rows)
    out = []
    for j in np.flatnonzero(_pareto_mask(a)):
        g, r = opts[j]
        out.append(make_candidate(form, {"groups": g, "rank": r} if with_groups else {"rank": r}, int(a[j, 0]),
                              int(a[j, 1]), float(a[j, 2])))
    return out


@dataclass(frozen=True)
class DepthwiseSeparableForm:
    """``depthwise-separable{rank=T}`` for T = 1 .. the exact rank (or ``max_rank``)."""

    max_rank: int | None = None
    name: str = "depthwise-separable"
    pass_name: str = "depthwise-separable"
    calibrated: ClassVar[bool] = True

    def candidates(self, site: ConvSite, weight: Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("depthwise-separable") is not None:
            return []
        return _separable_candidates(self.pass_name, site, weight, [site.spec.in_channels], self.max_rank, False,
                                     stats)


@dataclass(frozen=True)
class GroupedSeparableForm:
    """``grouped-separable{groups=g, rank=r}`` for every valid g (or those in ``groups``) below in_channels (g =
    in_channels is depthwise-separable) and r = 1 .. the exact rank (or ``max_rank``)."""

    groups: tuple[int, ...] | None = None
    max_rank: int | None = None
    name: str = "grouped-separable"
    pass_name: str = "grouped-separable"
    calibrated: ClassVar[bool] = True

    def candidates(self, site: ConvSite, weight: Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("grouped-separable") is not None:
            return []
        s = site.spec
        options = self.groups if self.groups is not None else range(2, s.in_channels)
        valid = [g for g in options if g != s.groups and g >= 1 and check_groups(site, g, out_divisible=False) is None]
        return _separable_candidates(self.pass_name, site, weight, valid, self.max_rank, True, stats)


@dataclass(frozen=True)
class GroupedForm:
    """``grouped{groups=g}`` for every valid g (or those in ``groups``): block-diagonal truncation."""

    groups: tuple[int, ...] | None = None
    name: str = "grouped"
    pass_name: str = "grouped"
    calibrated: ClassVar[bool] = True

    def candidates(self, site: ConvSite, weight: Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("grouped") is not None:
            return []
        i, o, k, big_g, bias = _dims(site)
        options = self.groups if self.groups is not None else site.spec.valid_groups()
        valid = [g for g in options if g >= 2 and check_groups(site, g, out_divisible=True) is None]
        if not valid:
            return []
        pix = _pixels(site.output_shape, o)
        energy = factorize.dense_weight(weight.detach().to(torch.float64), big_g).square().sum(dim=(2, 3))  # O x I
        total = float(energy.sum())
        out = []
        for g in valid:
            if stats is not None:
                err = grouped_output_error(stats, g)
            else:
                kept = float(torch.diagonal(energy.reshape(g, o // g, g, i // g).sum(dim=(1, 3))).sum())
                err = 0.0 if total <= 0.0 else math.sqrt(max(total - kept, 0.0) / total)
            per_pixel = o * (i // g) * k
            out.append(make_candidate(self.pass_name, {"groups": g}, pix * per_pixel, per_pixel + bias, err))
        return out


@dataclass(frozen=True)
class Tucker2Form:
    """``grouped-bottleneck{groups=1, rank=R}`` (Tucker-2: 1x1 I->R, kxk R->R, 1x1 R->O) for R = 1 .. the exact rank
    (or ``max_rank``). The predicted error is that of the truncated HOSVD (top-R left singular vectors of the mode-O
    and mode-I unfoldings, core = projection); the pass starts from the sequentially truncated HOSVD and refines it
    with HOOI, which in practice ends at or below that (it is not a proven bound). The first 1x1 runs at the input
    resolution (strided convs). With calibration statistics the error is that HOSVD's output error; at grouped
    convs it is not offered then (the dense candidate's output error needs the cross-group input statistics)."""

    max_rank: int | None = None
    name: str = "tucker2"
    pass_name: str = "grouped-bottleneck"
    calibrated: ClassVar[bool] = True

    def candidates(self, site: ConvSite, weight: Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("depthwise-separable") is not None:
            return []
        if stats is not None and site.spec.groups > 1:
            return []
        i, o, k, big_g, bias = _dims(site)
        w = factorize.dense_weight(weight.detach().to(torch.float64), big_g).reshape(o, i, k)
        total = float(w.square().sum())
        mode_o, mode_i = w.reshape(o, i * k), w.transpose(0, 1).reshape(i, o * k)
        u = torch.linalg.eigh(mode_o @ mode_o.mT).eigenvectors.flip(-1)  # descending
        v = torch.linalg.eigh(mode_i @ mode_i.mT).eigenvectors.flip(-1)
        core = torch.einsum("oik,op,iq->pqk", w, u, v).square().sum(dim=-1)  # energy per (mode-O, mode-I) pair
        kept = core.cumsum(0).cumsum(1)  # kept[a, b]: energy of the top a+1 x b+1 core
        full = max(min(o, i * k), min(i, o * k))
        top = full if self.max_rank is None else min(full, self.max_rank)
        pix_out, pix_in = _pixels(site.output_shape, o), _pixels(site.input_shape, i)
        out = []
        calibrated = tucker2_output_errors(stats, u, v, range(1, top + 1)) if stats is not None else None
        for r in range(1, top + 1):
            energy = float(kept[min(r, o) - 1, min(r, i) - 1])
            err = 0.0 if r >= full or total <= 0.0 else math.sqrt(min(max(total - energy, 0.0) / total, 1.0))
            if calibrated is not None:
                err = 0.0 if r >= full else calibrated[r - 1]
            params = i * r + r * r * k + o * r
            macs = pix_in * i * r + pix_out * (r * r * k + o * r)
            out.append(make_candidate(self.pass_name, {"groups": 1, "rank": r}, macs, params + bias, err))
        return out


_FORMS: dict[str, Callable[..., Form]] = {"depthwise-separable": DepthwiseSeparableForm,
                                          "grouped-separable": GroupedSeparableForm, "grouped": GroupedForm,
                                          "tucker2": Tucker2Form}
_FORM_SPEC = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^{}]*)\})?\s*$")


def make_form(spec: str | Form) -> Form:
    """A form from its name, optionally with options: ``"grouped-separable{groups=4|8, max_rank=16}"``
    (``|`` separates several group counts). Form objects pass through.

    >>> make_form("grouped{groups=2|4}")
    GroupedForm(groups=(2, 4), name='grouped', pass_name='grouped')
    """
    if not isinstance(spec, str):
        if isinstance(spec, Form):
            return spec
        raise ConfigError(f"forms must be names ({', '.join(_FORMS)}) or Form objects, got {spec!r}")
    m = _FORM_SPEC.match(spec)
    if not m or m.group(1) not in _FORMS:
        raise ConfigError(f"unknown budget form {spec!r}; valid: {', '.join(_FORMS)} (options in braces, e.g. "
                          "grouped-separable{groups=4|8})")
    cls = _FORMS[m.group(1)]
    names = {f.name for f in dataclasses.fields(cls)} - {"name", "pass_name"}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for item in (s for s in (m.group(2) or "").split(",") if s.strip()):
        key, _, value = (p.strip() for p in item.partition("="))
        if key not in names:
            raise ConfigError(f"budget form {m.group(1)!r}: unknown option {key!r}; valid: {', '.join(sorted(names))}")
        try:
            values = tuple(int(v) for v in value.split("|"))
        except ValueError as exc:
            raise ConfigError(f"budget form {m.group(1)!r}: {key}={value!r} must be integers") from exc
        kwargs[key] = values if key == "groups" else values[0]
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------------ optimiser


@dataclass(frozen=True)
class _Problem:
    """Per constraint and site: candidate costs; per site: weighted losses; index 0 is always "keep" (zero loss).
    The constraints are MACs, params and (latency targets) latency, each with its budget for the sites together
    (inf: no constraint)."""

    costs: tuple[tuple[np.ndarray, ...], ...]  # costs[c][s]
    errors: tuple[np.ndarray, ...]  # w_s * loss(e_s)
    budgets: tuple[float, ...]

    def totals(self, choice: Sequence[int]) -> tuple[list[float], float]:
        costs = [sum(float(cost[s][j]) for s, j in enumerate(choice)) for cost in self.costs]
        return costs, sum(float(self.errors[s][j]) for s, j in enumerate(choice))

    def feasible(self, choice: Sequence[int]) -> bool:
        costs, _ = self.totals(choice)
        return all(c <= b for c, b in zip(costs, self.budgets, strict=True))


def _hull(cost: np.ndarray, err: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of (cost, err) from candidate 0 (keep) towards the cheapest candidate."""
    keep_cost = cost[0]
    idx = [j for j in range(len(cost)) if cost[j] < keep_cost]
    idx.sort(key=lambda j: (cost[j], err[j]))
    chain: list[int] = []
    for j in [*idx, 0]:  # monotone chain, left to right, ending at keep (the lowest error)
        while len(chain) >= 2:
            a, b = chain[-2], chain[-1]
            cross = (cost[b] - cost[a]) * (err[j] - err[a]) - (err[b] - err[a]) * (cost[j] - cost[a])
            if cross <= 0:
                chain.pop()
            else:
                break
        if chain and cost[chain[-1]] == cost[j]:
            if err[j] < err[chain[-1]]:
                chain[-1] = j
            continue
        chain.append(j)
    return chain[::-1]  # keep first


def _greedy(p: _Problem, scales: Sequence[float]) -> list[int] | None:
    """Walk every site's hull of the scalar cost ``sum_c scales[c] * cost_c`` by least error per cost saved until
    every constraint holds."""
    n = len(p.errors)
    scalar = [sum(a * p.costs[c][s] for c, a in enumerate(scales) if a) for s in range(n)]
    hulls = [_hull(scalar[s], p.errors[s]) for s in range(n)]
    pos = [0] * n
    choice = [0] * n
    tot = [sum(float(cost[s][0]) for s in range(n)) for cost in p.costs]
    heap: list[tuple[float, int]] = []

    def push(s: int) -> None:
        h, t = hulls[s], pos[s]
        if t + 1 < len(h):
            cur, nxt = h[t], h[t + 1]
            saved = scalar[s][cur] - scalar[s][nxt]
            heapq.heappush(heap, ((p.errors[s][nxt] - p.errors[s][cur]) / max(saved, _EPS), s))

    for s in range(n):
        push(s)
    while any(t > b for t, b in zip(tot, p.budgets, strict=True)):
        if not heap:
            return None
        _, s = heapq.heappop(heap)
        old, new = hulls[s][pos[s]], hulls[s][pos[s] + 1]
        for c, cost in enumerate(p.costs):
            tot[c] += float(cost[s][new] - cost[s][old])
        pos[s] += 1
        choice[s] = new
        push(s)
    return choice


def _padded(arrays: Sequence[np.ndarray], fill: float) -> np.ndarray:
    width = max(len(x) for x in arrays)
    out = np.full((len(arrays), width), fill, dtype=np.float64)
    for s, x in enumerate(arrays):
        out[s, :len(x)] = x
    return out


def _repair(p: _Problem, choice: list[int]) -> list[int]:
    """Spend the slack: repeatedly apply the single-site change that lowers the error most and still fits."""
    if not choice:
        return choice
    costs = [_padded(c, np.inf) for c in p.costs]
    errors = _padded(p.errors, np.inf)
    rows = np.arange(len(choice))
    cur = np.array(choice)
    while True:
        # first, each site to its cheapest candidate (by MACs, then params, then latency) no worse in error and cost
        mask = errors <= errors[rows, cur][:, None]
        for c in costs:
            mask &= c <= c[rows, cur][:, None]
        for c in costs:
            mask &= c == np.where(mask, c, np.inf).min(axis=1, keepdims=True)
        cur = np.argmax(mask, axis=1)
        gain = errors[rows, cur][:, None] - errors
        ok = gain > _EPS
        for c, budget in zip(costs, p.budgets, strict=True):
            ok &= c[rows, cur].sum() + (c - c[rows, cur][:, None]) <= budget
        if not ok.any():
            return [int(j) for j in cur]
        score = np.where(ok, gain, -np.inf)
        s, j = np.unravel_index(int(np.argmax(score)), score.shape)
        cur[s] = j


def _dp(p: _Problem, buckets: int, constraint: int) -> list[int] | None:
    """Multiple-choice knapsack by DP on one constraint, costs rounded up to ``budget / buckets`` units."""
    costs = p.costs[constraint]
    budget = p.budgets[constraint]
    if budget < 0:
        return None
    integral = all(np.all(c == np.floor(c)) and np.all(np.abs(c) < 2**62) for c in costs)
    unit = max(budget / buckets, _EPS)
    if integral:  # integer costs: the common divisor of all costs is an exact unit when it is coarse enough
        step = float(np.gcd.reduce(np.concatenate([c.astype(np.int64) for c in costs])) or 1)
        unit = step if budget / step <= buckets else max(unit, step)
    size = math.floor(budget / unit)
    f = np.full(size + 1, np.inf)
    f[0] = 0.0
    picks = []
    for c, e in zip(costs, p.errors, strict=True):
        q = np.ceil(c / unit - 1e-9).astype(np.int64)
        g = np.full(size + 1, np.inf)
        arg = np.zeros(size + 1, dtype=np.int32)
        for j in np.argsort(e):
            if q[j] > size:
                continue
            shifted = f[:size + 1 - q[j]] + e[j]
            better = shifted < g[q[j]:]
            g[q[j]:][better] = shifted[better]
            arg[q[j]:][better] = j
        f = g
        picks.append(arg)
    if not np.isfinite(f).any():
        return None
    b = int(np.argmin(f))
    choice = [0] * len(costs)
    for s in range(len(costs) - 1, -1, -1):
        j = int(picks[s][b])
        choice[s] = j
        b -= int(np.ceil(costs[s][j] / unit - 1e-9))
    return choice


def _scales(binding: Sequence[int], need: Sequence[float], n: int) -> list[list[float]]:
    """Greedy scalarisations: the binding constraint alone, or points inside the simplex of the binding ones, each
    normalised by how much that constraint must save."""
    points: list[tuple[float, ...]]
    if len(binding) == 1:
        points = [(1.0,)]
    elif len(binding) == 2:
        points = [(t, 1.0 - t) for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    else:
        points = [(a / 6, b / 6, (6 - a - b) / 6) for a in range(1, 5) for b in range(1, 6 - a)]
    out = []
    for pt in points:
        row = [0.0] * n
        for c, w in zip(binding, pt, strict=True):
            row[c] = w / need[c]
        out.append(row)
    return out


def optimise(macs: Sequence[Sequence[float]], params: Sequence[Sequence[float]], errors: Sequence[Sequence[float]],
             macs_budget: float = math.inf, params_budget: float = math.inf, *,
             latency: Sequence[Sequence[float]] | None = None, latency_budget: float = math.inf,
             method: str = "auto", buckets: int | None = None) -> list[int] | None:
    """The multiple-choice knapsack on its own: per site, candidate costs (MACs, params and optionally latency)
    and (weighted) losses with candidate 0 the zero-error "keep"; returns the chosen index per site with every sum
    within its budget and the least total error found, or None when none is feasible.

    >>> optimise([[4, 2, 1], [4, 3, 1]], [[0, 0, 0], [0, 0, 0]], [[0, 1, 3], [0, 0.5, 4]], macs_budget=5)
    [1, 1]
    >>> optimise([[4, 2, 1], [4, 3, 1]], [[0, 0, 0], [0, 0, 0]], [[0, 1, 3], [0, 0.5, 4]],
    ...          latency=[[3.0, 2.5, 1.0], [3.0, 1.0, 0.5]], latency_budget=4.0)
    [0, 1]
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    tables = [macs, params] + ([latency] if latency is not None else [])
    budgets = [macs_budget, params_budget] + ([latency_budget] if latency is not None else [])
    zeroed = (np.asarray(x, dtype=np.float64) for x in errors)
    p = _Problem(tuple(tuple(np.asarray(x, dtype=np.float64) for x in t) for t in tables),
                 tuple(np.where(x < _ZERO, 0.0, x) for x in zeroed), tuple(float(b) for b in budgets))
    n = len(p.errors)
    if n == 0:
        return [] if p.feasible([]) else None
    found: list[list[int]] = []
    need = [sum(float(x[0]) for x in cost) - budget for cost, budget in zip(p.costs, p.budgets, strict=True)]
    binding = [c for c, v in enumerate(need) if v > 0]
    if not binding:
        return [0] * n  # keeping everything fits
    one = len(binding) == 1
    if method == "dp" and not one:
        raise ConfigError("method='dp' handles one binding constraint (macs, params or latency); use 'greedy' or "
                          "'auto' when several bind")
    if method in ("auto", "greedy"):
        for scales in _scales(binding, need, len(p.costs)):
            choice = _greedy(p, scales)
            if choice is not None:
                found.append(_repair(p, choice))
    if one and method in ("auto", "dp"):
        if buckets is None:
            work = sum(len(x) for x in p.errors)
            buckets = int(min(1 << 16, max(1 << 12, 4e7 // max(work, 1))))
        choice = _dp(p, buckets, binding[0])
        if choice is not None and p.feasible(choice):
            found.append(_repair(p, choice))
    found = [c for c in found if p.feasible(c)]
    if not found:
        return None
    return min(found, key=lambda c: p.totals(c)[1])


# -------------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class SiteChoice:
    """The chosen candidate at one site, its cost before, its importance weight and how many candidates it had;
    with a latency target also the original conv's latency and how many measured candidates were pruned for not
    being faster than it."""

    site: str
    candidate: Candidate
    macs_before: int
    params_before: int
    weight: float = 1.0
    candidates: int = 1
    latency_before_ms: float | None = None
    pruned_slower: int = 0

    @property
    def changed(self) -> bool:
        return self.candidate.form != KEEP

    @property
    def predicted_rel_error(self) -> float:
        return self.candidate.rel_error

    def to_dict(self) -> dict[str, Any]:
        out = {"site": self.site, **self.candidate.to_dict(), "macs_before": self.macs_before,
               "params_before": self.params_before, "weight": self.weight, "candidates": self.candidates}
        if self.latency_before_ms is not None:
            out |= {"latency_before_ms": self.latency_before_ms, "pruned_slower": self.pruned_slower}
        return out


@dataclass(frozen=True)
class BudgetPlan:
    """Per-site choices meeting ``target``; model totals before and (predicted by the cost model) after.

    ``objective`` is the value of the objective named ``objective_name`` (see the module docstring); the errors are
    ``error_metric``: ``"weight"`` (data-free) or ``"output"`` (calibration). ``apply(gm)`` runs the passes with one
    exact-name rule per changed site (``rules()`` / ``pipeline()`` give them), so the result replays with
    ``fxrewrite.apply_plan``. With a latency target, ``latency_before_ms`` / ``latency_after_ms`` are the summed
    measured latencies of the conv sites before and (predicted from the per-layer figures) after, and
    ``latency_info`` says how they were measured; ``latency_check(report)`` compares the prediction with a
    whole-model measurement.
    """

    target: Target
    choices: tuple[SiteChoice, ...]
    macs_before: int
    params_before: int
    macs_after: int
    params_after: int
    objective: float
    method: str
    forms: tuple[str, ...]
    seconds: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    excluded: tuple[tuple[str, str], ...] = ()  # (site, why it has no candidates)
    objective_name: str = "log-cosine"
    error_metric: str = "weight"
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    latency_info: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def macs_fraction(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_fraction(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def latency_fraction(self) -> float | None:
        if self.latency_before_ms is None or self.latency_after_ms is None or self.latency_before_ms <= 0:
            return None
        return self.latency_after_ms / self.latency_before_ms

    @property
    def changed(self) -> tuple[SiteChoice, ...]:
        return tuple(c for c in self.choices if c.changed)

    def latency_check(self, report: Any) -> dict[str, Any] | None:
        """Predicted vs measured whole-model latency, from a ``fxrewrite.measure.latency.LatencyReport`` of the original and
        the rewritten model on the plan's backend (``cuda``: the report's eager figures on a GPU). The prediction
        is the measured original minus the per-site savings of the plan. None without a latency target or without
        an ``ok`` figure for the backend."""
        if self.latency_before_ms is None or self.latency_after_ms is None or report is None:
            return None
        backend = self.target.backend
        if backend == "cuda":
            if not str(getattr(report, "device", "")).startswith("cuda"):
                return None
            backend = "eager"
        timing = next((b for b in report.backends if b.backend == backend and b.status == "ok"), None)
        if timing is None or timing.original_ms is None or timing.rewritten_ms is None:
            return None
        predicted = timing.original_ms - (self.latency_before_ms - self.latency_after_ms)
        return {"backend": self.target.backend, "threads": report.threads,
                "plan_threads": self.latency_info.get("threads"), "measured_original_ms": timing.original_ms,
                "measured_rewritten_ms": timing.rewritten_ms, "predicted_rewritten_ms": predicted,
                "predicted_over_measured": predicted / timing.rewritten_ms if timing.rewritten_ms > 0 else None,
                "measured_fraction": timing.ratio,
                "predicted_fraction": predicted / timing.original_ms if timing.original_ms > 0 else None}

    def rules(self) -> dict[str, list[Rule]]:
        """Per pass name (in the order the plan applies them), one exact-name rule per site with its options."""
        out: dict[str, list[Rule]] = {}
        for c in self.changed:
            out.setdefault(c.candidate.form, []).append(Rule(c.site, options=c.candidate.options))
        return out

    def pipeline(self, *, structure_only: bool = False) -> list[tuple[Any, list[Rule]]]:
        """``[(pass, rules), ...]``: run each pass with its own rules (``pass.run(gm, rules)``), in order.
        ``structure_only`` builds the new modules with ``init=random`` (no factorisation: fast, for costs)."""
        out = []
        for name, rules in self.rules().items():
            cls = pass_class(name)
            if structure_only:
                rules = [dataclasses.replace(r, options=MappingProxyType({**r.options, "init": "random"}))
                         for r in rules]
            out.append((cls(), rules))
        return out

    def apply(self, gm: torch.fx.GraphModule, *, structure_only: bool = False) -> Any:
        """Rewrite ``gm`` in place with the plan; returns a ``PassResult`` whose records are the rewritten sites
        (their ``details`` carry ``budget_predicted_rel_error``). Raises ``ConfigError`` if a pass declines a site
        the plan chose (the plan was made for another graph). ``structure_only``: see ``pipeline``."""
        from fxrewrite.graph.rewriter import portable
        from fxrewrite.passes import PassManager, PassResult
        predicted = {c.site: c for c in self.changed}
        records = []
        modified = False
        for p, rules in self.pipeline(structure_only=structure_only):
            result = PassManager([p], rules)(gm)
            gm = result.graph_module
            modified |= result.modified
            names = {r.match for r in rules}
            for r in result.records:
                if r.site not in names:
                    continue
                if r.status != "rewritten":
                    raise ConfigError(f"budget plan: pass {p.name!r} did not rewrite {r.site!r} ({r.code}: "
                                      f"{r.reason}); the plan was chosen on a different graph, choose it again.")
                extra = {"budget_predicted_rel_error": predicted[r.site].predicted_rel_error,
                         "budget_weight": predicted[r.site].weight}
                records.append(dataclasses.replace(r, details=MappingProxyType({**r.details, **extra})))
        return PassResult(portable(gm), modified, tuple(records))

    def to_rewrite_plan(self, input_shapes: Sequence[Sequence[int]] | None = None) -> Any:
        """The replayable ``fxrewrite.RewritePlan`` of this plan (``apply_plan(fresh_model, plan)`` rebuilds the
        architecture; load the rewritten weights afterwards)."""
        from fxrewrite.io.replay import PlanEntry, RewritePlan
        entries = tuple(PlanEntry(c.site, c.candidate.form, MappingProxyType(dict(c.candidate.options)))
                        for form in self.rules() for c in self.changed if c.candidate.form == form)
        shapes = tuple(tuple(int(d) for d in s) for s in input_shapes) if input_shapes is not None else None
        return RewritePlan(entries, shapes)

    def to_dict(self, result: Any = None, latency: Any = None) -> dict[str, Any]:
        """The plan as plain data. With the ``RewriteResult`` / ``PassResult`` of applying it, every site also gets
        ``measured_rel_error`` (the weight error the pass reports) and, when verified, ``measured_output_rel_l2``
        (the site's local output error). With a latency target, ``latency`` has the per-layer totals and, given a
        ``LatencyReport`` (``latency=`` or ``result.latency``), the predicted vs measured model latency."""
        weight_err, out_err = _measured(result)
        sites = []
        for c in self.choices:
            d = c.to_dict()
            if c.site in weight_err:
                d["measured_rel_error"] = weight_err[c.site]
            if c.site in out_err:
                d["measured_output_rel_l2"] = out_err[c.site]
            sites.append(d)
        return {"target": self.target.to_dict(), "method": self.method, "forms": list(self.forms),
                "objective": self.objective, "objective_name": self.objective_name,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_fraction": self.macs_fraction, "params_fraction": self.params_fraction,
                "error_metric": self.error_metric, "seconds": dict(self.seconds), "sites": sites,
                "excluded": [{"site": s, "reason": r} for s, r in self.excluded]} | self._latency_dict(result, latency)

    def _latency_dict(self, result: Any, latency: Any) -> dict[str, Any]:
        if self.latency_before_ms is None:
            return {}
        check = self.latency_check(latency if latency is not None else getattr(result, "latency", None))
        return {"latency": {"sites_before_ms": self.latency_before_ms, "sites_after_ms": self.latency_after_ms,
                            "sites_fraction": self.latency_fraction, **self.latency_info,
                            "pruned_slower": sum(c.pruned_slower for c in self.choices),
                            "model": check}}

    def to_json(self, indent: int | None = 2, result: Any = None, latency: Any = None) -> str:
        return json.dumps(self.to_dict(result, latency), indent=indent)

    def save(self, path: str | Path, result: Any = None, input_shapes: Sequence[Sequence[int]] | None = None
             ) -> Path:
        """Write the plan atomically as a ``fxrewrite.RewritePlan`` JSON (``RewritePlan.load`` + ``apply_plan``
        replay it) with the budget plan under ``"budget"``: per site the choice, cost, predicted error and, given
        ``result``, the measured errors. ``input_shapes`` default to those recorded in ``result``'s report."""
        from fxrewrite.io.artifacts import atomic_write_text
        if input_shapes is None:
            shapes = getattr(getattr(result, "report", None), "context", {}).get("input_shapes")
            input_shapes = shapes if isinstance(shapes, list | tuple) else None
        doc = self.to_rewrite_plan(input_shapes).to_dict() | {"budget": self.to_dict(result)}
        return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")

    def table(self, result: Any = None, tablefmt: str = "simple", latency: Any = None) -> str:
        """Per-site choice, cost and predicted error (and, with a latency target, latency before / after and the
        candidates pruned as not faster); with a ``RewriteResult`` (or ``PassResult``) also the measured weight
        error and, when verified, the measured local output error (rel. L2)."""
        measured_w, measured_out = _measured(result)
        timed = self.latency_before_ms is not None
        rows = []
        for c in self.choices:
            row = [c.site, c.candidate.spec(), f"{c.macs_before:,}", f"{c.candidate.macs:,}",
                   f"{c.params_before:,}", f"{c.candidate.params:,}", f"{c.predicted_rel_error:.4f}"]
            if timed:
                row += [f"{c.latency_before_ms:.3f}", f"{c.candidate.latency_ms:.3f}", c.pruned_slower]
            if result is not None:
                w = measured_w.get(c.site)
                row += ["" if w is None else f"{w:.4f}",
                        f"{measured_out[c.site]:.4f}" if c.site in measured_out else ""]
            rows.append(row)
        err = "pred. w-err" if self.error_metric == "weight" else "pred. out-err"
        headers = ["site", "choice", "MACs before", "MACs after", "params before", "params after", err]
        if timed:
            headers += ["ms before", "ms after", "pruned"]
        if result is not None:
            headers += ["meas. w-err", "meas. out-err"]
        head = (f"budget plan ({self.target.describe()}; {self.method}): MACs {self.macs_before:,} -> "
                f"{self.macs_after:,} ({self.macs_fraction:.3f}x), params {self.params_before:,} -> "
                f"{self.params_after:,} ({self.params_fraction:.3f}x); {self.objective_name} objective "
                f"{self.objective:.4g} ({self.error_metric} errors); "
                f"{len(self.changed)} of {len(self.choices)} candidate sites changed")
        if timed:
            info = self.latency_info
            head += (f"\nconv-site latency ({info.get('backend')}, {info.get('threads')} thread(s), median of "
                     f"{info.get('runs')} after {info.get('warmup')} warm-up): {self.latency_before_ms:.3f} ms -> "
                     f"{self.latency_after_ms:.3f} ms ({self.latency_fraction:.3f}x) predicted")
            check = self.latency_check(latency if latency is not None else getattr(result, "latency", None))
            if check is not None:
                head += (f"; model: measured {check['measured_original_ms']:.3f} ms -> "
                         f"{check['measured_rewritten_ms']:.3f} ms, predicted {check['predicted_rewritten_ms']:.3f} "
                         f"ms (predicted / measured {check['predicted_over_measured']:.3f})")
        return head + "\n" + tabulate(rows, headers=headers, tablefmt=tablefmt)

    def __str__(self) -> str:
        return self.table()


def _measured(result: Any) -> tuple[dict[str, float | None], dict[str, float]]:
    """Per site, from a ``RewriteResult`` / ``PassResult``: the weight error the pass reported and (verified only)
    the local output error."""
    weight_err: dict[str, float | None] = {}
    out_err: dict[str, float] = {}
    if result is None:
        return weight_err, out_err
    for r in getattr(getattr(result, "report", result), "records", ()) or ():
        if r.status == "rewritten":
            weight_err[r.site] = r.rel_error
    for check in getattr(getattr(result, "verification", None), "sites", ()) or ():
        if check.local is not None:
            out_err[check.site] = check.local.rel_l2
    return weight_err, out_err


def parse_forms(text: str) -> list[Form]:
    """Forms from a comma-separated list (commas inside braces belong to the options), e.g. the CLI's ``--forms``.

    >>> [f.name for f in parse_forms("depthwise-separable, grouped-separable{groups=4|8, max_rank=16}")]
    ['depthwise-separable', 'grouped-separable']
    """
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    forms = [make_form(p.strip()) for p in parts if p.strip()]
    if not forms:
        raise ConfigError(f"no budget forms in {text!r}; valid: {', '.join(_FORMS)}")
    return forms


def _weights_of(gm: torch.fx.GraphModule, site: ConvSite) -> Tensor | None:
    from fxrewrite.passes.base import conv_module
    w = conv_module(gm, site).weight
    return None if w.is_meta else w


def _prune(cands: list[Candidate], timed: bool = False) -> list[Candidate]:
    """Drop candidates another one dominates (no more MACs, params, latency when ``timed``, or error, and less of
    one) and exact duplicates; keep (index 0) always stays first."""
    keep = cands[0]
    rest = [c for c in cands[1:] if c.macs < keep.macs or c.params < keep.params
            or (timed and c.latency_ms is not None and keep.latency_ms is not None and c.latency_ms < keep.latency_ms)]
    cols = [lambda c: c.macs, lambda c: c.params] + ([lambda c: c.latency_ms] if timed else []) + [
        lambda c: c.rel_error]
    a = np.array([[f(c) for f in cols] for c in rest], dtype=np.float64).reshape(-1, len(cols))
    kept = [c for c, ok in zip(rest, _pareto_mask(a), strict=True) if ok]
    return [keep, *sorted(kept, key=lambda c: (c.macs, c.params))]


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _infeasible(target: Target, what: str, frac: float, before: float, fixed: float, minimum: float, n_sites: int,
                forms: Sequence[str], excluded: Sequence[tuple[str, str]]) -> BudgetInfeasible:
    reachable = (fixed + minimum) / before if before else 1.0
    if what == "latency":
        why = [f"target latency <= {frac:g}x cannot be met on {target.backend}: the conv sites of the original take "
               f"{before:.3f} ms, so the budget is {frac * before:.3f} ms; the fastest plan with forms "
               f"{', '.join(forms)} reaches {fixed + minimum:.3f} ms ({reachable:.4f}x): {fixed:.3f} ms are in "
               f"convolutions that cannot be rewritten or have no faster candidate, and the {n_sites} rewritable "
               f"sites take at least {minimum:.3f} ms."]
    else:
        label = "MACs" if what == "macs" else what
        why = [f"target {what} <= {frac:g}x cannot be met: the original has {_fmt(before)} {label}, so the "
               f"budget is {_fmt(frac * before)}; the cheapest plan with forms {', '.join(forms)} reaches "
               f"{_fmt(fixed + minimum)} ({reachable:.4f}x): {_fmt(fixed)} are outside the {n_sites} rewritable "
               f"sites (linear layers, ineligible or unselected convolutions) and those sites cost at least "
               f"{_fmt(minimum)}."]
    if excluded:
        shown = "; ".join(f"{s}: {r}" for s, r in excluded[:3])
        why.append(f"Not rewritable: {shown}{' ...' if len(excluded) > 3 else ''}.")
    why.append(f"Use a target of at least {math.ceil(reachable * 1e4) / 1e4:g}, or allow more forms.")
    return BudgetInfeasible(" ".join(why))


def _site_candidates(site: ConvSite, weight: Tensor, forms: Sequence[Form], stats: SiteStats | None
                     ) -> list[Candidate]:
    cands = [make_candidate(KEEP, {}, site.macs, site.params, 0.0)]
    with factorize.one_thread() if stats is None else contextlib.nullcontext():  # calibration: large GEMMs, all threads
        for f in forms:
            cands.extend(f.candidates(site, weight) if stats is None else f.candidates(site, weight, stats))  # type: ignore[call-arg]
    return _prune(cands)


@dataclass(frozen=True)
class _Timed:
    """Latency-mode results: per site the original conv's latency, candidates pruned as not faster, and counts."""

    keep_ms: Mapping[str, float]
    pruned: Mapping[str, int]
    off_grid: int
    configs: int


def _time_candidates(considered: list[tuple[ConvSite, list[Candidate]]], sites: Sequence[ConvSite],
                     timing: Any) -> tuple[list[tuple[ConvSite, list[Candidate]]], _Timed]:
    """Measure (or look up) every site's original conv and every candidate once per distinct configuration; drop
    candidates not faster than the original (counted per site) and those off the rank grid (``rank_grid``)."""
    from fxrewrite.budget.layer_latency import LayerConfig, build_module, on_rank_grid
    refs = {s.name: LayerConfig.of(s) for s in sites}
    groups: dict[Any, list[Any]] = {ref: [] for ref in refs.values()}
    builders: dict[Any, Callable[[], nn.Module]] = {}
    wanted: list[list[tuple[Candidate, Any]]] = []
    off_grid = 0
    for site, cands in considered:
        ref = refs[site.name]
        rows = []
        for c in cands[1:]:
            if timing.rank_grid and "rank" in c.options and not on_rank_grid(int(c.options["rank"])):
                off_grid += 1
                continue
            cfg = ref.replace_form(c.form, c.options)
            groups[ref].append(cfg)
            builders.setdefault(cfg, functools.partial(build_module, cfg, site))
            rows.append((c, cfg))
        wanted.append(rows)
    values = timing.latencies(groups, builders)
    keep_ms = {name: values[ref] for name, ref in refs.items()}
    pruned: dict[str, int] = {}
    out = []
    for (site, cands), rows in zip(considered, wanted, strict=True):
        base = keep_ms[site.name]
        faster = [dataclasses.replace(c, latency_ms=values[cfg]) for c, cfg in rows if values[cfg] < base]
        pruned[site.name] = len(rows) - len(faster)
        out.append((site, _prune([dataclasses.replace(cands[0], latency_ms=base), *faster], timed=True)))
    n_configs = len(groups) + len({c for v in groups.values() for c in v})
    return out, _Timed(MappingProxyType(keep_ms), MappingProxyType(pruned), off_grid, n_configs)


def choose_plan(gm: torch.fx.GraphModule, target: Target, forms: str | Iterable[str | Form] = DEFAULT_FORMS, *,
                select: Any = None, weights: Mapping[str, float] | None = None, method: str = "auto",
                objective: str = "log-cosine", buckets: int | None = None, calibration: Iterable[Any] | None = None,
                input_fn: Callable[[Any], Sequence[Any]] | None = None, latency: Any = None,
                max_gram_bytes: int = 1 << 30) -> BudgetPlan:
    """Choose one candidate per site (or keep it) so that the model meets ``target`` with the least objective,
    ``sum(w_s * loss(e_s))`` (see the module docstring). ``gm`` must carry shapes (``propagate_shapes``); nothing is
    changed. ``forms``: names, Form objects or a comma-separated string (``parse_forms``). ``select`` restricts the
    sites (names, globs, ``Rule``s as in ``fxrewrite.graph.select``); ``weights`` maps site names to importance weights
    (default 1); ``method`` and ``objective``: see the module docstring. Raises ``BudgetInfeasible`` when no plan
    meets the target.

    ``calibration`` (input tuples or tensors, read once per chunk of sites whose Gram matrices fit
    ``max_gram_bytes``; ``input_fn`` maps items to inputs): each candidate's error is then its relative output
    error on these activations, ``sqrt(trace(dW G dW^T) / sum ||y||^2)`` with ``G`` the Gram of the site's unfolded
    input (``collect_site_stats``), instead of the weight error.

    ``target.latency``: every site's original conv and every candidate are timed once per distinct configuration
    on ``target.backend`` (``latency``: a ``fxrewrite.budget.layer_latency.LayerLatency`` with the runs, threads, cache
    and timer; default ``LayerLatency(backend=target.backend)``); a candidate not faster than the original conv is
    never chosen, and the summed site latencies stay within the target.
    """
    if not isinstance(target, Target):
        raise ConfigError(f"target must be a fxrewrite.budget.budget.Target, got {type(target).__name__}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    timing = _timing(target, latency)
    start = time.perf_counter()
    form_objs = parse_forms(forms) if isinstance(forms, str) else [make_form(f) for f in forms]
    if not form_objs:
        raise ConfigError(f"choose_plan needs at least one form; valid: {', '.join(_FORMS)}")
    for f in form_objs:
        pass_class(f.pass_name)
    if calibration is not None:
        blind = [f.name for f in form_objs if not getattr(f, "calibrated", False)]
        if blind:
            raise ConfigError(f"form(s) {blind} cannot predict output errors from calibration data (they need "
                              "`calibrated = True` and candidates(site, weight, stats)); drop them or calibration=")
    weights = dict(weights or {})
    bad = {k: v for k, v in weights.items() if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0)}
    if bad:
        raise ConfigError(f"weights must be finite numbers >= 0, got {bad}")
    sites = find_sites(gm)
    if any(s.output_shape is None or s.input_shape is None for s in sites):
        missing = next(s.name for s in sites if s.output_shape is None or s.input_shape is None)
        raise ConfigError(f"site {missing!r} has no shape: run fxrewrite.graph.shapes.propagate_shapes(gm, inputs) before "
                          "choose_plan (rewrite(..., target=...) does this for you)")
    unknown = sorted(set(weights) - {s.name for s in sites})
    if unknown:
        raise ConfigError(f"weights name sites that do not exist: {unknown}")
    rules = parse_rules(select)
    selected = {k: v.selected for k, v in resolve(rules, sites).items()} if rules else {}
    before = model_cost(gm)
    eligible: dict[str, tuple[ConvSite, Tensor]] = {}
    reasons: dict[str, str] = {}
    for site in sites:
        if rules and not selected.get(site.name, False):
            reasons[site.name] = "not selected"
        elif site.blocker is not None:
            reasons[site.name] = str(site.blocker)
        elif (weight := _weights_of(gm, site)) is None:
            reasons[site.name] = "meta-weight: no values to factorise"
        else:
            eligible[site.name] = (site, weight)
    found: dict[str, list[Candidate]] = {}
    if calibration is not None:
        for site, stats in collect_site_stats(gm, [s for s, _ in eligible.values()], calibration, input_fn=input_fn,
                                              max_bytes=max_gram_bytes):
            found[site.name] = _site_candidates(site, eligible[site.name][1], form_objs, stats)
    else:
        found = {name: _site_candidates(site, w, form_objs, None) for name, (site, w) in eligible.items()}
    considered: list[tuple[ConvSite, list[Candidate]]] = []
    excluded: list[tuple[str, str]] = []
    for site in sites:
        if site.name in reasons:
            excluded.append((site.name, reasons[site.name]))
        elif len(found[site.name]) == 1:
            why = sorted({str(r) for _, r in site.eligibility if r is not None})
            excluded.append((site.name, "; ".join(why) or "no cheaper candidate"))
        else:
            considered.append((site, found[site.name]))
    t_candidates = time.perf_counter() - start
    timed = None
    if timing is not None:
        considered, timed = _time_candidates(considered, sites, timing)
        slow = [s.name for s, cands in considered if len(cands) == 1]
        excluded += [(n, f"no candidate is faster than the original on {target.backend} ({timed.pruned[n]} "
                      "measured)") for n in slow]
        considered = [(s, cands) for s, cands in considered if len(cands) > 1]
    t_latency = time.perf_counter() - start - t_candidates

    fixed_m = before.macs - sum(s.macs for s, _ in considered)
    fixed_p = before.params - sum(s.params for s, _ in considered)
    budget_m = math.floor(target.macs * before.macs) if target.macs is not None else math.inf
    budget_p = math.floor(target.params * before.params) if target.params is not None else math.inf
    lat_before = sum(timed.keep_ms.values()) if timed is not None else 0.0
    fixed_l = lat_before - sum(timed.keep_ms[s.name] for s, _ in considered) if timed is not None else 0.0
    budget_l = target.latency * lat_before if target.latency is not None else math.inf
    names = [f.name for f in form_objs]
    for what, frac, budget, fixed, total, key in (
            ("macs", target.macs, budget_m, fixed_m, before.macs, "macs"),
            ("params", target.params, budget_p, fixed_p, before.params, "params"),
            ("latency", target.latency, budget_l, fixed_l, lat_before, "latency_ms")):
        if frac is None:
            continue
        minimum = sum(min(getattr(c, key) for c in cands) for _, cands in considered)
        if fixed + minimum > budget:
            raise _infeasible(target, what, frac, total, fixed, minimum, len(considered), names, excluded)
    w = [float(weights.get(s.name, 1.0)) for s, _ in considered]
    choice = optimise([[c.macs for c in cands] for _, cands in considered],
                      [[c.params for c in cands] for _, cands in considered],
                      [[wi * _site_loss(c.rel_error, objective) for c in cands]
                       for wi, (_, cands) in zip(w, considered, strict=True)],
                      budget_m - fixed_m, budget_p - fixed_p,
                      latency=[[c.latency_ms for c in cands] for _, cands in considered] if timed else None,
                      latency_budget=budget_l - fixed_l, method=method, buckets=buckets)
    if choice is None:
        raise BudgetInfeasible(f"target {target.describe()} cannot be met jointly with forms {', '.join(names)}: "
                               "each bound is reachable on its own but no plan found meets all of them; relax one.")
    choices = tuple(SiteChoice(s.name, cands[j], s.macs, s.params, wi, len(cands),
                               timed.keep_ms[s.name] if timed else None, timed.pruned[s.name] if timed else 0)
                    for (s, cands), j, wi in zip(considered, choice, w, strict=True))
    macs_after = fixed_m + sum(c.candidate.macs for c in choices)
    params_after = fixed_p + sum(c.candidate.params for c in choices)
    value = sum(c.weight * _site_loss(c.predicted_rel_error, objective) for c in choices)
    seconds = {"candidates": t_candidates, "optimise": time.perf_counter() - start - t_candidates - t_latency}
    extra: dict[str, Any] = {"error_metric": "output" if calibration is not None else "weight"}
    if timed is not None:
        seconds["latency"] = t_latency
        extra |= {"latency_before_ms": lat_before,
                  "latency_after_ms": fixed_l + sum(float(c.candidate.latency_ms or 0.0) for c in choices),
                  "latency_info": MappingProxyType(timing.describe() | {  # type: ignore[union-attr]
                      "configs": timed.configs, "off_grid": timed.off_grid})}
    return BudgetPlan(target, choices, before.macs, before.params, macs_after, params_after, value, method,
                      tuple(names), MappingProxyType(seconds), tuple(excluded), objective_name=objective, **extra)


def _timing(target: Target, latency: Any) -> Any:
    """The LayerLatency of a latency target (None without one)."""
    from fxrewrite.budget.layer_latency import LayerLatency
    if latency is not None and not isinstance(latency, LayerLatency):
        raise ConfigError(f"latency= must be a fxrewrite.budget.layer_latency.LayerLatency, got {type(latency).__name__}")
    if target.latency is None:
        if latency is not None:
            raise ConfigError("latency= says how to measure layers, but the target has no latency bound: use "
                              "Target(latency=...)")
        return None
    if latency is None:
        return LayerLatency(backend=target.backend)
    if latency.backend != target.backend:
        raise ConfigError(f"Target(backend={target.backend!r}) and LayerLatency(backend={latency.backend!r}) "
                          "disagree: set the same backend on both")
    return latency
