"""The one-call entry points: ``plan`` (dry run) and ``rewrite``.

``rewrite`` deep-copies and traces the model (the input is never mutated), propagates shapes once, runs the
pipeline, verifies the result against the untouched model (``fxrewrite.verify``), and returns
``RewriteResult(module, report, verification)``; the report carries the per-site records, the analytic costs before
and after, the verification and (on request) measured latency. ``plan`` does the same up to the decisions and
changes nothing.

>>> import torch
>>> import fxrewrite
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3))
>>> result = fxrewrite.rewrite(model, (torch.randn(1, 3, 32, 32),), passes="depthwise-separable{rank=exact}")
>>> torch.testing.assert_close(result.module(torch.ones(1, 3, 32, 32)), model(torch.ones(1, 3, 32, 32)))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxrewrite.capture import LeafSpec, trace
from fxrewrite.cost import ModelCost, model_cost
from fxrewrite.errors import ConfigError
from fxrewrite.latency import LatencyReport, measure_latency
from fxrewrite.report import CostComparison, Report, SiteCost, SiteRecord
from fxrewrite.select import parse_rules
from fxrewrite.shapes import propagate_shapes
from fxrewrite.site_table import sites_table
from fxrewrite.sites import ConvSite, find_sites
from fxrewrite.verify import Verification, site_groups
from fxrewrite.verify import verify as verify_rewrite

PassesArg = str | Iterable[Any] | None


def _passes(passes: PassesArg) -> list[Any]:
    from fxrewrite.passes import Pass, parse_pipeline
    if passes is None:
        return []
    if isinstance(passes, str):
        return parse_pipeline(passes)
    if isinstance(passes, Pass):
        return [passes]
    out = list(passes)
    bad = [p for p in out if not isinstance(p, Pass)]
    if bad:
        raise ConfigError(f"passes must be a pipeline string or Pass objects; got {bad!r}")
    return out


def _inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        raise ConfigError("example_inputs must be a tuple of positional inputs, as for torch.export: "
                          "write (x,) instead of x.")
    if not isinstance(example_inputs, tuple | list):
        raise ConfigError(f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}")
    return tuple(example_inputs)


def _capture(model: nn.Module, example_inputs: Any, concrete_args: Mapping[str, Any] | None,
             leaf_modules: Iterable[LeafSpec], autowrap_functions: Iterable[Callable[..., Any]]
             ) -> tuple[torch.fx.GraphModule, tuple[Any, ...]]:
    inputs = _inputs(example_inputs)
    gm = trace(model, concrete_args=concrete_args, leaf_modules=leaf_modules,
               autowrap_functions=autowrap_functions)
    propagate_shapes(gm, inputs)
    return gm, inputs


def _context(model: nn.Module, inputs: tuple[Any, ...], passes: list[Any]) -> dict[str, Any]:
    return {"model": type(model).__name__,
            "input_shapes": [list(x.shape) if isinstance(x, torch.Tensor) else repr(x) for x in inputs],
            "passes": [p.spec() for p in passes]}


@dataclass(frozen=True)
class Plan:
    """A dry run: every site with its eligibility, and (with passes) what each pass would do at each site."""

    sites: tuple[ConvSite, ...]
    report: Report

    @property
    def records(self) -> tuple[SiteRecord, ...]:
        return self.report.records

    def __str__(self) -> str:
        text = sites_table(self.sites)
        return text if not self.records else f"{text}\n\n{self.report}"


@dataclass(frozen=True)
class RewriteResult:
    """The rewritten module (a new GraphModule; the input is untouched), the report of what changed, and the
    verification (None with ``verify=False``) and latency (None unless requested) that the report also carries."""

    module: torch.fx.GraphModule
    report: Report
    verification: Verification | None = None
    latency: LatencyReport | None = None
    repair: Any = None  # fxrewrite.repair.RepairResult when calibration data was given
    budget: Any = None  # fxrewrite.budget.BudgetPlan when a target was given

    @property
    def ok(self) -> bool | None:
        """The verification verdict (None when not verified)."""
        return None if self.verification is None else self.verification.ok


def plan(model: nn.Module, example_inputs: Any, passes: PassesArg = None, *, select: Any = None,
         concrete_args: Mapping[str, Any] | None = None, leaf_modules: Iterable[LeafSpec] = (),
         autowrap_functions: Iterable[Callable[..., Any]] = (), partial: bool = False) -> Plan:
    """Per-site decisions without changing anything: which sites each pass would rewrite (and with what), which
    it would skip and why. With no passes, the sites and their eligibility for each rewrite kind.

    >>> import torch, fxrewrite
    >>> p = fxrewrite.plan(torch.nn.Conv2d(8, 8, 3), (torch.randn(1, 8, 8, 8),), passes="grouped{groups=2}")
    >>> [(r.site, r.status, r.macs_before, r.macs_after) for r in p.records]
    [('conv', 'planned', 20736, 10368)]
    """
    from fxrewrite.passes import PassManager
    if partial:
        from fxrewrite.partial import rewrite_partial
        _module, report, _left_alone = rewrite_partial(
            model, example_inputs, passes, select=select, concrete_args=concrete_args, leaf_modules=leaf_modules,
            autowrap_functions=autowrap_functions, verify=False, dry_run=True)
        return Plan((), report)
    pipeline = _passes(passes)
    rules = parse_rules(select)
    gm, inputs = _capture(model, example_inputs, concrete_args, leaf_modules, autowrap_functions)
    sites = tuple(find_sites(gm))
    records = PassManager(pipeline, rules).plan(gm) if pipeline else []
    if rules and not pipeline:
        from fxrewrite.select import resolve
        resolve(rules, sites)  # a rule that matches nothing is an error even in a listing
    report = Report(tuple(records), title="fxrewrite plan (dry run: nothing was changed)",
                    context=_context(model, inputs, pipeline))
    return Plan(sites, report)


def rewrite(model: nn.Module, example_inputs: Any, passes: PassesArg = None, *, select: Any = None,
            concrete_args: Mapping[str, Any] | None = None, leaf_modules: Iterable[LeafSpec] = (),
            autowrap_functions: Iterable[Callable[..., Any]] = (), verify: bool | str = True,
            rtol: float | None = None, atol: float | None = None, batches: Iterable[Any] | None = None,
            latency: bool | Mapping[str, Any] = False, calibration: Iterable[Any] | None = None,
            calibration_options: Mapping[str, Any] | None = None, target: Any = None,
            forms: Any = None, partial: bool = False) -> RewriteResult:
    """Rewrite a copy of ``model`` with ``passes`` (a pipeline string or Pass objects); the input is not mutated.

    ``select`` restricts which sites are touched (names, globs, ``re:`` regexes, module types or ``Rule``s with
    option overrides; see ``fxrewrite.select``). With no passes the traced module is returned with a report of its
    sites.

    ``verify`` (default True) checks the result against ``model`` on the example inputs (or ``batches``):
    ``"shapes"`` checks shapes and costs only. Without ``rtol``, exact rewrites are gated at float level and lossy
    ones (any changed site not exact) get figures without an error gate; shape and non-finite gates always apply.
    A failed gate does not raise: ``result.verification.ok`` is False and the report says which site failed
    (``result.verification.raise_if_failed()`` raises). ``latency=True`` (or a dict of ``measure_latency``
    keyword arguments) also measures both models.

    ``target=fxrewrite.Target(macs=0.5)`` replaces ``passes``: one form and rank/groups per site is chosen
    (data-free, from the weights' spectra; see ``fxrewrite.budget``) so the rewritten model's totals stay within
    the target with the least predicted error; ``forms`` restricts the candidate forms. The chosen plan is in
    ``result.report.context["budget"]``.

    ``partial=True`` handles models that do not trace as a whole (detectors taking lists of images, data-dependent
    control flow): the largest submodules that trace are rewritten, the rest stays eager, and the report's context
    lists what was left alone and why (``fxrewrite.partial``).

    ``calibration`` (an iterable of input tuples that can be read more than once, e.g. a DataLoader or a list)
    repairs the new weights on real activations before verification: each rewritten site's last conv is refit by
    least squares to the original site output, in graph order, and batch-norm statistics are matched (see
    ``fxrewrite.repair``; ``calibration_options`` are passed to it). The report then shows per-site errors before
    and after repair.

    >>> import torch, fxrewrite
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    >>> r = fxrewrite.rewrite(m, (torch.randn(1, 3, 16, 16),), passes="depthwise-separable{rank=exact}")
    >>> r.ok, r.verification.level.split(" (")[0], r.report.costs.sites[0].macs_before  # 8*14*14 outputs x 3*3*3
    (True, 'float level', 42336)
    """
    from fxrewrite.passes import PassManager
    if isinstance(model, torch.export.ExportedProgram):
        from fxrewrite.exported import rewrite_exported
        if calibration is not None:
            raise ConfigError("calibration= is not supported for an ExportedProgram input yet: rewrite the eager "
                              "module with calibration, then torch.export the result.")
        return rewrite_exported(model, example_inputs, passes, select=select, verify=verify, rtol=rtol, atol=atol,
                                batches=batches, latency=latency)
    if partial:
        if target is not None or calibration is not None:
            raise ConfigError("partial=True cannot be combined with target= or calibration= yet")
        from fxrewrite.partial import rewrite_partial
        module, report, _left_alone = rewrite_partial(
            model, example_inputs, passes, select=select, concrete_args=concrete_args, leaf_modules=leaf_modules,
            autowrap_functions=autowrap_functions, verify=verify, rtol=rtol, atol=atol)
        return RewriteResult(module, report, report.verification)  # type: ignore[arg-type]
    if verify not in (True, False, "shapes"):
        raise ConfigError(f"verify must be True, False or 'shapes', got {verify!r}")
    pipeline = _passes(passes)
    rules = parse_rules(select)
    gm, inputs = _capture(model, example_inputs, concrete_args, leaf_modules, autowrap_functions)
    before = model_cost(gm)
    before_nodes = {(str(n.target) if n.op == "call_module" else n.name): n.name for n in gm.graph.nodes}
    budget_plan = None
    if target is not None:
        if pipeline:
            raise ConfigError("give either passes= or target=, not both: a target chooses the passes per site")
        from fxrewrite.budget import DEFAULT_FORMS, choose_plan
        budget_plan = choose_plan(gm, target, forms=forms or DEFAULT_FORMS, select=select)
        result = budget_plan.apply(gm)
    else:
        result = PassManager(pipeline, rules)(gm)
    repaired = None
    if calibration is not None:
        from fxrewrite.repair import repair
        repaired = repair(model, result.graph_module, calibration, copy_module=False, concrete_args=concrete_args,
                          leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                          **dict(calibration_options or {}))
    after = model_cost(result.graph_module)
    context = _context(model, inputs, pipeline) | {
        "model_macs_before": before.macs, "model_macs_after": after.macs,
        "model_params_before": before.params, "model_params_after": after.params}
    rewritten_sites = [r.site for r in result.records if r.status == "rewritten"]
    verification = None
    if verify:
        lossy = any(r.changed and not r.exact for r in result.records)
        verification = verify_rewrite(
            model, result.graph_module, inputs, rtol=(math.inf if lossy else None) if rtol is None else rtol,
            atol=atol, numerics=verify is True, batches=batches, sites=rewritten_sites, concrete_args=concrete_args,
            leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    costs = CostComparison.from_verification(verification) if verification is not None else None
    if costs is None:
        costs = _compare_costs(before, after, before_nodes, result.graph_module, rewritten_sites)
    measured = None
    if latency:
        options = dict(latency) if isinstance(latency, Mapping) else {}
        measured = measure_latency(model, result.graph_module, inputs, **options)
    if budget_plan is not None:
        context["budget"] = budget_plan.to_dict(result)
    sections = (("repair (data-aware refit on the calibration data)", str(repaired)),) if repaired else ()
    report = Report(result.records, title="fxrewrite rewrite", context=context, costs=costs,
                    verification=verification, latency=measured, extra_sections=sections)
    return RewriteResult(result.graph_module, report, verification, measured, repaired, budget_plan)


def _compare_costs(before: ModelCost, after: ModelCost, before_nodes: Mapping[str, str],
                   gm: torch.fx.GraphModule, sites: Iterable[str]) -> CostComparison:
    """Costs before/after from the two ModelCosts; per site, the original node vs the site's rewritten nodes."""
    b_nodes = {c.node: c for c in before.nodes}
    a_nodes = {c.node: c for c in after.nodes}
    per_site = []
    for site, nodes in site_groups(gm, sites).items():
        orig = b_nodes.get(before_nodes.get(site, ""))
        new = [a_nodes[n.name] for n in nodes if n.name in a_nodes]
        per_site.append(SiteCost(site, orig.params if orig else None, sum(c.params for c in new),
                                 orig.macs if orig else None, sum(c.macs for c in new)))
    return CostComparison(before.params, after.params, before.macs, after.macs, before.activation_bytes,
                          after.activation_bytes, tuple(per_site))


def sites(model: nn.Module, example_inputs: Sequence[Any], **capture: Any) -> list[ConvSite]:
    """The convolution sites of ``model`` with shapes (a shortcut for ``plan(...).sites``)."""
    return list(plan(model, example_inputs, **capture).sites)
