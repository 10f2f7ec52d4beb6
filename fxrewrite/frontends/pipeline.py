"""The rewrite pipeline every front end runs: capture -> shapes -> passes (or a budget's plan) -> repair ->
verify -> report, in one place. ``fxrewrite.rewrite`` / ``fxrewrite.plan`` call it for a model that traces as a
whole; partial mode calls it once per traceable submodule and ExportedProgram mode on the program's module.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
>>> result = rewrite_graph(model, (torch.randn(1, 3, 16, 16),), "grouped{groups=2}")
>>> [(r.site, r.status) for r in result.report.records]
[('0', 'skipped'), ('2', 'rewritten')]
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from fxrewrite.errors import ConfigError, FxRewriteError
from fxrewrite.graph.capture import (
    LeafSpec,
    check_capture_options,
    check_traceable_type,
    copy_graph,
    graph_module_over,
    make_runnable,
    trace,
)
from fxrewrite.graph.ownership import SharedTensors
from fxrewrite.graph.select import Rule, parse_rules, resolve
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.graph.site_nodes import nonfinite_weights, site_groups
from fxrewrite.graph.sites import ConvSite, dropping_hooks, find_sites, hidden_convs, sites_remembered
from fxrewrite.measure.cost import ModelCost, model_cost
from fxrewrite.measure.latency import LatencyReport, measure_latency
from fxrewrite.report.report import CostComparison, Report, SiteCost, SiteRecord
from fxrewrite.report.site_table import sites_table
from fxrewrite.util.inputs import check_calibration, check_reiterable, example_inputs_tuple
from fxrewrite.util.runtime import submodule
from fxrewrite.verification.numerics import numerics_blocker
from fxrewrite.verification.result import Verification
from fxrewrite.verification.verify import gc_paused
from fxrewrite.verification.verify import verify as verify_rewrite

PassesArg = str | Iterable[Any] | None
_T = TypeVar("_T")


def as_passes(passes: PassesArg) -> list[Any]:
    """A pipeline string, one Pass or an iterable of Pass objects as a list of Pass objects."""
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


def _built_in(pipeline: list[Any]) -> bool:
    """Whether ``pipeline`` is non-empty and all fxrewrite's own passes: they change the graph only through the
    rewriter (new nodes) and never call the module, which lets the pipeline defer code generation and remember the
    sites (``graph.sites.sites_remembered``)."""
    return bool(pipeline) and all(type(p).__module__.startswith("fxrewrite.passes.") for p in pipeline)


def _collect(errors: list[ConfigError], fn: Callable[..., _T], *args: Any) -> _T | None:
    """``fn(*args)``, or None with its ``ConfigError`` appended to ``errors``."""
    try:
        return fn(*args)
    except ConfigError as exc:
        errors.append(exc)
        return None


@dataclass(frozen=True)
class _Prepared:
    pipeline: list[Any]
    rules: list[Rule]
    gm: torch.fx.GraphModule
    inputs: tuple[Any, ...]


def _prepare(model: nn.Module, example_inputs: Any, passes: PassesArg, select: Any,
             concrete_args: Mapping[str, Any] | None, leaf_modules: Iterable[LeafSpec],
             autowrap_functions: Iterable[Callable[..., Any]], drop_hooks: bool, budget: bool = False,
             shared: SharedTensors | None = None, defer_code: bool = False) -> _Prepared:
    """Parse the options, trace a copy of ``model`` and propagate shapes. Every configuration error (the pipeline,
    the selectors, the capture options, the example inputs, rules that match no site, what each pass refuses) is
    raised together in one ``ConfigError`` before any pass runs. With ``shared``, the copy's convolutions keep
    ``model``'s own weights (a pass only reads those it replaces; ``shared.own`` copies the rest later) and every
    other tensor is copied at once. ``defer_code`` (for a pipeline of built-in passes, which only edit the graph
    and after each of which ``PassManager`` recompiles) gives a capture without generated code: the caller must
    ``make_runnable(gm, generate=False)`` before running the passes."""
    check_traceable_type(model)
    errors: list[ConfigError] = []
    pipeline = _collect(errors, as_passes, passes) or []
    rules = _collect(errors, parse_rules, select) or []
    inputs = _collect(errors, example_inputs_tuple, example_inputs)
    leaf_specs = list(leaf_modules)
    before = len(errors)
    _collect(errors, check_capture_options, model, concrete_args, leaf_specs)
    if len(errors) > before:  # trace without the entries that name nothing, to check the selectors all the same
        known = {name for name, _ in model.named_modules()}
        leaf_specs = [s for s in leaf_specs if (isinstance(s, str) and s in known)
                      or (isinstance(s, type) and issubclass(s, nn.Module))]
    gm = None
    try:
        gm = trace(model, concrete_args=concrete_args, leaf_modules=leaf_specs, autowrap_functions=autowrap_functions,
                   share_tensors=shared, runnable=not defer_code)
        if shared is not None:
            shared.own(gm, keep={str(n.target) for n in gm.graph.find_nodes(op="call_module")
                                 if isinstance(submodule(gm, str(n.target)), nn.Conv2d)})
    except ConfigError as exc:
        errors.append(exc)
    except FxRewriteError:
        if not errors:
            raise
    if gm is not None and inputs is not None:
        counted = len(errors)
        _collect(errors, check_input_count, gm, inputs, type(model).__name__)
        if len(errors) == counted:
            _collect(errors, propagate_shapes, gm, inputs)
    if gm is not None:
        sites = find_sites(gm)
        if rules:
            _collect(errors, resolve, rules, sites, hidden_convs(gm, model))
        matched = [r for r in rules if any(r.matches(s) for s in sites)]
        with dropping_hooks(gm, drop_hooks):
            for p in pipeline:
                _collect(errors, p.validate, gm, matched)
        if pipeline or budget:  # the passes factorise the trained weights: NaN / inf there is the user's to fix
            chosen = [s for s in sites if (not rules or any(r.matches(s) for r in rules))
                      and (budget or any(_may_rewrite(p, s) for p in pipeline))]
            errors += [ConfigError(message) for message in nonfinite_weights(gm, chosen)]
    unique = list({str(e): e for e in errors}.values())
    if len(unique) == 1:
        raise unique[0]
    if unique:
        raise ConfigError(f"{len(unique)} configuration errors (nothing was changed):\n  "
                          + "\n  ".join(str(e) for e in unique))
    assert gm is not None and inputs is not None
    return _Prepared(pipeline, rules, gm, inputs)


def _may_rewrite(p: Any, site: ConvSite) -> bool:
    """Whether pass ``p`` may rewrite ``site``: False only where its kind's site-level reason already refuses it
    whatever the options (``ConvRewritePass._decide`` re-checks only ``channels-not-divisible`` with them), so the
    weights no pass reads (a separable pass's 1x1 convs) are not scanned for NaN / inf."""
    kind = getattr(p, "kind", None)
    reason = site.blocker or (site.reason_for(kind) if kind else None)
    return reason is None or reason.code == "channels-not-divisible"


# Modules whose forward depends on the training flag: batch / instance norm (batch statistics, running-stat updates),
# dropout, randomised leaky ReLU.
_TRAIN_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, nn.RReLU)


def check_input_count(gm: torch.fx.GraphModule, inputs: Sequence[Any], model_name: str) -> None:
    """The example inputs fill the traced forward's positional inputs: not more, and not fewer than it requires."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(str(n.target).startswith("*") for n in placeholders):
        return  # *args / **kwargs: any count may be right
    required = sum(1 for n in placeholders if not n.args)
    if required <= len(inputs) <= len(placeholders):
        return
    takes = f"{required}" if required == len(placeholders) else f"{required} to {len(placeholders)}"
    names = ", ".join(str(n.target) for n in placeholders)
    raise ConfigError(f"{model_name}.forward takes {takes} input{'s' if len(placeholders) != 1 else ''} ({names}), "
                      f"got {len(inputs)}")


def _warn_if_training(model: nn.Module) -> None:
    """Numerics are verified in eval mode: say so when a module whose output depends on the flag is in training
    mode (a plain stack of convs and activations computes the same in both, so it gets no warning)."""
    training = [(name, m) for name, m in model.named_modules() if m.training and isinstance(m, _TRAIN_DEPENDENT)]
    if training:
        name, module = training[0]
        more = f" and {len(training) - 1} more" if len(training) > 1 else ""
        warnings.warn(f"{type(model).__name__} is in training mode ({name!r}, a {type(module).__name__}{more}, "
                      "computes differently there): the verification runs both models in eval mode (dropout off, "
                      "batch norm on its running statistics), and the rewritten module keeps the training flags. "
                      "Call model.eval() first to rewrite for inference.", UserWarning, stacklevel=3)


def _context(model: nn.Module, inputs: tuple[Any, ...], passes: list[Any]) -> dict[str, Any]:
    return {"model": type(model).__name__,
            "input_shapes": [list(x.shape) if isinstance(x, torch.Tensor) else repr(x) for x in inputs],
            "passes": [p.spec() for p in passes]}


@dataclass(frozen=True)
class Plan:
    """A dry run: every site with its eligibility, and (with passes) what each pass would do at each site; the
    report also lists the convolutions that are not sites (``report.not_visible``)."""

    sites: tuple[ConvSite, ...]
    report: Report

    @property
    def records(self) -> tuple[SiteRecord, ...]:
        return self.report.records

    def __str__(self) -> str:
        from fxrewrite.passes.registry import eligibility_columns
        text = sites_table(self.sites, columns=eligibility_columns())
        if self.records:
            return f"{text}\n\n{self.report}"
        hidden = self.report.not_visible_lines()
        return "\n".join([text, *hidden]) if hidden else text


@dataclass(frozen=True)
class RewriteResult:
    """The rewritten module (a new GraphModule; the input is untouched), the report of what changed, and the
    verification (None with ``verify=False``) and latency (None unless requested) that the report also carries."""

    module: torch.fx.GraphModule
    report: Report
    verification: Verification | None = None
    latency: LatencyReport | None = None
    repair: Any = None  # fxrewrite.tuning.records.RepairResult when calibration data was given
    budget: Any = None  # fxrewrite.budget.plan.BudgetPlan when a target was given

    @property
    def ok(self) -> bool | None:
        """The verification verdict (None when not verified)."""
        return None if self.verification is None else self.verification.ok


def plan_graph(model: nn.Module, example_inputs: Any, passes: PassesArg = None, *, select: Any = None,
               concrete_args: Mapping[str, Any] | None = None, leaf_modules: Iterable[LeafSpec] = (),
               autowrap_functions: Iterable[Callable[..., Any]] = (), drop_hooks: bool = False) -> Plan:
    """``fxrewrite.plan`` for a model that traces as a whole (see there)."""
    from fxrewrite.passes import PassManager
    prep = _prepare(model, example_inputs, passes, select, concrete_args, leaf_modules, autowrap_functions,
                    drop_hooks)
    with dropping_hooks(prep.gm, drop_hooks):
        sites = tuple(find_sites(prep.gm))
    records = PassManager(prep.pipeline, prep.rules, drop_hooks=drop_hooks).plan(prep.gm) if prep.pipeline else []
    report = Report(tuple(records), title="fxrewrite plan (dry run: nothing was changed)",
                    context=_context(model, prep.inputs, prep.pipeline),
                    not_visible=tuple(hidden_convs(prep.gm, model)))
    return Plan(sites, report)




def rewrite_graph(model: nn.Module, example_inputs: Any, passes: PassesArg = None, *, select: Any = None,
                  concrete_args: Mapping[str, Any] | None = None, leaf_modules: Iterable[LeafSpec] = (),
                  autowrap_functions: Iterable[Callable[..., Any]] = (), verify: bool | str = True,
                  rtol: float | None = None, atol: float | None = None, batches: Iterable[Any] | None = None,
                  latency: bool | Mapping[str, Any] = False, calibration: Iterable[Any] | None = None,
                  calibration_options: Mapping[str, Any] | None = None, target: Any = None, forms: Any = None,
                  drop_hooks: bool = False) -> RewriteResult:
    """``fxrewrite.rewrite`` for a model that traces as a whole: capture, shapes, passes (or a budget), repair,
    verification and the report, in that order (see ``fxrewrite.rewrite`` for the options). Without a budget or
    calibration data (no long data loops), the cyclic garbage collector is paused meanwhile
    (``verification.verify.gc_paused``: its full collections grow with the graph)."""
    if isinstance(passes, Iterator):  # read once, for the check below and for _prepare
        passes = list(passes)
    try:
        built_in = target is None and _built_in(as_passes(passes))
    except ConfigError:  # reported by _prepare with the other configuration errors
        built_in = False
    with (gc_paused() if target is None and calibration is None else contextlib.nullcontext(),
          sites_remembered() if built_in else contextlib.nullcontext()):
        return _rewrite_graph(model, example_inputs, passes, select, concrete_args, leaf_modules,
                              autowrap_functions, verify, rtol, atol, batches, latency, calibration,
                              calibration_options, target, forms, drop_hooks, built_in)


def _rewrite_graph(model: nn.Module, example_inputs: Any, passes: PassesArg, select: Any,
                   concrete_args: Mapping[str, Any] | None, leaf_modules: Iterable[LeafSpec],
                   autowrap_functions: Iterable[Callable[..., Any]], verify: bool | str, rtol: float | None,
                   atol: float | None, batches: Iterable[Any] | None, latency: bool | Mapping[str, Any],
                   calibration: Iterable[Any] | None, calibration_options: Mapping[str, Any] | None, target: Any,
                   forms: Any, drop_hooks: bool, built_in: bool) -> RewriteResult:
    from fxrewrite.passes import PassManager
    if verify not in (True, False, "shapes"):
        raise ConfigError(f"verify must be True, False or 'shapes', got {verify!r}")
    # A budget builds and measures many plans from the capture: it gets a whole copy up front.
    shared = SharedTensors(model) if target is None and isinstance(model, nn.Module) else None
    prep = _prepare(model, example_inputs, passes, select, concrete_args, leaf_modules, autowrap_functions,
                    drop_hooks, budget=target is not None, shared=shared, defer_code=built_in)
    pipeline, inputs = prep.pipeline, prep.inputs
    gm = make_runnable(prep.gm, generate=not built_in)  # else the passes' recompile generates the code
    if calibration is not None:
        check_reiterable(calibration)
        check_calibration(calibration, inputs, dict(calibration_options or {}).get("input_fn"))
    if verify is True and numerics_blocker(model, model, inputs) is None:
        _warn_if_training(model)
    hidden = tuple(hidden_convs(gm, model))  # before the passes: they only replace sites
    before = model_cost(gm)
    reference = _reference(model, gm) if verify else None
    before_nodes = {(str(n.target) if n.op == "call_module" else n.name): n.name for n in gm.graph.nodes}
    budget_plan = None
    if target is not None:
        if pipeline:
            raise ConfigError("give either passes= or target=, not both: a target chooses the passes per site")
        from fxrewrite.budget.forms import DEFAULT_FORMS
        from fxrewrite.budget.whole_model import plan_budget
        with dropping_hooks(gm, drop_hooks):
            options = dict(calibration_options or {})  # the repair's memory cap bounds the budget's statistics too
            budget_plan = plan_budget(model, gm, inputs, target, forms=forms or DEFAULT_FORMS, select=select,
                                      calibration=calibration, input_fn=options.get("input_fn"),
                                      max_gram_bytes=options.get("memory_cap", 1 << 30))
            result = budget_plan.applied(gm)  # the end-to-end fit has built its plan already
    else:
        result = PassManager(pipeline, prep.rules, drop_hooks=drop_hooks)(gm)
    if shared is not None:  # what no pass replaced, and a bias a replacement reuses, gets its own copy now
        shared.own(result.graph_module)
    repaired = None
    if calibration is not None:
        from fxrewrite.tuning.repair import repair
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
            leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, reference=reference,
            costs=(before, after))
    costs = CostComparison.from_verification(verification) if verification is not None else None
    if costs is None:
        costs = compare_costs(before, after, before_nodes, result.graph_module, rewritten_sites)
    measured = None
    if latency:
        options = dict(latency) if isinstance(latency, Mapping) else {}
        measured = measure_latency(model, result.graph_module, inputs, **options)
    sections = (("repair (data-aware refit on the calibration data)", str(repaired)),) if repaired else ()
    if budget_plan is not None:
        from fxrewrite.budget.whole_model import check_model_latency
        model_timing = check_model_latency(model, result.graph_module, inputs, budget_plan)
        if model_timing is not None:
            context["model_latency"] = model_timing.to_dict()
            sections += (("whole-model latency (Target check_latency)", model_timing.line()),)
        context["budget"] = budget_plan.to_dict(result, latency=measured)
    report = Report(result.records, title="fxrewrite rewrite", context=context, costs=costs,
                    verification=verification, latency=measured, extra_sections=sections,
                    not_visible=hidden)
    return RewriteResult(result.graph_module, report, verification, measured, repaired, budget_plan)




def _reference(model: nn.Module, gm: torch.fx.GraphModule) -> torch.fx.GraphModule | None:
    """The verifier's view of the untouched ``model``: the captured graph (copied before the passes change it) over
    ``model``'s own modules, instead of tracing ``model`` a second time; None (the verifier traces it) where the
    graph names something ``model`` lacks (a tracer-made constant, a bare Conv2d's wrapper)."""
    if isinstance(model, nn.Conv2d):
        return None
    try:
        return graph_module_over(model, copy_graph(gm.graph), runnable=False)
    except (RuntimeError, AttributeError):
        return None


def compare_costs(before: ModelCost, after: ModelCost, before_nodes: Mapping[str, str],
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
