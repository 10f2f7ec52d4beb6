"""Budgets: choose one rewrite per convolution site so that the model meets a MAC / parameter target with the least
total predicted error.

``choose_plan(gm, Target(macs=0.5))`` takes a traced GraphModule with shapes (``fxrewrite.shapes.propagate_shapes``)
and, for every eligible site, lists candidates: keep the conv, or each allowed form (``forms``) with each valid rank /
group count. Each candidate's cost (MACs and parameters, the same formulas as ``fxrewrite.cost``) is computed from the
shapes and its predicted error from the trained weight, without data and without building any module:

- depthwise-separable / grouped-separable ``{groups=g, rank=r}``: the energy of the discarded singular values of the
  per-group ``O x (I/g)K`` slices (exactly the weight error the pass will report);
- grouped ``{groups=g}``: the energy outside the block diagonal (``sqrt(1 - kept_energy)``);
- Tucker-2 (``grouped-bottleneck{groups=1, rank=R}``, opt-in form ``"tucker2"``): the error of the truncated HOSVD
  (the pass's ST-HOSVD + HOOI fit usually ends a little below it).

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
>>> from fxrewrite.capture import trace
>>> from fxrewrite.shapes import propagate_shapes
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(16, 32, 3, padding=1))
>>> gm = trace(model)
>>> propagate_shapes(gm, (torch.randn(1, 8, 8, 8),))
>>> plan = choose_plan(gm, Target(macs=0.5))
>>> plan.macs_after <= 0.5 * plan.macs_before
True
>>> result = plan.apply(gm)
>>> from fxrewrite.cost import model_cost
>>> model_cost(result.graph_module).macs == plan.macs_after
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tabulate import tabulate
from torch import Tensor

from fxrewrite import factorize
from fxrewrite.cost import model_cost
from fxrewrite.errors import ConfigError
from fxrewrite.select import Rule, parse_rules, resolve
from fxrewrite.sites import ConvSite, check_groups, find_sites

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
    "Target",
    "Tucker2Form",
    "choose_plan",
    "group_spectra",
    "make_form",
    "optimise",
    "parse_forms",
]

KEEP = "keep"
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
    MACs). At least one must be given; both may be.

    >>> Target(macs=0.5).describe()
    'macs <= 0.5x'
    >>> Target(macs=1.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    fxrewrite.errors.ConfigError: Target: macs=1.5 must be in (0, 1] ...
    """

    macs: float | None = None
    params: float | None = None

    def __post_init__(self) -> None:
        macs, params = _fraction("macs", self.macs), _fraction("params", self.params)
        if macs is None and params is None:
            raise ConfigError("Target needs macs= and/or params= (fractions of the original model's totals), "
                              "e.g. Target(macs=0.5)")
        object.__setattr__(self, "macs", macs)
        object.__setattr__(self, "params", params)

    def describe(self) -> str:
        parts = [f"{k} <= {v:g}x" for k, v in (("macs", self.macs), ("params", self.params)) if v is not None]
        return ", ".join(parts)

    def to_dict(self) -> dict[str, float | None]:
        return {"macs": self.macs, "params": self.params}


@dataclass(frozen=True)
class Candidate:
    """One way to implement a site: ``form`` is a pass's CLI name (``"keep"`` for the original conv) and
    ``options`` its per-site options; ``macs`` / ``params`` are the site's cost after the change and ``rel_error``
    the predicted relative weight error ``||W - W'||_F / ||W||_F``."""

    form: str
    options: Mapping[str, Any]
    macs: int
    params: int
    rel_error: float

    def spec(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.form}{{{opts}}}" if opts else self.form

    def to_dict(self) -> dict[str, Any]:
        return {"form": self.form, "options": dict(self.options), "macs": self.macs, "params": self.params,
                "predicted_rel_error": self.rel_error}


def _candidate(form: str, options: Mapping[str, Any], macs: int, params: int, rel_error: float) -> Candidate:
    return Candidate(form, MappingProxyType(dict(options)), int(macs), int(params), float(rel_error))


# ------------------------------------------------------------------------------------------------ candidate forms


@runtime_checkable
class Form(Protocol):
    """A candidate generator: ``name`` identifies it in ``forms=``; ``pass_name`` is the pass that applies it (the
    candidates' options are that pass's options); ``candidates`` lists every option set it allows at a site, with
    cost and predicted error (no module is built)."""

    name: str
    pass_name: str

    def candidates(self, site: ConvSite, weight: Tensor) -> list[Candidate]: ...


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
            a = factorize._group_matrices(w, source_groups, g)
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
            a = factorize._group_matrices(w, source_groups, g)
            tall[g] = a.mT @ a
    grams |= tall
    return {g: torch.linalg.eigvalsh(grams[g]).flip(-1).clamp_min(0.0) for g in levels}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The spectra are many small GEMMs and batched ``eigvalsh`` calls that spend their time synchronising threads
    (4-15x slower with two threads than with one on a busy 2-core machine); run them on one, then restore."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


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
                          max_rank: int | None, with_groups: bool) -> list[Candidate]:
    i, o, k, big_g, bias = _dims(site)
    group_counts = list(group_counts)
    if not group_counts:
        return []
    pix = _pixels(site.output_shape, o)
    total = float(weight.detach().to(torch.float64).square().sum())
    spectra = group_spectra(weight, big_g, group_counts)
    rows, opts = [], []
    for g in group_counts:
        errors = _tail_errors(spectra[g], total)
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
        out.append(_candidate(form, {"groups": g, "rank": r} if with_groups else {"rank": r}, int(a[j, 0]),
                              int(a[j, 1]), float(a[j, 2])))
    return out


@dataclass(frozen=True)
class DepthwiseSeparableForm:
    """``depthwise-separable{rank=T}`` for T = 1 .. the exact rank (or ``max_rank``)."""

    max_rank: int | None = None
    name: str = "depthwise-separable"
    pass_name: str = "depthwise-separable"

    def candidates(self, site: ConvSite, weight: Tensor) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("depthwise-separable") is not None:
            return []
        return _separable_candidates(self.pass_name, site, weight, [site.spec.in_channels], self.max_rank, False)


@dataclass(frozen=True)
class GroupedSeparableForm:
    """``grouped-separable{groups=g, rank=r}`` for every valid g (or those in ``groups``) below in_channels (g =
    in_channels is depthwise-separable) and r = 1 .. the exact rank (or ``max_rank``)."""

    groups: tuple[int, ...] | None = None
    max_rank: int | None = None
    name: str = "grouped-separable"
    pass_name: str = "grouped-separable"

    def candidates(self, site: ConvSite, weight: Tensor) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("grouped-separable") is not None:
            return []
        s = site.spec
        options = self.groups if self.groups is not None else range(2, s.in_channels)
        valid = [g for g in options if g != s.groups and g >= 1 and check_groups(site, g, out_divisible=False) is None]
        return _separable_candidates(self.pass_name, site, weight, valid, self.max_rank, True)


@dataclass(frozen=True)
class GroupedForm:
    """``grouped{groups=g}`` for every valid g (or those in ``groups``): block-diagonal truncation."""

    groups: tuple[int, ...] | None = None
    name: str = "grouped"
    pass_name: str = "grouped"

    def candidates(self, site: ConvSite, weight: Tensor) -> list[Candidate]:
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
            kept = float(torch.diagonal(energy.reshape(g, o // g, g, i // g).sum(dim=(1, 3))).sum())
            err = 0.0 if total <= 0.0 else math.sqrt(max(total - kept, 0.0) / total)
            per_pixel = o * (i // g) * k
            out.append(_candidate(self.pass_name, {"groups": g}, pix * per_pixel, per_pixel + bias, err))
        return out


@dataclass(frozen=True)
class Tucker2Form:
    """``grouped-bottleneck{groups=1, rank=R}`` (Tucker-2: 1x1 I->R, kxk R->R, 1x1 R->O) for R = 1 .. the exact rank
    (or ``max_rank``). The predicted error is that of the truncated HOSVD (top-R left singular vectors of the mode-O
    and mode-I unfoldings, core = projection); the pass starts from the sequentially truncated HOSVD and refines it
    with HOOI, which in practice ends at or below that (it is not a proven bound). The first 1x1 runs at the input
    resolution (strided convs)."""

    max_rank: int | None = None
    name: str = "tucker2"
    pass_name: str = "grouped-bottleneck"

    def candidates(self, site: ConvSite, weight: Tensor) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("depthwise-separable") is not None:
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
        for r in range(1, top + 1):
            energy = float(kept[min(r, o) - 1, min(r, i) - 1])
            err = 0.0 if r >= full or total <= 0.0 else math.sqrt(min(max(total - energy, 0.0) / total, 1.0))
            params = i * r + r * r * k + o * r
            macs = pix_in * i * r + pix_out * (r * r * k + o * r)
            out.append(_candidate(self.pass_name, {"groups": 1, "rank": r}, macs, params + bias, err))
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


def _pass_class(pass_name: str) -> type[Any]:
    from fxrewrite.passes import REGISTRY
    cls = REGISTRY.get(pass_name)
    if cls is None:
        try:
            from fxrewrite.passes import bottleneck
            cls = {"depthwise-bottleneck": bottleneck.DepthwiseBottleneck,
                   "grouped-bottleneck": bottleneck.GroupedBottleneck}.get(pass_name)
        except ImportError:  # pragma: no cover - the bottleneck passes ship with fxrewrite
            cls = None
    if cls is None:
        raise ConfigError(f"budget form needs pass {pass_name!r}, which this fxrewrite does not have; valid passes: "
                          f"{', '.join(sorted(REGISTRY))}")
    return cls


# ------------------------------------------------------------------------------------------------------ optimiser


@dataclass(frozen=True)
class _Problem:
    """Per site: candidate costs and weighted losses; index 0 is always "keep" (zero loss)."""

    macs: tuple[np.ndarray, ...]
    params: tuple[np.ndarray, ...]
    errors: tuple[np.ndarray, ...]  # w_s * loss(e_s)
    macs_budget: float  # for the sites together (inf: no constraint)
    params_budget: float

    def totals(self, choice: Sequence[int]) -> tuple[float, float, float]:
        m = sum(float(self.macs[s][j]) for s, j in enumerate(choice))
        p = sum(float(self.params[s][j]) for s, j in enumerate(choice))
        e = sum(float(self.errors[s][j]) for s, j in enumerate(choice))
        return m, p, e

    def feasible(self, choice: Sequence[int]) -> bool:
        m, p, _ = self.totals(choice)
        return m <= self.macs_budget and p <= self.params_budget


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


def _greedy(p: _Problem, a: float, b: float) -> list[int] | None:
    """Walk every site's hull of scalar cost ``a*macs + b*params`` by least error per cost saved until feasible."""
    n = len(p.macs)
    scalar = [a * p.macs[s] + b * p.params[s] for s in range(n)]
    hulls = [_hull(scalar[s], p.errors[s]) for s in range(n)]
    pos = [0] * n
    choice = [0] * n
    tot_m = sum(float(p.macs[s][0]) for s in range(n))
    tot_p = sum(float(p.params[s][0]) for s in range(n))
    heap: list[tuple[float, int]] = []

    def push(s: int) -> None:
        h, t = hulls[s], pos[s]
        if t + 1 < len(h):
            cur, nxt = h[t], h[t + 1]
            saved = scalar[s][cur] - scalar[s][nxt]
            heapq.heappush(heap, ((p.errors[s][nxt] - p.errors[s][cur]) / max(saved, _EPS), s))

    for s in range(n):
        push(s)
    while tot_m > p.macs_budget or tot_p > p.params_budget:
        if not heap:
            return None
        _, s = heapq.heappop(heap)
        old, new = hulls[s][pos[s]], hulls[s][pos[s] + 1]
        tot_m += float(p.macs[s][new] - p.macs[s][old])
        tot_p += float(p.params[s][new] - p.params[s][old])
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
    macs, params, errors = _padded(p.macs, np.inf), _padded(p.params, np.inf), _padded(p.errors, np.inf)
    rows = np.arange(len(choice))
    cur = np.array(choice)
    while True:
        # first, each site to its cheapest candidate that is no worse in error and in both costs
        no_worse = ((errors <= errors[rows, cur][:, None]) & (macs <= macs[rows, cur][:, None])
                    & (params <= params[rows, cur][:, None]))
        least = np.where(no_worse, macs, np.inf).min(axis=1, keepdims=True)
        cur = np.argmin(np.where(no_worse & (macs == least), params, np.inf), axis=1)
        tot_m, tot_p = macs[rows, cur].sum(), params[rows, cur].sum()
        d_m = macs - macs[rows, cur][:, None]
        d_p = params - params[rows, cur][:, None]
        gain = errors[rows, cur][:, None] - errors
        ok = (tot_m + d_m <= p.macs_budget) & (tot_p + d_p <= p.params_budget) & (gain > _EPS)
        if not ok.any():
            return [int(j) for j in cur]
        score = np.where(ok, gain, -np.inf)
        s, j = np.unravel_index(int(np.argmax(score)), score.shape)
        cur[s] = j


def _dp(p: _Problem, buckets: int, use_macs: bool) -> list[int] | None:
    """Multiple-choice knapsack by DP on one constraint (MACs or params), costs rounded up to ``budget / buckets``
    units."""
    costs = p.macs if use_macs else p.params
    budget = p.macs_budget if use_macs else p.params_budget
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


def optimise(macs: Sequence[Sequence[float]], params: Sequence[Sequence[float]], errors: Sequence[Sequence[float]],
             macs_budget: float = math.inf, params_budget: float = math.inf, *, method: str = "auto",
             buckets: int | None = None) -> list[int] | None:
    """The multiple-choice knapsack on its own: per site, candidate costs and (weighted) losses with
    candidate 0 the zero-error "keep"; returns the chosen index per site with sum(macs) <= macs_budget and
    sum(params) <= params_budget and the least total error found, or None when none is feasible.

    >>> optimise([[4, 2, 1], [4, 3, 1]], [[0, 0, 0], [0, 0, 0]], [[0, 1, 3], [0, 0.5, 4]], macs_budget=5)
    [1, 1]
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    zeroed = (np.asarray(x, dtype=np.float64) for x in errors)
    p = _Problem(tuple(np.asarray(x, dtype=np.float64) for x in macs),
                 tuple(np.asarray(x, dtype=np.float64) for x in params),
                 tuple(np.where(x < _ZERO, 0.0, x) for x in zeroed), float(macs_budget), float(params_budget))
    n = len(p.macs)
    if n == 0:
        return [] if p.feasible([]) else None
    found: list[list[int]] = []
    need_m = sum(float(x[0]) for x in p.macs) - p.macs_budget  # > 0: the constraint binds
    need_p = sum(float(x[0]) for x in p.params) - p.params_budget
    if need_m <= 0 and need_p <= 0:
        return [0] * n  # keeping everything fits
    one = need_m <= 0 or need_p <= 0
    if method == "dp" and not one:
        raise ConfigError("method='dp' handles one binding constraint (macs or params); use 'greedy' or 'auto' "
                          "when both bind")
    if method in ("auto", "greedy"):
        if one:
            scales = [(1.0, 0.0)] if need_m > 0 else [(0.0, 1.0)]
        else:
            scales = [(t / need_m, (1.0 - t) / need_p) for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
        for a, b in scales:
            choice = _greedy(p, a, b)
            if choice is not None:
                found.append(_repair(p, choice))
    if one and method in ("auto", "dp"):
        if buckets is None:
            work = sum(len(x) for x in p.macs)
            buckets = int(min(1 << 16, max(1 << 12, 4e7 // max(work, 1))))
        choice = _dp(p, buckets, use_macs=need_m > 0)
        if choice is not None and p.feasible(choice):
            found.append(_repair(p, choice))
    found = [c for c in found if p.feasible(c)]
    if not found:
        return None
    return min(found, key=lambda c: p.totals(c)[2])


# -------------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class SiteChoice:
    """The chosen candidate at one site, its cost before, its importance weight and how many candidates it had."""

    site: str
    candidate: Candidate
    macs_before: int
    params_before: int
    weight: float = 1.0
    candidates: int = 1

    @property
    def changed(self) -> bool:
        return self.candidate.form != KEEP

    @property
    def predicted_rel_error(self) -> float:
        return self.candidate.rel_error

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, **self.candidate.to_dict(), "macs_before": self.macs_before,
                "params_before": self.params_before, "weight": self.weight, "candidates": self.candidates}


@dataclass(frozen=True)
class BudgetPlan:
    """Per-site choices meeting ``target``; model totals before and (predicted by the cost model) after.

    ``objective`` is the value of the objective named ``objective_name`` (see the module docstring). ``apply(gm)``
    runs the passes with one exact-name rule per changed site (``rules()`` / ``pipeline()`` give them), so the result
    replays with ``fxrewrite.apply_plan``.
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

    @property
    def macs_fraction(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_fraction(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def changed(self) -> tuple[SiteChoice, ...]:
        return tuple(c for c in self.choices if c.changed)

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
            cls = _pass_class(name)
            if structure_only:
                rules = [dataclasses.replace(r, options=MappingProxyType({**r.options, "init": "random"}))
                         for r in rules]
            out.append((cls(), rules))
        return out

    def apply(self, gm: torch.fx.GraphModule, *, structure_only: bool = False) -> Any:
        """Rewrite ``gm`` in place with the plan; returns a ``PassResult`` whose records are the rewritten sites
        (their ``details`` carry ``budget_predicted_rel_error``). Raises ``ConfigError`` if a pass declines a site
        the plan chose (the plan was made for another graph). ``structure_only``: see ``pipeline``."""
        from fxrewrite.passes import PassManager, PassResult
        from fxrewrite.rewriter import portable
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
        from fxrewrite.replay import PlanEntry, RewritePlan
        entries = tuple(PlanEntry(c.site, c.candidate.form, MappingProxyType(dict(c.candidate.options)))
                        for form in self.rules() for c in self.changed if c.candidate.form == form)
        shapes = tuple(tuple(int(d) for d in s) for s in input_shapes) if input_shapes is not None else None
        return RewritePlan(entries, shapes)

    def to_dict(self, result: Any = None) -> dict[str, Any]:
        """The plan as plain data. With the ``RewriteResult`` / ``PassResult`` of applying it, every site also gets
        ``measured_rel_error`` (the weight error the pass reports) and, when verified, ``measured_output_rel_l2``
        (the site's local output error)."""
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
                "seconds": dict(self.seconds), "sites": sites,
                "excluded": [{"site": s, "reason": r} for s, r in self.excluded]}

    def to_json(self, indent: int | None = 2, result: Any = None) -> str:
        return json.dumps(self.to_dict(result), indent=indent)

    def save(self, path: str | Path, result: Any = None, input_shapes: Sequence[Sequence[int]] | None = None
             ) -> Path:
        """Write the plan atomically as a ``fxrewrite.RewritePlan`` JSON (``RewritePlan.load`` + ``apply_plan``
        replay it) with the budget plan under ``"budget"``: per site the choice, cost, predicted error and, given
        ``result``, the measured errors. ``input_shapes`` default to those recorded in ``result``'s report."""
        from fxrewrite.artifacts import atomic_write_text
        if input_shapes is None:
            shapes = getattr(getattr(result, "report", None), "context", {}).get("input_shapes")
            input_shapes = shapes if isinstance(shapes, list | tuple) else None
        doc = self.to_rewrite_plan(input_shapes).to_dict() | {"budget": self.to_dict(result)}
        return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")

    def table(self, result: Any = None, tablefmt: str = "simple") -> str:
        """Per-site choice, cost and predicted error; with a ``RewriteResult`` (or ``PassResult``) also the
        measured weight error and, when verified, the measured local output error (rel. L2)."""
        measured_w, measured_out = _measured(result)
        rows = []
        for c in self.choices:
            row = [c.site, c.candidate.spec(), f"{c.macs_before:,}", f"{c.candidate.macs:,}",
                   f"{c.params_before:,}", f"{c.candidate.params:,}", f"{c.predicted_rel_error:.4f}"]
            if result is not None:
                w = measured_w.get(c.site)
                row += ["" if w is None else f"{w:.4f}",
                        f"{measured_out[c.site]:.4f}" if c.site in measured_out else ""]
            rows.append(row)
        headers = ["site", "choice", "MACs before", "MACs after", "params before", "params after", "pred. w-err"]
        if result is not None:
            headers += ["meas. w-err", "meas. out-err"]
        head = (f"budget plan ({self.target.describe()}; {self.method}): MACs {self.macs_before:,} -> "
                f"{self.macs_after:,} ({self.macs_fraction:.3f}x), params {self.params_before:,} -> "
                f"{self.params_after:,} ({self.params_fraction:.3f}x); {self.objective_name} objective "
                f"{self.objective:.4g}; "
                f"{len(self.changed)} of {len(self.choices)} candidate sites changed")
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


def _prune(cands: list[Candidate]) -> list[Candidate]:
    """Drop candidates another one dominates (no more MACs, no more params, no more error, and less of one) and
    exact duplicates; keep (index 0) always stays first."""
    keep = cands[0]
    rest = [c for c in cands[1:] if c.macs < keep.macs or c.params < keep.params]
    a = np.array([[c.macs, c.params, c.rel_error] for c in rest], dtype=np.float64).reshape(-1, 3)
    kept = [c for c, ok in zip(rest, _pareto_mask(a), strict=True) if ok]
    return [keep, *sorted(kept, key=lambda c: (c.macs, c.params))]


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _infeasible(target: Target, what: str, frac: float, before: int, fixed: int, minimum: int, n_sites: int,
                forms: Sequence[str], excluded: Sequence[tuple[str, str]]) -> BudgetInfeasible:
    reachable = (fixed + minimum) / before if before else 1.0
    label = "MACs" if what == "macs" else what
    why = [f"target {what} <= {frac:g}x cannot be met: the original has {_fmt(before)} {label}, so the "
           f"budget is {_fmt(frac * before)}; the cheapest plan with forms {', '.join(forms)} reaches "
           f"{_fmt(fixed + minimum)} ({reachable:.4f}x): {_fmt(fixed)} are outside the {n_sites} rewritable sites "
           f"(linear layers, ineligible or unselected convolutions) and those sites cost at least {_fmt(minimum)}."]
    if excluded:
        shown = "; ".join(f"{s}: {r}" for s, r in excluded[:3])
        why.append(f"Not rewritable: {shown}{' ...' if len(excluded) > 3 else ''}.")
    why.append(f"Use a target of at least {math.ceil(reachable * 1e4) / 1e4:g}, or allow more forms.")
    return BudgetInfeasible(" ".join(why))


def choose_plan(gm: torch.fx.GraphModule, target: Target, forms: str | Iterable[str | Form] = DEFAULT_FORMS, *,
                select: Any = None, weights: Mapping[str, float] | None = None, method: str = "auto",
                objective: str = "log-cosine", buckets: int | None = None) -> BudgetPlan:
    """Choose one candidate per site (or keep it) so that the model meets ``target`` with the least objective,
    ``sum(w_s * loss(e_s))`` (see the module docstring). ``gm`` must carry shapes (``propagate_shapes``); nothing is
    changed. ``forms``: names, Form objects or a comma-separated string (``parse_forms``). ``select`` restricts the
    sites (names, globs, ``Rule``s as in ``fxrewrite.select``); ``weights`` maps site names to importance weights
    (default 1); ``method`` and ``objective``: see the module docstring. Raises ``BudgetInfeasible`` when no plan
    meets the target.
    """
    if not isinstance(target, Target):
        raise ConfigError(f"target must be a fxrewrite.budget.Target, got {type(target).__name__}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    start = time.perf_counter()
    form_objs = parse_forms(forms) if isinstance(forms, str) else [make_form(f) for f in forms]
    if not form_objs:
        raise ConfigError(f"choose_plan needs at least one form; valid: {', '.join(_FORMS)}")
    for f in form_objs:
        _pass_class(f.pass_name)
    weights = dict(weights or {})
    bad = {k: v for k, v in weights.items() if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0)}
    if bad:
        raise ConfigError(f"weights must be finite numbers >= 0, got {bad}")
    sites = find_sites(gm)
    if any(s.output_shape is None for s in sites):
        missing = next(s.name for s in sites if s.output_shape is None)
        raise ConfigError(f"site {missing!r} has no shape: run fxrewrite.shapes.propagate_shapes(gm, inputs) before "
                          "choose_plan (rewrite(..., target=...) does this for you)")
    unknown = sorted(set(weights) - {s.name for s in sites})
    if unknown:
        raise ConfigError(f"weights name sites that do not exist: {unknown}")
    rules = parse_rules(select)
    selected = {k: v.selected for k, v in resolve(rules, sites).items()} if rules else {}
    before = model_cost(gm)
    considered: list[tuple[ConvSite, list[Candidate]]] = []
    excluded: list[tuple[str, str]] = []
    for site in sites:
        if rules and not selected.get(site.name, False):
            excluded.append((site.name, "not selected"))
            continue
        if site.blocker is not None:
            excluded.append((site.name, str(site.blocker)))
            continue
        weight = _weights_of(gm, site)
        if weight is None:
            excluded.append((site.name, "meta-weight: no values to factorise"))
            continue
        keep = _candidate(KEEP, {}, site.macs, site.params, 0.0)
        cands = [keep]
        with _one_thread():
            for f in form_objs:
                cands.extend(f.candidates(site, weight))
        cands = _prune(cands)
        if len(cands) == 1:
            reasons = sorted({str(r) for _, r in site.eligibility if r is not None})
            excluded.append((site.name, "; ".join(reasons) or "no cheaper candidate"))
            continue
        considered.append((site, cands))
    t_candidates = time.perf_counter() - start

    fixed_m = before.macs - sum(s.macs for s, _ in considered)
    fixed_p = before.params - sum(s.params for s, _ in considered)
    budget_m = math.floor(target.macs * before.macs) if target.macs is not None else math.inf
    budget_p = math.floor(target.params * before.params) if target.params is not None else math.inf
    names = [f.name for f in form_objs]
    for what, frac, budget, fixed, total, key in (("macs", target.macs, budget_m, fixed_m, before.macs, "macs"),
                                                  ("params", target.params, budget_p, fixed_p, before.params,
                                                   "params")):
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
                      budget_m - fixed_m, budget_p - fixed_p, method=method, buckets=buckets)
    if choice is None:
        raise BudgetInfeasible(f"target {target.describe()} cannot be met jointly with forms {', '.join(names)}: "
                               "each bound is reachable on its own but no plan found meets both; relax one of them.")
    choices = tuple(SiteChoice(s.name, cands[j], s.macs, s.params, wi, len(cands))
                    for (s, cands), j, wi in zip(considered, choice, w, strict=True))
    macs_after = fixed_m + sum(c.candidate.macs for c in choices)
    params_after = fixed_p + sum(c.candidate.params for c in choices)
    value = sum(c.weight * _site_loss(c.predicted_rel_error, objective) for c in choices)
    seconds = {"candidates": t_candidates, "optimise": time.perf_counter() - start - t_candidates}
    return BudgetPlan(target, choices, before.macs, before.params, macs_after, params_after, value, method,
                      tuple(names), MappingProxyType(seconds), tuple(excluded), objective_name=objective)
