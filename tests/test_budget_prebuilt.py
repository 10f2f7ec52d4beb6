"""The end-to-end fit's built models: the chosen plan's is handed to ``rewrite`` (``BudgetPlan.prebuilt`` /
``applied``) instead of being factorised a second time, a plan whose choices changed since is applied afresh, and
no more than the model being measured and the best one so far are alive at once."""

from __future__ import annotations

import dataclasses
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite.budget.plan import BudgetPlan
from fxrewrite.budget.target import Target
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes

pytestmark = pytest.mark.usefixtures("one_thread")


def _stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()


def test_rewrite_uses_the_model_the_end_to_end_fit_built(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _stack()
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, 3, 12, 12, generator=gen),) for _ in range(2)]
    applied: list[tuple[str, ...]] = []
    real_apply = BudgetPlan.apply
    monkeypatch.setattr(BudgetPlan, "apply", lambda self, gm, **kw: applied.append(self.signature)
                        or real_apply(self, gm, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the whole-model latency check
        result = fxrewrite.rewrite(model, calib[0], target=Target(macs=0.5), calibration=calib)
    plan = result.budget
    assert plan.prebuilt is not None and plan.prebuilt[0] == plan.signature
    # the module rewrite returns is the one the fit built and measured: every distinct plan was built once, and
    # the chosen one was not built again
    assert result.module is plan.prebuilt[1].graph_module
    assert len(applied) == len(set(applied)) and plan.signature in applied
    assert result.ok, result.verification
    # what the pipeline reports is what applying the plan afresh gives (before the repair refits the weights)
    fresh = real_apply(plan, _traced(model, calib[0][0]))
    assert [(r.site, r.status, r.rel_error) for r in result.report.records] == [
        (r.site, r.status, r.rel_error) for r in fresh.records]
    shapes = [(n, tuple(p.shape)) for n, p in result.module.named_parameters()]
    assert shapes == [(n, tuple(p.shape)) for n, p in fresh.graph_module.named_parameters()]
    # the plan's printed value and equality do not involve the built model
    assert "prebuilt" not in repr(plan) and dataclasses.replace(plan, prebuilt=None) == plan


def test_a_plan_with_other_choices_is_applied_afresh() -> None:
    model = _stack()
    gm = _traced(model, torch.randn(1, 3, 12, 12))
    from fxrewrite.budget.choose import choose_plan
    plan = choose_plan(gm, Target(macs=0.5))
    other = choose_plan(gm, Target(macs=0.25))
    assert plan.signature != other.signature
    built = plan.apply(trace(gm))
    stale = dataclasses.replace(plan, prebuilt=(other.signature, built))
    assert stale.applied(trace(gm)) is not built
    assert dataclasses.replace(plan, prebuilt=(plan.signature, built)).applied(trace(gm)) is built


def _traced(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    gm = trace(model)
    propagate_shapes(gm, (example,))
    return gm


def test_the_fit_keeps_at_most_the_measured_and_the_best_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxrewrite.budget import end_to_end
    from fxrewrite.budget.choose import prepare_budget
    model = _stack()
    gen = torch.Generator().manual_seed(2)
    calib = [(torch.randn(4, 3, 12, 12, generator=gen),) for _ in range(2)]
    gm = _traced(model, calib[0][0])
    models: list[weakref.ref[torch.fx.GraphModule]] = []
    alive: list[int] = []
    real_apply, real_errors = BudgetPlan.apply, end_to_end.output_errors

    def apply(self: BudgetPlan, graph: torch.fx.GraphModule, **kw: object) -> object:
        result = real_apply(self, graph, **kw)
        models.append(weakref.ref(result.graph_module))
        return result

    def errors(*args: object, **kw: object) -> list[float]:
        gc.collect()
        alive.append(sum(r() is not None for r in models))
        return real_errors(*args, **kw)

    monkeypatch.setattr(BudgetPlan, "apply", apply)
    monkeypatch.setattr(end_to_end, "output_errors", errors)
    plan = end_to_end.fit_end_to_end(prepare_budget(gm, Target(macs=0.5), calibration=calib), gm, calib)
    assert len(models) >= 3 and len(alive) == len(models)  # the first plan, the uniform plans, later rounds
    assert max(alive) <= 2, alive
    gc.collect()
    assert sum(r() is not None for r in models) == 1 and plan.prebuilt is not None
    assert plan.prebuilt[1].graph_module is next(r() for r in models if r() is not None)
