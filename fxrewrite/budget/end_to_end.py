"""Budgets on the whole model's output error: with calibration data, a plan chosen from per-site (local) output
errors is built, measured end to end and re-planned while it is worse than predicted, and it is never returned when
a uniform plan at no more MACs measures better (``fit_end_to_end``, used by ``rewrite(..., target=...,
calibration=...)``).

**Measured error** (``output_errors``): ``||f'(x) - f(x)|| / ||f(x)||`` over all calibration batches (sums of squares
over every floating output, eval mode, ``torch.no_grad``; no activation kept), for several rewritten models in one
pass over the data (the original runs once per batch).

**Predicted error** (``predicted_error``): the log-cosine objective's sum ``sum_s w_s * -log(1 - e_s^2)`` approximates
``-log cos^2`` of the whole output, so the prediction is ``sqrt(1 - exp(-sum))``; the first plan uses ``w_s = 1`` (each
site's relative error passes through unchanged), later plans the measured gains.

**Gains** (``site_gains``): how much a site's relative output error grows by the model's output. One forward pass of
the original with a zero probe added at every site's output, which also runs each site's replacement on the same
input (``delta = new(x) - conv(x)``), then ``probes`` backward passes of random output directions ``v``:
``<d(v.f)/dy_s, delta_s>`` per sample is ``v.J_s delta_s``, whose square is an unbiased estimate of
``||J_s delta_s||^2`` (the output change this site's error alone causes, to first order). The gain is that as a
fraction of ``||f||^2`` over the site's own ``||delta_s||^2 / ||y_s||^2``; the re-plan weights each site by its gain
(times any user weight), so the objective approximates the whole output's error. Sites no measured plan changes get
the median gain.

**Uniform plans** (``uniform_plans``): per form, one option family (e.g. ``depthwise-separable`` at one rank fraction
``rank = ceil(rho * exact rank)`` at every considered site, ``grouped{groups=4}`` everywhere), ``rho`` the largest one
meeting the target; per form the family with the least predicted objective is built and measured with the plan.

**Cost.** Everything runs on the first calibration items holding ``max_samples`` (512) samples: the first plan and the
uniform plans are built and measured one after the other (one forward each; the original's outputs are kept between
them when small, otherwise it runs again), then per further round one forward and ``probes`` backward passes for the
gains and one forward of the new plan; each plan built is factorised once, and the chosen one is handed to ``rewrite``
(``BudgetPlan.prebuilt``). Memory: the traced original, the model being measured and the best one measured so far,
plus every measured plan's replacement modules (what the gains run). Measured (when every built plan was kept and the
chosen one factorised again) on resnet18 at 224x224 with 8 calibration images (random weights, one thread, a 2-core
machine at load 6.5): 9.7 s of a 31.9 s ``rewrite(..., target=Target(macs=0.5), calibration=...)`` (the calibration
statistics took 17.8 s); alone, 7.6 s: 3.5 s factorising five plans (two budget rounds, three uniform), 1.9 s
measuring, 1.2 s for the gains, 0.7 s finding the uniform plans.

>>> import torch
>>> a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
>>> err = output_errors(a, [a, b], [(torch.randn(8, 4),)])
>>> err[0] == 0.0 and err[1] > 0.0
True
>>> round(predicted_error([0.1, 0.1]), 4)  # sqrt(1 - 0.99 * 0.99)
0.1411
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fxrewrite.budget.choose import PreparedBudget
from fxrewrite.budget.plan import BudgetPlan, SiteChoice
from fxrewrite.budget.target import Target, site_loss
from fxrewrite.errors import ConfigError
from fxrewrite.graph.sites import ConvSite
from fxrewrite.passes import pass_class
from fxrewrite.passes.candidates import KEEP, Candidate, make_candidate
from fxrewrite.util.inputs import batch_size_of, calibration_inputs, to_device
from fxrewrite.util.runtime import device_of, eval_mode, find_submodule

__all__ = ["Sampled", "SiteGain", "fit_end_to_end", "output_errors", "predicted_error", "site_gains", "uniform_plans"]

InputFn = Callable[[Any], Sequence[Any]]


def _leaves(out: Any) -> list[Tensor]:
    """The floating-point tensors of a model output (tensor, tuple / list / dict of them, nested)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, tuple | list):
        return [t for v in out for t in _leaves(v)]
    return []


def _inputs(batches: Iterable[Any], input_fn: InputFn | None, device: torch.device | None) -> Iterable[tuple[Any, ...]]:
    for item in batches:
        yield to_device(calibration_inputs(item, input_fn), device)


class Sampled:
    """The first calibration items of ``batches`` holding at least ``max_samples`` samples (whole items; dim 0 of
    the first tensor input counts), re-iterable; ``max_samples=None``: all of them."""

    def __init__(self, batches: Iterable[Any], max_samples: int | None, input_fn: InputFn | None = None) -> None:
        self.batches, self.max_samples, self.input_fn = batches, max_samples, input_fn

    def __iter__(self) -> Iterator[Any]:
        seen = 0
        for item in self.batches:
            if self.max_samples is not None and seen >= self.max_samples:
                return
            seen += batch_size_of(calibration_inputs(item, self.input_fn))
            yield item


REFERENCE_CACHE_BYTES = 64 << 20  # the original's outputs are kept between measurements up to this size


def _fingerprint(xs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Shapes and sums of the tensor inputs: tells a cached batch from another one."""
    return tuple((tuple(x.shape), float(x.double().sum()), float(x.double().abs().sum()))
                 for x in xs if isinstance(x, Tensor))


def output_errors(original: nn.Module, models: Sequence[nn.Module], batches: Iterable[Any], *,
                  input_fn: InputFn | None = None, cache: dict[str, Any] | None = None) -> list[float]:
    """Each model's relative output error against ``original`` over ``batches``: ``sqrt(sum ||f'(x) - f(x)||^2 /
    sum ||f(x)||^2)``, sums over every batch and floating output, in float64; eval mode, no gradients, one pass
    over the data (``original`` once per batch). ``cache`` (a dict, empty at first): the original's outputs are
    kept there when they take at most ``REFERENCE_CACHE_BYTES`` (a classifier's logits), so later calls with the
    same dict and batches do not run it again."""
    diff = [0.0] * len(models)
    ref = 0.0
    device = device_of(original)
    cached = cache.get("outputs") if cache is not None else None
    keep: list[tuple[tuple[Any, ...], list[Tensor]]] | None = [] if cache is not None and cached is None else None
    with eval_mode(original, *models), torch.no_grad():
        for b, xs in enumerate(_inputs(batches, input_fn, device)):
            key = _fingerprint(xs)
            if cached is not None and b < len(cached) and cached[b][0] == key:
                want = cached[b][1]
            else:  # not cached, or the data came in another order (a shuffling DataLoader)
                want = [t.detach().to(torch.float64) for t in _leaves(original(*xs))]
                if keep is not None:
                    keep.append((key, want))
                    if sum(t.numel() * 8 for _, ts in keep for t in ts) > REFERENCE_CACHE_BYTES:
                        keep = None
            ref += sum(float(t.abs().square().sum()) for t in want)
            for i, m in enumerate(models):
                got = _leaves(m(*xs))
                if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=False)):
                    raise ConfigError("end-to-end error: a rewritten model's outputs differ in number or shape from "
                                      "the original's; the plan changed what the model returns")
                diff[i] += sum(float((g.detach().to(torch.float64) - w).abs().square().sum())
                               for g, w in zip(got, want, strict=True))
    if cache is not None and keep is not None:
        cache["outputs"] = keep
    if ref <= 0.0:
        return [0.0 if d <= 0.0 else math.inf for d in diff]
    return [math.sqrt(d / ref) for d in diff]


def predicted_error(rel_errors: Iterable[float], weights: Iterable[float] | None = None) -> float:
    """The whole-model relative output error the log-cosine objective predicts from per-site errors ``e_s`` and
    gains ``w_s`` (default 1): ``sqrt(1 - exp(-sum w_s * -log(1 - e_s^2)))``.

    >>> predicted_error([0.0, 0.0]), round(predicted_error([0.1], [4.0]), 4)
    (0.0, 0.1985)
    """
    errors = list(rel_errors)
    ws = [1.0] * len(errors) if weights is None else list(weights)
    total = sum(w * site_loss(e, "log-cosine") for e, w in zip(errors, ws, strict=True))
    return math.sqrt(max(0.0, -math.expm1(-total)))


@dataclass(frozen=True)
class SiteGain:
    """One site's measured gain: ``local`` is the relative output error its replacement makes on the original's
    activations, ``contribution`` the relative squared error that causes at the model's output (to first order),
    ``gain = contribution / local^2`` (1: the relative error passes through unchanged); ``source`` names the plan
    whose replacement was measured."""

    site: str
    local: float
    contribution: float
    gain: float
    source: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def site_gains(gm: torch.fx.GraphModule, replacements: Mapping[str, tuple[nn.Module, str]], batches: Iterable[Any],
               *, input_fn: InputFn | None = None, probes: int = 2, seed: int = 0) -> dict[str, SiteGain]:
    """Per site (module name -> ``(replacement module, source)``), the measured gain of its replacement's error
    (see the module docstring): one forward pass of ``gm`` per batch with the replacements run beside the convs,
    then ``probes`` backward passes with random output directions. ``gm``'s parameters get no gradients; the
    hooks are removed afterwards."""
    if probes < 1:
        raise ConfigError(f"site_gains needs probes >= 1, got {probes}")
    names = list(replacements)
    acc = {n: [0.0, 0.0, 0.0] for n in names}  # sum (v.J delta)^2 / probes, ||delta||^2, ||y||^2
    ref = 0.0
    device = device_of(gm)
    gen = torch.Generator(device=device if device is not None else "cpu").manual_seed(seed)
    state: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str, new: nn.Module) -> Callable[..., Tensor]:
        def run(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            with torch.no_grad():
                delta = (new(args[0]) - out).detach()
                acc[name][1] += float(delta.to(torch.float64).square().sum())
                acc[name][2] += float(out.detach().to(torch.float64).square().sum())
            probe = torch.zeros_like(out, requires_grad=True)
            state[name] = (probe, delta)
            return out + probe
        return run

    handles = [gm.get_submodule(n).register_forward_hook(hook(n, new)) for n, (new, _) in replacements.items()]
    grads = [(p, p.requires_grad) for p in gm.parameters()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with eval_mode(gm, *(m for m, _ in replacements.values())), torch.enable_grad():
            for xs in _inputs(batches, input_fn, device):
                state.clear()
                outputs = _leaves(gm(*xs))
                ref += sum(float(t.detach().to(torch.float64).abs().square().sum()) for t in outputs)
                outs = [t for t in outputs if t.requires_grad]
                live = [n for n in names if n in state]
                if not outs or not live:
                    continue
                for k in range(probes):
                    vs = [torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype) for t in outs]
                    scalar = sum((v * t).sum() for v, t in zip(vs, outs, strict=True))
                    got = torch.autograd.grad(scalar, [state[n][0] for n in live], retain_graph=k + 1 < probes,
                                              allow_unused=True)
                    for n, g in zip(live, got, strict=True):
                        if g is None:
                            continue
                        delta = state[n][1]
                        per_sample = (g.to(torch.float64) * delta.to(torch.float64)).flatten(1).sum(1)
                        acc[n][0] += float(per_sample.square().sum()) / probes
                state.clear()
    finally:
        for h in handles:
            h.remove()
        for p, flag in grads:
            p.requires_grad_(flag)
    out = {}
    for n in names:
        num, d2, y2 = acc[n]
        local2 = d2 / y2 if y2 > 0 else 0.0
        contribution = num / ref if ref > 0 else 0.0
        gain = contribution / local2 if local2 > 1e-30 else math.nan
        out[n] = SiteGain(n, math.sqrt(local2), contribution, gain, replacements[n][1])
    return out


# ------------------------------------------------------------------------------------------------ uniform plans


def _family(c: Candidate) -> tuple[str, tuple[tuple[str, Any], ...]]:
    return c.form, tuple(sorted((k, v) for k, v in c.options.items() if k != "rank"))


def _family_spec(form: str, opts: tuple[tuple[str, Any], ...], rho: float | None) -> str:
    parts = [f"{k}={v}" for k, v in opts] + ([f"rank={rho:.3g} of exact"] if rho is not None else [])
    return f"{form}{{{', '.join(parts)}}}" if parts else form


def _valid(form: str, opts: Mapping[str, Any], site: ConvSite) -> bool:
    try:
        return pass_class(form)(**opts).check(site) is None  # type: ignore[call-arg,attr-defined]
    except (TypeError, ConfigError):
        return False


def _candidate(form: str, opts: Mapping[str, Any], site: ConvSite, listed: Sequence[Candidate]) -> Candidate:
    """The candidate with these options at ``site``: the listed one (its predicted error), else priced by the pass's
    cost with the error of the listed same-family candidate of the nearest rank below (an upper bound; errors fall
    with the rank), or above when none is below."""
    same = [c for c in listed if c.form == form and dict(c.options) == dict(opts)]
    if same:
        return same[0]
    cost = pass_class(form).cost(site.spec, site.input_shape, site.output_shape, **opts)  # type: ignore[attr-defined]
    key = (form, tuple(sorted((k, v) for k, v in opts.items() if k != "rank")))
    fam = sorted((c for c in listed if _family(c) == key and "rank" in c.options), key=lambda c: c.options["rank"])
    rank = opts.get("rank", 0)
    below = [c for c in fam if c.options["rank"] <= rank]
    ref = below[-1] if below else (fam[0] if fam else None)
    return make_candidate(form, opts, int(cost.macs), int(cost.params), ref.rel_error if ref is not None else 1.0)


def _exact_rank(form: str, opts: Mapping[str, Any], site: ConvSite) -> int:
    """The rank at which a separable split is exact: min(O / G, (I / g) * K)."""
    s = site.spec
    g = s.in_channels if form == "depthwise-separable" else int(opts.get("groups", 1))
    return max(1, min(s.out_channels // s.groups, (s.in_channels // g) * s.kernel_size[0] * s.kernel_size[1]))


def uniform_plans(prepared: PreparedBudget, target: Target | None = None) -> list[tuple[str, BudgetPlan]]:
    """Per form of ``prepared``, the uniform plan (one option family at every considered site; see the module
    docstring) with the least predicted log-cosine objective among those that meet ``target``, as ``(description,
    plan)``; a site where the family's option is not valid or saves nothing keeps its conv."""
    target = prepared.target if target is None else target
    considered = list(prepared.considered)
    fixed_m = prepared.macs_before - sum(s.macs for s, _ in considered)
    fixed_p = prepared.params_before - sum(s.params for s, _ in considered)
    budget_m = target.macs * prepared.macs_before if target.macs is not None else math.inf
    budget_p = target.params * prepared.params_before if target.params is not None else math.inf
    families: dict[tuple[str, tuple[tuple[str, Any], ...]], bool] = {}
    for _, cands in considered:
        for c in cands[1:]:
            families.setdefault(_family(c), "rank" in c.options)
    best: dict[str, tuple[float, str, BudgetPlan]] = {}
    for (form, opts), ranked in families.items():
        found = _uniform(prepared, target, form, opts, ranked, fixed_m, fixed_p, budget_m, budget_p)
        if found is None:
            continue
        spec, plan = found
        if form not in best or plan.objective < best[form][0]:
            best[form] = (plan.objective, spec, plan)
    return [(spec, plan) for _, spec, plan in best.values()]


def _uniform(prepared: PreparedBudget, target: Target, form: str, opts: tuple[tuple[str, Any], ...], ranked: bool,
             fixed_m: int, fixed_p: int, budget_m: float, budget_p: float) -> tuple[str, BudgetPlan] | None:
    considered = list(prepared.considered)
    base = dict(opts)

    def choices_at(rho: float | None) -> list[Candidate]:
        out = []
        for site, cands in considered:
            o = dict(base)
            if rho is not None:
                full = _exact_rank(form, o, site)
                o["rank"] = min(full, max(1, math.ceil(rho * full - 1e-9)))
            c = _candidate(form, o, site, cands) if _valid(form, o, site) else cands[0]
            out.append(c if c.macs < site.macs or c.params < site.params else cands[0])
        return out

    def fits(chosen: Sequence[Candidate]) -> bool:
        return (fixed_m + sum(c.macs for c in chosen) <= budget_m
                and fixed_p + sum(c.params for c in chosen) <= budget_p)

    if not ranked:
        chosen, rho = choices_at(None), None
        if not fits(chosen):
            return None
    else:  # the largest rank fraction meeting the target, over every breakpoint r / exact rank
        fulls = {_exact_rank(form, base, s) for s, _ in considered}
        points = sorted({r / full for full in fulls for r in range(1, full + 1)})
        lo, hi = 0, len(points) - 1
        if not fits(choices_at(points[0])):
            return None
        while lo < hi:  # MACs grow with the fraction: bisection over the breakpoints
            mid = (lo + hi + 1) // 2
            if fits(choices_at(points[mid])):
                lo = mid
            else:
                hi = mid - 1
        rho = points[lo]
        chosen = choices_at(rho)
    if not any(c.form != KEEP for c in chosen):
        return None
    weights = prepared.weights
    site_choices = tuple(SiteChoice(s.name, c, s.macs, s.params, float(weights.get(s.name, 1.0)), len(cands))
                         for (s, cands), c in zip(considered, chosen, strict=True))
    value = sum(sc.weight * site_loss(sc.predicted_rel_error, "log-cosine") for sc in site_choices)
    plan = BudgetPlan(target, site_choices, prepared.macs_before, prepared.params_before,
                      fixed_m + sum(c.macs for c in chosen), fixed_p + sum(c.params for c in chosen), value, "uniform",
                      prepared.forms, excluded=prepared.excluded, error_metric=prepared.error_metric)
    return _family_spec(form, opts, rho), plan


# ------------------------------------------------------------------------------------------------ the loop


def fit_end_to_end(prepared: PreparedBudget, gm: torch.fx.GraphModule, batches: Iterable[Any], *,
                   input_fn: InputFn | None = None, method: str = "auto", objective: str = "log-cosine",
                   buckets: int | None = None, max_rounds: int = 3, min_rounds: int = 2, margin: float = 0.1,
                   probes: int = 1, uniform: bool = True, max_samples: int | None = 512) -> BudgetPlan:
    """The plan for ``prepared`` (calibrated; no latency bound) whose measured whole-model error on ``batches``
    is the least found (see the module docstring): the local-error plan, then while its measured error exceeds the
    prediction by more than ``margin`` (relative) or a uniform plan measures better, re-plans weighted by the
    measured gains, at least ``min_rounds`` (the prediction can be pessimistic where the gains are not 1, so one
    gain-weighted plan is measured by default) and at most ``max_rounds`` plans in all, stopping early when a
    re-plan measures no better than an earlier plan; the uniform plans
    (``uniform=True``) are candidates too; the least measured error wins.
    ``gm`` is the traced original with shapes (not changed). Everything is measured on the first calibration
    items holding ``max_samples`` samples (``Sampled``; None: all). The result's ``end_to_end`` records every
    figure."""
    if prepared.target.latency is not None:
        raise ConfigError("fit_end_to_end plans MAC / params targets; a latency bound is fit_latency's")
    if not 1 <= min_rounds <= max_rounds:
        raise ConfigError(f"fit_end_to_end needs 1 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
    start = time.perf_counter()
    batches = Sampled(batches, max_samples, input_fn)
    cache: dict[str, Any] = {}
    # Bounded memory: each plan is built on a copy of gm, measured, and then only its replacement modules are kept
    # (for the gains); the whole built model only while it is the best measured so far (the winner's is handed to
    # rewrite). At most gm, the model being measured and the best one are alive at once.
    replaced: dict[tuple[str, ...], dict[str, nn.Module]] = {}  # signature -> site -> replacement module
    kept: dict[tuple[str, ...], tuple[tuple[float, bool], Any]] = {}  # signature -> (rank key, PassResult)

    def measure(plan: BudgetPlan, uniform_plan: bool) -> float:
        result = plan.apply(copy.deepcopy(gm))
        error = output_errors(gm, [result.graph_module], batches, input_fn=input_fn, cache=cache)[0]
        replaced[plan.signature] = {c.site: m for c in plan.changed
                                    if (m := find_submodule(result.graph_module, c.site)) is not None}
        key = (error, uniform_plan)
        if all(key <= other for other, _ in kept.values()):  # the best so far (ties kept: the order decides)
            kept[plan.signature] = (key, result)
            for sig in [sig for sig, (other, _) in kept.items() if other > key]:
                del kept[sig]
        return error

    plan = prepared.plan(method=method, objective=objective, buckets=buckets)
    gains: dict[str, float] = {}
    records: list[dict[str, Any]] = []
    unif = uniform_plans(prepared) if uniform else []
    measured = [measure(plan, False)] + [measure(p, True) for _, p in unif]
    uniform_rows = [{"plan": spec, "macs_fraction": p.macs_fraction, "params_fraction": p.params_fraction,
                     "changed_sites": len(p.changed), "predicted": predicted_error(
                         [c.predicted_rel_error for c in p.changed]), "measured": m}
                    for (spec, p), m in zip(unif, measured[1:], strict=True)]
    best_uniform = min((r["measured"] for r in uniform_rows), default=math.inf)
    candidates: list[tuple[float, str, BudgetPlan]] = [(m, f"uniform {spec}", p) for (spec, p), m in zip(
        unif, measured[1:], strict=True)]
    error = measured[0]
    seen = {plan.signature}
    gain_rows: dict[str, SiteGain] = {}
    history: dict[str, list[float]] = {}
    t_gains = 0.0
    while True:
        pred = predicted_error([c.predicted_rel_error for c in plan.changed],
                               [gains.get(c.site, 1.0) for c in plan.changed])
        records.append({"round": len(records), "weights": "measured gains" if gains else "local (1)",
                        "macs_fraction": plan.macs_fraction, "changed_sites": len(plan.changed),
                        "objective": plan.objective, "predicted": pred, "measured": error})
        candidates.append((error, f"budget round {len(records) - 1}", plan))
        worse = error > pred * (1.0 + margin) + 1e-12 or error > best_uniform
        no_gain = len(records) > 1 and error >= min(r["measured"] for r in records[:-1])
        if (not worse and len(records) >= min_rounds) or len(records) >= max_rounds or no_gain:
            break  # close enough to the prediction, out of rounds, or the last re-plan did not measure better
        t0 = time.perf_counter()
        replacements: dict[str, tuple[nn.Module, str]] = {}
        current = f"budget round {len(records) - 1}"
        for name, p in [(current, plan), *((f"uniform {spec}", u) for spec, u in unif)]:
            for c in p.changed:  # the current plan's replacements, and others' where no gain is known yet
                if c.site in replacements or (p is not plan and c.site in gain_rows):
                    continue
                module = replaced[p.signature].get(c.site)
                if module is not None and find_submodule(gm, c.site) is not None:
                    replacements[c.site] = (module, name)
        fresh = site_gains(gm, replacements, batches, input_fn=input_fn, probes=probes) if replacements else {}
        t_gains += time.perf_counter() - t0
        records[-1]["gains_measured"] = {k: v.gain for k, v in fresh.items() if math.isfinite(v.gain)}
        for k, v in fresh.items():
            if math.isfinite(v.gain) and v.gain > 0:
                gain_rows[k] = v
                history.setdefault(k, []).append(math.log(v.gain))
        # a site's gain: the geometric mean of its measurements (they depend on the replacement measured; the mean
        # keeps successive plans from swinging between two weightings); unmeasured sites get the median
        known = {k: math.exp(statistics.fmean(h)) for k, h in history.items()}
        fill = statistics.median(known.values()) if known else 1.0
        gains = {s.name: float(np.clip(known.get(s.name, fill), 1e-4, 1e4)) for s, _ in prepared.considered}
        weights = {name: g * float(prepared.weights.get(name, 1.0)) for name, g in gains.items()}
        plan = dataclasses.replace(prepared, weights=MappingProxyType(weights)).plan(
            method=method, objective=objective, buckets=buckets)
        if plan.signature in seen:
            pred = predicted_error([c.predicted_rel_error for c in plan.changed],
                                   [gains.get(c.site, 1.0) for c in plan.changed])
            records.append({"round": len(records), "weights": "measured gains", "macs_fraction": plan.macs_fraction,
                            "changed_sites": len(plan.changed), "objective": plan.objective, "predicted": pred,
                            "measured": next(m for m, _, p in candidates if p.signature == plan.signature),
                            "repeat": True})
            break
        seen.add(plan.signature)
        error = measure(plan, False)
    best_error, chosen, best = min(candidates, key=lambda t: (t[0], t[1].startswith("uniform")))
    preds = {f"budget round {r['round']}": r["predicted"] for r in records}
    preds |= {f"uniform {r['plan']}": r["predicted"] for r in uniform_rows}
    pred_best = preds[chosen]
    seconds = time.perf_counter() - start
    info = {"predicted": pred_best, "measured": best_error, "chosen": chosen, "rounds": records,
            "uniform": uniform_rows, "gains": {k: v.to_dict() for k, v in gain_rows.items()},
            "seconds": seconds, "seconds_gains": t_gains, "margin": margin, "probes": probes,
            "max_samples": max_samples, "samples": sum(batch_size_of(calibration_inputs(b, input_fn)) for b in batches),
            "measured_on": "the calibration batches: ||f'(x) - f(x)|| / ||f(x)|| over every output, eval mode"}
    seconds_all = dict(best.seconds) | {"end_to_end": seconds}
    return dataclasses.replace(best, end_to_end=MappingProxyType(info), seconds=MappingProxyType(seconds_all),
                               prebuilt=(best.signature, kept[best.signature][1]))


