"""The one-call entry points: ``plan`` (dry run) and ``rewrite``.

``rewrite`` deep-copies and traces the model (the input is never mutated), propagates shapes once, runs the
pipeline, verifies the result against the untouched model (``fxrewrite.verification.verify``), and returns
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

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.frontends.pipeline import PassesArg, Plan, RewriteResult, plan_graph, rewrite_graph
from fxrewrite.graph.capture import LeafSpec
from fxrewrite.graph.sites import ConvSite

__all__ = ["Plan", "RewriteResult", "plan", "rewrite", "sites"]


def plan(model: nn.Module, example_inputs: Any, passes: PassesArg = None, *, select: Any = None,
         concrete_args: Mapping[str, Any] | None = None, leaf_modules: Iterable[LeafSpec] = (),
         autowrap_functions: Iterable[Callable[..., Any]] = (), partial: bool = False,
         drop_hooks: bool = False) -> Plan:
    """Per-site decisions without changing anything: which sites each pass would rewrite (and with what), which
    it would skip and why. With no passes, the sites and their eligibility for each rewrite kind. Every
    configuration error is raised together in one ``ConfigError``; convolutions that are not sites (inside leaf
    modules, or never called) are listed in the report as ``not-visible``.

    >>> import torch, fxrewrite
    >>> p = fxrewrite.plan(torch.nn.Conv2d(8, 8, 3), (torch.randn(1, 8, 8, 8),), passes="grouped{groups=2}")
    >>> [(r.site, r.status, r.macs_before, r.macs_after) for r in p.records]
    [('conv', 'planned', 20736, 10368)]
    """
    if partial:
        _no_drop_hooks_with_partial(drop_hooks)
        from fxrewrite.frontends.partial import rewrite_partial
        _module, report, _left_alone = rewrite_partial(
            model, example_inputs, passes, select=select, concrete_args=concrete_args, leaf_modules=leaf_modules,
            autowrap_functions=autowrap_functions, verify=False, dry_run=True)
        return Plan((), report)
    return plan_graph(model, example_inputs, passes, select=select, concrete_args=concrete_args,
                      leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, drop_hooks=drop_hooks)


def _no_drop_hooks_with_partial(drop_hooks: bool) -> None:
    if drop_hooks:
        raise ConfigError("drop_hooks=True cannot be combined with partial=True yet: remove the hooks "
                          "(handle.remove()) before rewriting, or rewrite the traceable submodule on its own.")


def rewrite(model: nn.Module, example_inputs: Any, passes: PassesArg = None, *, select: Any = None,
            concrete_args: Mapping[str, Any] | None = None, leaf_modules: Iterable[LeafSpec] = (),
            autowrap_functions: Iterable[Callable[..., Any]] = (), verify: bool | str = True,
            rtol: float | None = None, atol: float | None = None, batches: Iterable[Any] | None = None,
            latency: bool | Mapping[str, Any] = False, calibration: Iterable[Any] | None = None,
            calibration_options: Mapping[str, Any] | None = None, target: Any = None,
            forms: Any = None, partial: bool = False, drop_hooks: bool = False) -> RewriteResult:
    """Rewrite a copy of ``model`` with ``passes`` (a pipeline string or Pass objects); the input is not mutated.

    ``select`` restricts which sites are touched (names, globs, ``re:`` regexes, module types or ``Rule``s with
    option overrides; see ``fxrewrite.graph.select``). With no passes the traced module is returned with a report of its
    sites. Every configuration error (pipeline, selectors, capture options, rules that match nothing, what a pass
    refuses) is raised together in one ``ConfigError`` before anything runs. Convolutions with hooks are skipped
    (``module-hooks``) unless ``drop_hooks=True``: then they are rewritten and the new modules have no hooks (each
    record counts them in ``details["dropped_hooks"]``; the input model keeps its hooks).

    ``verify`` (default True) checks the result against ``model`` on the example inputs (or ``batches``):
    ``"shapes"`` checks shapes and costs only. Without ``rtol``, exact rewrites are gated at float level and lossy
    ones (any changed site not exact) get figures without an error gate; shape and non-finite gates always apply.
    A failed gate does not raise: ``result.verification.ok`` is False and the report says which site failed
    (``result.verification.raise_if_failed()`` raises). ``latency=True`` (or a dict of ``measure_latency``
    keyword arguments) also measures both models.

    ``target=fxrewrite.Target(macs=0.5)`` replaces ``passes``: one form and rank/groups per site is chosen
    (data-free, from the weights' spectra, or with ``calibration`` from the output error on those activations; see
    ``fxrewrite.budget.choose``) so the rewritten model's totals stay within the target with the least predicted error;
    ``forms`` restricts the candidate forms. ``Target(latency=0.5)`` times the layers
    (``fxrewrite.budget.layer_latency``);
    with ``latency=True`` the plan also compares its predicted model latency with the measured one. The chosen
    plan is in ``result.report.context["budget"]``.

    ``partial=True`` handles models that do not trace as a whole (detectors taking lists of images, data-dependent
    control flow): the largest submodules that trace are rewritten, the rest stays eager, and the report's context
    lists what was left alone and why (``fxrewrite.frontends.partial``).

    ``calibration`` (an iterable of input tuples that can be read more than once, e.g. a DataLoader or a list)
    repairs the new weights on real activations before verification: each rewritten site's last conv is refit by
    least squares to the original site output, in graph order, and batch-norm statistics are matched (see
    ``fxrewrite.tuning.repair``; ``calibration_options`` are passed to it). The report then shows per-site errors before
    and after repair.

    >>> import torch, fxrewrite
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    >>> r = fxrewrite.rewrite(m, (torch.randn(1, 3, 16, 16),), passes="depthwise-separable{rank=exact}")
    >>> r.ok, r.verification.level.split(" (")[0], r.report.costs.sites[0].macs_before  # 8*14*14 outputs x 3*3*3
    (True, 'float level', 42336)
    """
    if isinstance(model, torch.export.ExportedProgram):
        from fxrewrite.frontends.exported import rewrite_exported
        unsupported = [name for name, given in (
            ("calibration", calibration is not None), ("calibration_options", calibration_options is not None),
            ("target", target is not None), ("forms", forms is not None), ("partial", partial),
            ("drop_hooks", drop_hooks), ("concrete_args", concrete_args is not None),
            ("leaf_modules", bool(tuple(leaf_modules))), ("autowrap_functions", bool(tuple(autowrap_functions))),
        ) if given]
        if unsupported:
            raise ConfigError(f"{', '.join(unsupported)} not supported for an ExportedProgram input (it is already "
                              "captured, and budgets and repair run on the eager module): rewrite the eager module "
                              "with these options, then torch.export the result.")
        return rewrite_exported(model, example_inputs, passes, select=select, verify=verify, rtol=rtol, atol=atol,
                                batches=batches, latency=latency)
    if partial:
        if target is not None or calibration is not None:
            raise ConfigError("partial=True cannot be combined with target= or calibration= yet")
        _no_drop_hooks_with_partial(drop_hooks)
        from fxrewrite.frontends.partial import rewrite_partial
        module, report, _left_alone = rewrite_partial(
            model, example_inputs, passes, select=select, concrete_args=concrete_args, leaf_modules=leaf_modules,
            autowrap_functions=autowrap_functions, verify=verify, rtol=rtol, atol=atol)
        return RewriteResult(module, report, report.verification)  # type: ignore[arg-type]
    return rewrite_graph(model, example_inputs, passes, select=select, concrete_args=concrete_args,
                         leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, verify=verify, rtol=rtol,
                         atol=atol, batches=batches, latency=latency, calibration=calibration,
                         calibration_options=calibration_options, target=target, forms=forms, drop_hooks=drop_hooks)


def sites(model: nn.Module, example_inputs: Sequence[Any], **capture: Any) -> list[ConvSite]:
    """The convolution sites of ``model`` with shapes (a shortcut for ``plan(...).sites``)."""
    return list(plan(model, example_inputs, **capture).sites)
