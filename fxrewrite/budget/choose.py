"""Budgets: choose one rewrite per convolution site so that the model meets a MAC / parameter / latency target with the
least total predicted error.

``choose_plan(gm, Target(macs=0.5))`` takes a traced GraphModule with shapes
(``fxrewrite.graph.shapes.propagate_shapes``) and, for every eligible site, lists candidates: keep the conv, or each
allowed form (``forms``, declared by the passes: ``fxrewrite.budget.forms``) with each valid rank / group count. Each
candidate's cost (MACs and parameters) is what its pass declares (``ConvRewritePass.cost``, which equals
``fxrewrite.measure.cost``'s count of the module the pass builds), computed from the shapes, and its predicted error
comes from the trained weight, without data and without building any module:

- depthwise-separable / grouped-separable ``{groups=g, rank=r}``: the energy of the discarded singular values of the
  per-group ``O x (I/g)K`` slices (exactly the weight error the pass will report);
- grouped ``{groups=g}``: the energy outside the block diagonal (``sqrt(1 - kept_energy)``);
- Tucker-2 (``grouped-bottleneck{groups=1, rank=R}``, opt-in form ``"tucker2"``): the error of the truncated HOSVD (the
  pass's ST-HOSVD + HOOI fit usually ends a little below it).

**Calibration** (``calibration=`` batches): the error is instead the relative output error of the site on real
activations, ``sqrt(trace(dW G dW^T) / sum ||y||^2)`` with ``G`` the Gram matrix of the site's unfolded input patches
(``fxrewrite.budget.calibration.collect_site_stats``: sums over batches, sites in chunks of bounded Gram memory, no
activation kept; a site with at most ``d`` unfolded columns keeps the columns themselves, ``G = X X^T``, which is
cheaper to read than the Gram) and ``dW`` the change the form makes. It is exact for the built factorisations, and
every rank of a group count comes from one small matrix or one sweep over the ranks
(``fxrewrite.maths.output_error.separable_output_errors``; ``grouped_output_error``, ``tucker2_output_errors``
likewise). On resnet18 at 224x224 with 8 images (one thread, about 9 s in all, ``benchmarks/bench_budget.py``,
``budget_timing``) the float64 eigendecompositions of the weight slices take the largest share (about 3.3 s: 156
batched ``eigh`` calls, among them 52 matrices of 512 x 512, one set per group count), then the one pass over the data
with the Grams of layers 1-3 (about 2 s) and the rank sweeps of the output errors (about 1.4 s).

**Latency** (``Target(latency=0.5, backend="eager")``): every site's original conv and every candidate are timed once
per distinct layer configuration (``fxrewrite.budget.layer_latency``: round-robin median against the original, cached in
memory and optionally on disk); the candidates timed are those Pareto-optimal in MACs, parameters and error, with ranks
on a grid of about two per octave (``LayerLatency.rank_grid``). A candidate not faster than the original conv on that
backend is pruned (each site says how many); the summed site latencies (the measured original total minus the per-site
savings) must meet the target. ``BudgetPlan.latency_check`` compares that prediction with a whole-model measurement
(``fxrewrite.measure.latency``). ``rewrite(..., target=Target(latency=f))`` goes further: the plan is measured as a
whole model and tightened until the whole model meets ``f`` (``fxrewrite.budget.whole_model.fit_latency``, which
re-plans from ``prepare_budget``'s measurements with ``PreparedBudget.plan``).

**Objective.** Minimise ``sum over sites of w_s * loss(e_s)``, where ``e_s = ||W_s - W_s'||_F / ||W_s||_F`` is the
site's relative weight error (predicted as above) and ``w_s`` its importance (1 for every site unless ``weights=`` says
otherwise; ``weights={"layer1.0.conv1": 4.0}`` makes a site count more). The default ``objective="log-cosine"`` uses
``loss(e) = -log(1 - e^2)``: every form here replaces ``W`` by an orthogonal projection of it, so ``1 - e^2`` is the
squared cosine between the new and the old weight; with batch-normalised layers (scale does not matter) the cosine
similarity of the output roughly multiplies along a chain, so the sum of log-cosines approximates the log of the
end-to-end cosine. For small errors it equals ``e^2``; unlike ``objective="squared"`` (``loss(e) = e^2``, the
first-order sum of independent perturbations) it does not pile large errors on a few sites, which measurably costs
accuracy (``benchmarks/bench_budget.py``).

**Optimiser** (``fxrewrite.budget.optimiser``). A multiple-choice knapsack. ``greedy``: the Lagrangian path, moving one
site at a time to the next vertex of its lower convex hull of (cost, error) with the least error added per unit of cost
saved until the target is met, then a repair pass that spends the remaining slack on the single change that lowers the
error most, while it fits. ``dp``: dynamic programming over sites with costs rounded *up* to ``budget / buckets`` units
(so a plan it finds never exceeds the budget; exact when the costs are integers whose greatest common divisor divides
the budget into at most ``buckets`` units), then the same repair pass; one binding constraint only. ``auto`` (default)
runs both (DP when one constraint binds) and keeps the plan with the lower objective. Losses below float rounding
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
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fxrewrite.budget.calibration import collect_site_stats
from fxrewrite.budget.forms import DEFAULT_FORMS, form_names, make_form, parse_forms
from fxrewrite.budget.optimiser import METHODS, optimise
from fxrewrite.budget.plan import BudgetPlan, SiteChoice
from fxrewrite.budget.target import OBJECTIVES, BudgetInfeasible, Target, site_loss
from fxrewrite.errors import ConfigError
from fxrewrite.graph.select import parse_rules, resolve
from fxrewrite.graph.sites import ConvSite, find_sites
from fxrewrite.maths import factorize
from fxrewrite.maths.output_error import SiteStats
from fxrewrite.maths.spectra import pareto_mask
from fxrewrite.measure.cost import model_cost
from fxrewrite.passes import pass_class
from fxrewrite.passes.building import conv_module
from fxrewrite.passes.candidates import KEEP, Candidate, Form, make_candidate

__all__ = ["PreparedBudget", "choose_plan", "prepare_budget"]


def _weights_of(gm: torch.fx.GraphModule, site: ConvSite) -> Tensor | None:
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
    kept = [c for c, ok in zip(rest, pareto_mask(a), strict=True) if ok]
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
    ``sum(w_s * loss(e_s))`` (see the module docstring): ``prepare_budget(...).plan(...)``. ``gm`` must carry shapes
    (``propagate_shapes``); nothing is changed. ``forms``: names, Form objects or a comma-separated string
    (``parse_forms``). ``select`` restricts the sites (names, globs, ``Rule``s as in ``fxrewrite.graph.select``);
    ``weights`` maps site names to importance weights (default 1); ``method`` and ``objective``: see the module
    docstring. Raises ``BudgetInfeasible`` when no plan meets the target.

    ``calibration`` (input tuples or tensors, read once per chunk of sites whose Gram matrices fit
    ``max_gram_bytes``; ``input_fn`` maps items to inputs): each candidate's error is then its relative output
    error on these activations, ``sqrt(trace(dW G dW^T) / sum ||y||^2)`` with ``G`` the Gram of the site's unfolded
    input (``collect_site_stats``), instead of the weight error.

    ``target.latency``: every site's original conv and every candidate are timed once per distinct configuration
    on ``target.backend`` (``latency``: a ``fxrewrite.budget.layer_latency.LayerLatency`` with the runs, threads, cache
    and timer; default ``LayerLatency(backend=target.backend)``); a candidate not faster than the original conv is
    never chosen, and the summed site latencies stay within the target (the whole model's bound is
    ``fxrewrite.budget.whole_model.fit_latency``'s).
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    prepared = prepare_budget(gm, target, forms, select=select, weights=weights, calibration=calibration,
                              input_fn=input_fn, latency=latency, max_gram_bytes=max_gram_bytes)
    return prepared.plan(method=method, objective=objective, buckets=buckets)


def prepare_budget(gm: torch.fx.GraphModule, target: Target, forms: str | Iterable[str | Form] = DEFAULT_FORMS, *,
                   select: Any = None, weights: Mapping[str, float] | None = None,
                   calibration: Iterable[Any] | None = None, input_fn: Callable[[Any], Sequence[Any]] | None = None,
                   latency: Any = None, max_gram_bytes: int = 1 << 30) -> PreparedBudget:
    """The expensive half of ``choose_plan`` (see there for the arguments): every site's candidates with their
    predicted errors and, with a latency target, their measured layer latencies. ``PreparedBudget.plan`` then chooses
    for any target with the same bounds kind, so a caller that re-plans (``fit_latency``) computes nothing twice."""
    if not isinstance(target, Target):
        raise ConfigError(f"target must be a fxrewrite.budget.target.Target, got {type(target).__name__}")
    timing = _timing(target, latency)
    start = time.perf_counter()
    form_objs = parse_forms(forms) if isinstance(forms, str) else [make_form(f) for f in forms]
    if not form_objs:
        raise ConfigError(f"choose_plan needs at least one form; valid: {', '.join(form_names())}")
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
        raise ConfigError(f"site {missing!r} has no shape: run fxrewrite.graph.shapes.propagate_shapes(gm, inputs) "
                          "before choose_plan (rewrite(..., target=...) does this for you)")
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
    return PreparedBudget(target, tuple(considered), tuple(excluded), before.macs, before.params, timed,
                          tuple(f.name for f in form_objs), weights, t_candidates, t_latency,
                          "output" if calibration is not None else "weight", timing)


@dataclass(frozen=True)
class PreparedBudget:
    """Every considered site's candidates (keep first), the sites without any and why, the model totals and, with a
    latency target, the timings; ``plan(target)`` chooses (see ``choose_plan``)."""

    target: Target
    considered: tuple[tuple[ConvSite, list[Candidate]], ...]
    excluded: tuple[tuple[str, str], ...]
    macs_before: int
    params_before: int
    timed: _Timed | None
    forms: tuple[str, ...]
    weights: Mapping[str, float]
    seconds_candidates: float
    seconds_latency: float
    error_metric: str
    timing: Any = None

    def plan(self, target: Target | None = None, *, method: str = "auto", objective: str = "log-cosine",
             buckets: int | None = None) -> BudgetPlan:
        """The least-objective plan meeting ``target`` (default: the prepared one; a latency bound needs a prepared
        latency target, whose measurements it reuses)."""
        target = self.target if target is None else target
        if target.latency is not None and self.timed is None:
            raise ConfigError("this budget was prepared without a latency target: prepare it with one")
        if method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        start = time.perf_counter()
        considered, timed, weights, names = list(self.considered), self.timed, self.weights, list(self.forms)
        excluded = list(self.excluded)
        timed = timed if target.latency is not None else None
        before_macs, before_params = self.macs_before, self.params_before
        fixed_m = before_macs - sum(s.macs for s, _ in considered)
        fixed_p = before_params - sum(s.params for s, _ in considered)
        budget_m = math.floor(target.macs * before_macs) if target.macs is not None else math.inf
        budget_p = math.floor(target.params * before_params) if target.params is not None else math.inf
        lat_before = sum(timed.keep_ms.values()) if timed is not None else 0.0
        fixed_l = lat_before - sum(timed.keep_ms[s.name] for s, _ in considered) if timed is not None else 0.0
        budget_l = target.latency * lat_before if target.latency is not None else math.inf
        for what, frac, budget, fixed, total, key in (
                ("macs", target.macs, budget_m, fixed_m, before_macs, "macs"),
                ("params", target.params, budget_p, fixed_p, before_params, "params"),
                ("latency", target.latency, budget_l, fixed_l, lat_before, "latency_ms")):
            if frac is None:
                continue
            minimum = sum(min(getattr(c, key) for c in cands) for _, cands in considered)
            if fixed + minimum > budget:
                raise _infeasible(target, what, frac, total, fixed, minimum, len(considered), names, excluded)
        w = [float(weights.get(s.name, 1.0)) for s, _ in considered]
        choice = optimise([[c.macs for c in cands] for _, cands in considered],
                          [[c.params for c in cands] for _, cands in considered],
                          [[wi * site_loss(c.rel_error, objective) for c in cands]
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
        value = sum(c.weight * site_loss(c.predicted_rel_error, objective) for c in choices)
        seconds = {"candidates": self.seconds_candidates, "optimise": time.perf_counter() - start}
        extra: dict[str, Any] = {"error_metric": self.error_metric}
        if timed is not None:
            seconds["latency"] = self.seconds_latency
            extra |= {"latency_before_ms": lat_before,
                      "latency_after_ms": fixed_l + sum(float(c.candidate.latency_ms or 0.0) for c in choices),
                      "latency_info": MappingProxyType(self.timing.describe() | {  # type: ignore[union-attr]
                          "configs": timed.configs, "off_grid": timed.off_grid})}
        return BudgetPlan(target, choices, before_macs, before_params, macs_after, params_after, value, method,
                          tuple(names), MappingProxyType(seconds), tuple(excluded), objective_name=objective, **extra)


def _timing(target: Target, latency: Any) -> Any:
    """The LayerLatency of a latency target (None without one)."""
    from fxrewrite.budget.layer_latency import LayerLatency
    if latency is not None and not isinstance(latency, LayerLatency):
        raise ConfigError("latency= must be a fxrewrite.budget.layer_latency.LayerLatency, got "
                          f"{type(latency).__name__}")
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
