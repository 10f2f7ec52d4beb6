"""The one-call entry points: ``plan`` (dry run) and ``rewrite``.

``rewrite`` deep-copies and traces the model (the input is never mutated), propagates shapes once, runs the
pipeline, and returns ``RewriteResult(module, report)``. ``plan`` does the same up to the decisions and changes
nothing.

>>> import torch
>>> import fxrewrite
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3))
>>> result = fxrewrite.rewrite(model, (torch.randn(1, 3, 32, 32),), passes="depthwise-separable{rank=exact}")
>>> torch.testing.assert_close(result.module(torch.ones(1, 3, 32, 32)), model(torch.ones(1, 3, 32, 32)))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxrewrite.capture import LeafSpec, trace
from fxrewrite.cost import model_cost
from fxrewrite.errors import ConfigError
from fxrewrite.report import Report, SiteRecord
from fxrewrite.select import parse_rules
from fxrewrite.shapes import propagate_shapes
from fxrewrite.site_table import sites_table
from fxrewrite.sites import ConvSite, find_sites

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
    """The rewritten module (a new GraphModule; the input is untouched) and the report of what changed."""

    module: torch.fx.GraphModule
    report: Report


def plan(model: nn.Module, example_inputs: Any, passes: PassesArg = None, *, select: Any = None,
         concrete_args: Mapping[str, Any] | None = None, leaf_modules: Iterable[LeafSpec] = (),
         autowrap_functions: Iterable[Callable[..., Any]] = ()) -> Plan:
    """Per-site decisions without changing anything: which sites each pass would rewrite (and with what), which
    it would skip and why. With no passes, the sites and their eligibility for each rewrite kind.

    >>> import torch, fxrewrite
    >>> p = fxrewrite.plan(torch.nn.Conv2d(8, 8, 3), (torch.randn(1, 8, 8, 8),), passes="grouped{groups=2}")
    >>> [(r.site, r.status, r.macs_before, r.macs_after) for r in p.records]
    [('conv', 'planned', 20736, 10368)]
    """
    from fxrewrite.passes import PassManager
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
            autowrap_functions: Iterable[Callable[..., Any]] = ()) -> RewriteResult:
    """Rewrite a copy of ``model`` with ``passes`` (a pipeline string or Pass objects); the input is not mutated.

    ``select`` restricts which sites are touched (names, globs, ``re:`` regexes, module types or ``Rule``s with
    option overrides; see ``fxrewrite.select``). With no passes the traced module is returned with a report of its
    sites.
    """
    from fxrewrite.passes import PassManager
    pipeline = _passes(passes)
    rules = parse_rules(select)
    gm, inputs = _capture(model, example_inputs, concrete_args, leaf_modules, autowrap_functions)
    before = model_cost(gm)
    result = PassManager(pipeline, rules)(gm)
    after = model_cost(result.graph_module)
    context = _context(model, inputs, pipeline) | {
        "model_macs_before": before.macs, "model_macs_after": after.macs,
        "model_params_before": before.params, "model_params_after": after.params}
    report = Report(result.records, title="fxrewrite rewrite", context=context)
    return RewriteResult(result.graph_module, report)


def sites(model: nn.Module, example_inputs: Sequence[Any], **capture: Any) -> list[ConvSite]:
    """The convolution sites of ``model`` with shapes (a shortcut for ``plan(...).sites``)."""
    return list(plan(model, example_inputs, **capture).sites)
