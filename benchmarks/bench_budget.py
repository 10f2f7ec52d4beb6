"""Budgets (``fxrewrite.budget``): the budgeted plan against uniform plans at the same MACs, and the time to choose.

1. Digits CNN (``fxrewrite.demos.digits``: trained on scikit-learn's digits, 4 convs, the 1-channel stem is not
   rewritable): for each MAC target, the best uniform plan of each family that meets it (uniform depthwise-separable
   rank, uniform grouped-separable rank with 4 groups, uniform group count, uniform Tucker-2 rank), and the budgeted
   plan at exactly that uniform plan's MAC fraction ("same MACs") and at the target itself. Measured: the logits'
   relative L2 error against the original and the test accuracy (450 images), data-free (no repair).
2. ResNet-50 with random weights (no downloads): budgeted plan vs uniform plans at the same MACs (output error on
   random inputs), and the time to choose the plan.
3. A synthetic chain of 1000 3x3 convs (widths cycling 16/32/48): the time to choose the plan.
4. The calibrated budget (issue 15): ResNet-18 (random weights) at 224x224 with 8 calibration images (2 batches of
   4), one thread: the statistics alone (``collect_site_stats``: forward passes, im2col, Grams or kept columns),
   ``choose_plan(..., calibration=...)`` and the whole ``rewrite(..., target=..., calibration=...)`` with its repair.

Run ``python -m benchmarks.bench_budget`` (``--quick``: one target, a 200-conv chain, no ResNet-50 rewrites, the
calibrated budget at 112x112; written to the git-ignored ``benchmarks/results/quick/``).
MACs are multiply-adds of the whole model (1 MAC = one multiply-add), as fractions of the original's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

import fxrewrite
from benchmarks.common import write_results
from fxrewrite.budget.choose import choose_plan
from fxrewrite.budget.forms import DEFAULT_FORMS
from fxrewrite.budget.plan import BudgetPlan
from fxrewrite.budget.target import Target
from fxrewrite.demos import digits
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.measure.cost import model_cost

WITH_TUCKER = (*DEFAULT_FORMS, "tucker2")
FAMILIES: dict[str, tuple[str, list[int]]] = {
    # family -> (pipeline template, values of the uniform option)
    "uniform depthwise-separable": ("depthwise-separable{{rank={}}}", list(range(1, 10))),
    "uniform grouped-separable g=4": ("grouped-separable{{groups=4, rank={}}}", [2, 4, 8, 12, 16, 24, 32, 48, 64]),
    "uniform grouped": ("grouped{{groups={}}}", [2, 4, 8, 16, 32]),
    "uniform Tucker-2": ("grouped-bottleneck{{groups=1, rank={}}}", [4, 8, 12, 16, 24, 32, 40, 48, 56, 64]),
}


def _traced(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    gm = trace(model)
    propagate_shapes(gm, (x,))
    return gm


def _uniform(model: nn.Module, x: torch.Tensor, spec: str) -> tuple[nn.Module, float, float, float]:
    """(rewritten module, MAC fraction, params fraction, log-cosine loss of the weight errors) of a pipeline."""
    result = fxrewrite.rewrite(model, (x,), passes=spec, verify=False)
    c = result.report.context
    err2 = sum(-math.log1p(-min(r.rel_error ** 2, 1 - 1e-9)) for r in result.report.records
               if r.status == "rewritten")
    return (result.module, c["model_macs_after"] / c["model_macs_before"],
            c["model_params_after"] / c["model_params_before"], err2)


def _budgeted(model: nn.Module, x: torch.Tensor, target: Target, **options: Any) -> tuple[nn.Module, BudgetPlan,
                                                                                          float]:
    gm = _traced(model, x)
    start = time.perf_counter()
    plan = choose_plan(gm, target, **options)
    seconds = time.perf_counter() - start
    result = plan.apply(gm)
    after = model_cost(result.graph_module)
    assert (after.macs, after.params) == (plan.macs_after, plan.params_after), "cost model disagrees with the plan"
    assert target.macs is None or after.macs <= target.macs * plan.macs_before, "target exceeded"
    return result.graph_module, plan, seconds


@torch.no_grad()
def _out_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    a, b = model.eval()(x), reference.eval()(x)
    return float((a - b).norm() / b.norm())


def _digits(targets: list[float], epochs: int, log: Callable[[str], None]) -> tuple[list[list[Any]], list[str]]:
    data = digits.load_data()
    model = digits.train_cnn(data, epochs=epochs)
    x, y = data.x_test, data.y_test
    example = x[:1]
    acc0 = digits.accuracy(model, x, y)
    log(f"digits: trained, test accuracy {acc0:.2f}%")
    ladders: dict[str, dict[int, tuple[nn.Module, float, float, float]]] = {}
    for family, (template, values) in FAMILIES.items():
        ladders[family] = {v: _uniform(model, example, template.format(v)) for v in values}
    rows: list[list[Any]] = [["digits", "-", "original", 1.0, 1.0, 0.0, 0.0, acc0, ""]]
    notes = []
    for t in targets:
        best_uniform: tuple[float, str] | None = None
        for family, ladder in ladders.items():
            fitting = [(u[1], v) for v, u in ladder.items() if u[1] <= t]
            if not fitting:
                rows.append(["digits", t, f"{family}: none meets the target", "", "", "", "", "", ""])
                continue
            _, v = max(fitting)
            spec = FAMILIES[family][0].format(v)
            module, frac, pfrac, err2 = ladder[v]
            acc_u, out_u = digits.accuracy(module, x, y), _out_error(module, model, x)
            rows.append(["digits", t, spec, frac, pfrac, err2, out_u, acc_u, ""])
            for label, forms in (("", DEFAULT_FORMS), (" +tucker2", WITH_TUCKER)):
                module_b, plan, seconds = _budgeted(model, example, Target(macs=frac), forms=forms)
                acc_b, out_b = digits.accuracy(module_b, x, y), _out_error(module_b, model, x)
                rows.append(["digits", t, f"budget{label} @ same MACs", plan.macs_fraction,
                             plan.params_fraction, plan.objective, out_b, acc_b, f"{acc_b - acc_u:+.2f} pts"])
                log(f"digits t={t}: {spec} acc {acc_u:.2f} vs budget{label} {acc_b:.2f} ({seconds:.2f}s to choose)")
            if best_uniform is None or acc_u > best_uniform[0]:
                best_uniform = (acc_u, spec)
        at_target = {}
        for label, forms in (("", DEFAULT_FORMS), (" +tucker2", WITH_TUCKER)):
            module_b, plan, _ = _budgeted(model, example, Target(macs=t), forms=forms)
            acc_b, out_b = digits.accuracy(module_b, x, y), _out_error(module_b, model, x)
            at_target[label] = acc_b
            choice = "; ".join(f"{c.site}: {c.candidate.spec()}" for c in plan.changed)
            rows.append(["digits", t, f"budget{label} @ target: {choice}", plan.macs_fraction, plan.params_fraction,
                         plan.objective, out_b, acc_b, ""])
        module_s, plan_s, _ = _budgeted(model, example, Target(macs=t), objective="squared")
        acc_s = digits.accuracy(module_s, x, y)
        rows.append(["digits", t, "budget @ target, objective=squared (ablation)", plan_s.macs_fraction,
                     plan_s.params_fraction, plan_s.objective, _out_error(module_s, model, x), acc_s,
                     f"{acc_s - at_target['']:+.2f} pts vs log-cosine"])
        if best_uniform is not None:
            for label, acc_b in at_target.items():
                verdict = "meets" if acc_b >= best_uniform[0] else "does NOT meet"
                notes.append(f"digits, MACs <= {t}x: the budgeted plan{label} ({acc_b:.2f}%) {verdict} the best "
                             f"uniform plan meeting the target ({best_uniform[1]}: {best_uniform[0]:.2f}%).")
    return rows, notes


def _resnet50(quick: bool, log: Callable[[str], None]) -> tuple[list[list[Any]], list[list[Any]]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    example = torch.randn(1, 3, 64, 64)
    inputs = torch.randn(4, 3, 64, 64)
    t0 = time.perf_counter()
    gm = _traced(model, example)
    trace_s = time.perf_counter() - t0
    timing = []
    for method in ("auto", "greedy", "dp"):
        t0 = time.perf_counter()
        plan = choose_plan(gm, Target(macs=0.5), method=method)
        total = time.perf_counter() - t0
        timing.append(["resnet50 (53 convs)", method, f"{plan.macs_fraction:.4f}", plan.objective, trace_s,
                       plan.seconds["candidates"], plan.seconds["optimise"], total])
        log(f"resnet50 {method}: {total:.2f}s, MACs {plan.macs_fraction:.4f}x")
    rows: list[list[Any]] = []
    if quick:
        return rows, timing
    for spec in ("grouped{groups=2}", "depthwise-separable{rank=1}", "grouped{groups=4}"):
        module, frac, pfrac, err2 = _uniform(model, example, spec)
        rows.append(["resnet50", "-", f"uniform {spec}", frac, pfrac, err2, _out_error(module, model, inputs), "",
                     ""])
        module_b, plan, _ = _budgeted(model, example, Target(macs=frac))
        out_b = _out_error(module_b, model, inputs)
        rows.append(["resnet50", "-", f"budget @ same MACs ({plan.method})", plan.macs_fraction, plan.params_fraction,
                     plan.objective, out_b, "", ""])
        log(f"resnet50 {spec}: uniform {rows[-2][6]:.4f} vs budget {out_b:.4f}")
    module_b, plan, _ = _budgeted(model, example, Target(macs=0.5))
    rows.append(["resnet50", 0.5, f"budget @ target ({plan.method})", plan.macs_fraction, plan.params_fraction,
                 plan.objective, _out_error(module_b, model, inputs), "", ""])
    return rows, timing


def _chain(n: int, log: Callable[[str], None]) -> list[Any]:
    widths = (16, 32, 48)
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(widths[i % 3], widths[(i + 1) % 3], 3, padding=1, bias=False), nn.ReLU()]
    torch.manual_seed(0)
    model = nn.Sequential(*layers)
    t0 = time.perf_counter()
    gm = _traced(model, torch.randn(1, 16, 8, 8))
    trace_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = choose_plan(gm, Target(macs=0.5))
    total = time.perf_counter() - t0
    log(f"chain of {n}: {total:.2f}s to choose")
    return [f"chain ({n} convs)", plan.method, f"{plan.macs_fraction:.4f}", plan.objective, trace_s,
            plan.seconds["candidates"], plan.seconds["optimise"], total]


def _calibrated(quick: bool, log: Callable[[str], None]) -> tuple[list[list[Any]], list[str]]:
    """Timing rows of the calibrated budget on ResNet-18 (random weights) with 8 images, and a note on what the
    statistics pass did."""
    from fxrewrite.budget.calibration import collect_site_stats
    from fxrewrite.graph.sites import find_sites
    size = 112 if quick else 224
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.randn(8, 3, size, size)
    batches = [(images[:4],), (images[4:],)]
    example = images[:1]
    t0 = time.perf_counter()
    gm = _traced(model, example)
    trace_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for (x,) in batches:
            model(x)
    forward_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    methods = [stats.method for _, stats in collect_site_stats(gm, find_sites(gm), batches)]
    stats_s, stats_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    plan = choose_plan(gm, Target(macs=0.5), calibration=batches)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    result = fxrewrite.rewrite(model, (example,), target=Target(macs=0.5), calibration=batches)
    rewrite_s, rewrite_cpu = time.perf_counter() - t0, time.process_time() - c0
    label = f"resnet18 {size}x{size}, calibrated, 8 images"
    log(f"{label}: statistics {stats_s:.2f}s, choose_plan {total:.2f}s ({total_cpu:.2f}s CPU), rewrite with repair "
        f"{rewrite_s:.2f}s ({rewrite_cpu:.2f}s CPU)")
    rows = [[label, plan.method, f"{plan.macs_fraction:.4f}", plan.objective, trace_s, plan.seconds["candidates"],
             plan.seconds["optimise"], total]]
    after = result.report.context.get("model_macs_after"), result.report.context.get("model_macs_before")
    note = (f"{label} (random weights, 2 batches of 4, Target(macs=0.5), default forms): one forward pass of the 8 "
            f"images {forward_s:.2f}s; the statistics alone (collect_site_stats, {len(methods)} sites: "
            f"{methods.count('gram')} dense Grams, {methods.count('columns')} kept as columns) {stats_s:.2f}s "
            f"({stats_cpu:.2f}s CPU), included in 'candidates s' with every site's calibrated candidate errors; "
            f"choose_plan {total:.2f}s wall, {total_cpu:.2f}s CPU time of this process (one thread: what an idle "
            f"machine's wall time would be); the whole rewrite(model, (x,), target=Target(macs=0.5), "
            f"calibration=batches) as users call it (capture, budget with its end-to-end check, repair, "
            f"verification, latency check) {rewrite_s:.2f}s wall, {rewrite_cpu:.2f}s CPU (MACs "
            f"{after[0] / after[1]:.4f}x). Load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.")
    return rows, [note]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one target, a 200-conv chain, no ResNet-50 rewrites")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs and many small factorisations: one thread is fastest on a busy machine

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    start = time.perf_counter()
    try:
        targets = [0.5] if args.quick else [0.5, 0.35, 0.25]
        rows, notes = _digits(targets, 8 if args.quick else 15, log)
        r50_rows, timing = _resnet50(args.quick, log)
        timing.append(_chain(200 if args.quick else 1000, log))
        calibrated, timing_notes = _calibrated(args.quick, log)
        timing += calibrated
        _write(rows, r50_rows, timing, notes, timing_notes, start, "_quick" if args.quick else "")
    finally:
        torch.set_num_threads(threads)
    return 0


def _write(rows: list[list[Any]], r50_rows: list[list[Any]], timing: list[list[Any]], notes: list[str],
           timing_notes: list[str], start: float, suffix: str = "") -> None:
    headers = ["model", "target", "plan", "MACs (x)", "params (x)", "pred. loss", "out. rel. err", "acc. %",
               "vs uniform"]
    notes = [*notes,
             "MACs and params are the whole model's, as fractions of the original (1 MAC = one multiply-add); every "
             "budgeted plan was applied and its cost recomputed by measure.cost: it equals the plan's and never "
             "exceeds the target.",
             "'budget @ same MACs' is choose_plan(Target(macs=f)) with f the uniform plan's MAC fraction (default "
             "forms depthwise-separable, grouped-separable, grouped; default objective log-cosine, sum of "
             "-log(1 - e^2) over sites, e the relative weight error, weight 1 per site). 'pred. loss' is that "
             "objective (for uniform plans: from the errors the passes report; for the ablation row: sum e^2). "
             "No repair or fine-tuning: data-free. '+tucker2' adds the opt-in Tucker-2 form "
             "(grouped-bottleneck{groups=1, rank=R}, predicted error: the truncated HOSVD's).",
             "out. rel. err: ||f'(x) - f(x)|| / ||f(x)|| of the logits (digits: the 450 test images; ResNet-50: 4 "
             "random 64x64 inputs, random weights).",
             f"total benchmark time {time.perf_counter() - start:.0f}s, torch threads 1."]
    md = write_results("budget" + suffix, "Budgeted plans vs uniform plans at the same MACs (data-free)", headers,
                       rows + r50_rows, notes,
                       extra={"timing_headers": ["model", "method", "MACs (x)", "objective", "trace s",
                                                 "candidates s", "optimise s", "choose_plan s"],
                              "timing": timing})
    timing_md = write_results("budget_timing" + suffix, "Time to choose a budgeted plan (MACs <= 0.5x)",
                              ["model", "method", "MACs (x)", "objective", "trace+shapes s", "candidates s",
                               "optimise s", "choose_plan s"], timing,
                              ["choose_plan = candidates (data-free: spectra of every site's weight for every form, "
                               "group count and rank; calibrated: the statistics pass and every candidate's output "
                               "error) + optimise (greedy hull walk + repair, and DP when one constraint binds).",
                               *timing_notes])
    print(md)
    print(timing_md)


if __name__ == "__main__":
    sys.exit(main())
