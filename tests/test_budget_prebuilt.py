"""The end-to-end fit hands its chosen plan's built model to ``rewrite`` (``BudgetPlan.prebuilt`` / ``applied``):
the chosen plan is not factorised a second time, and a plan whose choices changed since is applied afresh."""

from __future__ import annotations

import dataclasses
import warnings

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
