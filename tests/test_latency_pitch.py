"""A latency target on the 1-D pitch model (``fxrewrite.demos.pitch.PitchCNN``) with deterministic fake timers: the
whole-model bound holds on its architecture, the single-channel stem is a candidate, and a measurement that meets the
bound by less than its own noise is measured again (the slower of the two decides). No real timing is asserted."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from fxrewrite.budget.choose import PreparedBudget, prepare_budget
from fxrewrite.budget.layer_latency import LayerConfig, LayerLatency, build_module, clear_memory_cache
from fxrewrite.budget.target import Target
from fxrewrite.budget.whole_model import ModelTiming, fit_latency, ratio_standard_error
from fxrewrite.demos.pitch import PitchCNN, conv_macs
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes

BATCH = 2


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_memory_cache()
    yield
    clear_memory_cache()


def _conv_mmacs(module: nn.Module, x: torch.Tensor) -> float:
    """Millions of conv MACs by a forward-hook count, run on the meta device (shapes only: no arithmetic)."""
    return sum(conv_macs(copy.deepcopy(module).to("meta"), x.to("meta")).values()) / 1e6


def _layers_by_macs(rnd: Sequence[tuple[LayerConfig, Any]]) -> list[float]:
    """Per-layer fake: 0.05 ms + 1 ms per million conv MACs of the built module (hook count)."""
    return [0.05 + _conv_mmacs(build_module(c), torch.zeros(c.input_shape)) for c, _ in rnd]


class WholeModel:
    """Whole-model fake: ``overhead`` ms (outside the convs: the per-layer figures miss it) + 1 ms per million conv
    MACs; ``noise`` replaces the ratios of the first calls, in order, with scripted ones of standard error ``se``."""

    def __init__(self, overhead: float, noise: Sequence[float] = (), se: float = 0.0) -> None:
        self.overhead, self.noise, self.se = overhead, list(noise), se
        self.ratios: list[float] = []

    def __call__(self, original: nn.Module, rewritten: nn.Module, inputs: Sequence[Any], backend: str,
                 **_: Any) -> ModelTiming:
        a = self.overhead + _conv_mmacs(original, *inputs)
        ratio = self.noise.pop(0) if self.noise else (self.overhead + _conv_mmacs(rewritten, *inputs)) / a
        self.ratios.append(ratio)
        return ModelTiming(backend, a, a * ratio, 15, 1, 1, 0.01, tuple(tuple(x.shape) for x in inputs), "cpu",
                           self.se)


def _prepared(bound: float) -> tuple[PreparedBudget, nn.Module, torch.fx.GraphModule, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = PitchCNN().eval()
    x = torch.randn(BATCH, 1, 1024, 1)
    gm = trace(model)
    propagate_shapes(gm, (x,))
    timing = LayerLatency(timer=_layers_by_macs, progress=False)
    return prepare_budget(gm, Target(latency=bound), latency=timing), model, gm, (x,)


def test_the_whole_pitch_model_meets_a_latency_bound_with_the_stem_cut() -> None:
    prepared, model, gm, x = _prepared(0.7)
    fake = WholeModel(overhead=0.3 * _conv_mmacs(model, *x))  # 23% of the whole model is outside the convs
    plan = fit_latency(prepared, model, gm, x, timer=fake)
    rounds = plan.model_latency["rounds"]
    assert rounds[-1]["ratio"] <= 0.7 and plan.model_latency["timing"].ratio == rounds[-1]["ratio"]
    assert len(rounds) >= 2 and rounds[0]["ratio"] > 0.7  # per-layer 0.7 misses the overhead: tightened
    assert "stem" in [c.site for c in plan.changed]
    rewritten = plan.apply(trace(model)).graph_module
    a, b = fake.overhead + _conv_mmacs(model, *x), fake.overhead + _conv_mmacs(rewritten, *x)
    assert b / a == pytest.approx(rounds[-1]["ratio"])  # the weights applied have the architecture measured
    assert all(r["measurements"] == [r["ratio"]] for r in rounds)  # exact fake (se 0): never measured twice
    assert plan.model_latency["seconds"] >= 0 and "whole_model" in plan.to_dict()["seconds"]


def test_a_measurement_within_its_noise_of_the_bound_is_repeated_and_the_slower_decides() -> None:
    prepared, model, gm, x = _prepared(0.7)
    # 0.69 +- 0.01 meets 0.7 by less than 2 standard errors: measured again at 0.72, so the plan is not accepted;
    # the next (tighter) plan measures 0.60, 10 standard errors clear of the bound: accepted on one measurement
    fake = WholeModel(overhead=0.0, noise=[0.69, 0.72, 0.60], se=0.01)
    plan = fit_latency(prepared, model, gm, x, timer=fake, refine=0)  # no bisection back towards the bound
    rounds = plan.model_latency["rounds"]
    assert fake.ratios == [0.69, 0.72, 0.60]
    assert [r["measurements"] for r in rounds] == [[0.69, 0.72], [0.60]]
    assert rounds[0]["ratio"] == 0.72 and rounds[1]["sites_fraction_budget"] < rounds[0]["sites_fraction_budget"]
    assert plan.model_latency["timing"].ratio == pytest.approx(0.60)


def test_two_measurements_under_the_bound_accept_with_the_slower_one() -> None:
    prepared, model, gm, x = _prepared(0.7)
    fake = WholeModel(overhead=0.0, noise=[0.69, 0.695], se=0.01)
    plan = fit_latency(prepared, model, gm, x, timer=fake)
    (only,) = plan.model_latency["rounds"]
    assert only["measurements"] == [0.69, 0.695] and plan.model_latency["timing"].ratio == pytest.approx(0.695)
    fake = WholeModel(overhead=0.0, noise=[0.69], se=0.01)
    plan = fit_latency(prepared, model, gm, x, timer=fake, confirm=0.0)  # turned off: one measurement decides
    assert fake.ratios == [0.69] and plan.model_latency["timing"].ratio == pytest.approx(0.69)


def test_ratio_standard_error_from_interleaved_rounds() -> None:
    assert ratio_standard_error([1.0, 1.0, 1.0, 1.0], [0.5, 0.6, 0.7, 0.6]) == pytest.approx(1.2533 * 1.4826 * 0.025)
    assert ratio_standard_error([2.0] * 9, [1.0] * 9) == 0.0  # identical rounds: no spread
    assert ratio_standard_error([1.0, 1.0], [0.5, 0.9]) == 0.0  # under 3 rounds: no estimate


def test_an_overshooting_plan_is_refined_towards_the_bound_by_bisection() -> None:
    """The per-layer 0.7 plan measures 0.95 (scripted), the tightened one 0.50: far under 0.7, so plans between the
    two per-layer budgets are measured (the fake's own figures: overhead + MACs) and the least-objective plan that
    meets the bound is returned; every measured plan is in the rounds, the refining ones marked."""
    prepared, model, gm, x = _prepared(0.7)
    fake = WholeModel(overhead=0.3 * _conv_mmacs(model, *x), noise=[0.95, 0.50])
    plan = fit_latency(prepared, model, gm, x, timer=fake, refine=2)
    rounds = plan.model_latency["rounds"]
    assert [r["ratio"] for r in rounds[:2]] == [0.95, 0.50] and not any("refine" in r for r in rounds[:2])
    refined = rounds[2:]
    assert 1 <= len(refined) <= 2 and all(r["refine"] for r in refined)
    assert all(rounds[1]["sites_fraction_budget"] < r["sites_fraction_budget"] < 0.7 for r in refined)
    ok = [r for r in rounds if r["ratio"] <= 0.7]
    best = min(ok, key=lambda r: r["objective"])
    assert plan.objective == best["objective"] and plan.model_latency["timing"].ratio == best["ratio"] <= 0.7
    assert plan.objective < rounds[1]["objective"]  # refining found a plan that cuts less than the overshoot
    fake = WholeModel(overhead=0.3 * _conv_mmacs(model, *x), noise=[0.95, 0.50])
    plan = fit_latency(prepared, model, gm, x, timer=fake, refine=0)
    assert fake.ratios == [0.95, 0.50] and plan.model_latency["timing"].ratio == 0.50
