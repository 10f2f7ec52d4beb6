"""Budgets on the trained 1-D model: accuracy data-free / repaired / distilled, measured whole-model latency, plan time.

The pitch classifier of ``fxrewrite.demos.pitch`` (``PitchCNN``: a single-channel 256-tap stem at stride 4, then four
32-tap convs; 36 semitone classes of synthetic harmonic tones in noise) is trained seeded as the demo trains it (5000
frames, 5 epochs, two threads), then rewritten through ``fxrewrite.rewrite`` at each target, the way users call it:

- ``Target(macs=0.5)``, ``Target(macs=0.25)`` and ``Target(latency=0.7)`` (eager, one thread);
- data-free (``rewrite(model, (x,), target=t)``), and repaired (``rewrite(..., calibration=batches)``: a calibrated
  plan and least-squares repair on 16 unlabelled training batches of 64 frames), then distilled
  (``fxrewrite.distill(original, repaired, batches)``: a short seeded run on the same unlabelled batches);
- the example batch (what a latency target is measured on) is ``--batch`` test frames (default 64);
- test accuracy (2000 frames) of the original and of every result; the conv MAC fraction counted with forward hooks
  (``pitch.conv_macs``, independent of fxrewrite's cost model);
- measured whole-model latency ratio (rewritten / original): ``fxrewrite.budget.whole_model.time_models``, both
  models called alternately on the same example batch (interleaved rounds, median of each), one thread, repeated
  ``--repeats`` times and the median ratio taken; eager, and compiled with ``torch.compile`` (inductor, the
  compilation not timed) unless ``--no-inductor``; and then one more row, ``Target(latency=0.7, backend="inductor")``
  with calibration (its whole-model measurements compile every plan; an infeasible target says so);
- plan time: the sum of the plan's own timing fields (``report.context["budget"]["seconds"]``: candidates, layer
  timing, optimiser, whole-model fitting); rewrite time: the whole ``rewrite`` call (planning, factorisation, repair).

Run alone: ``python -m benchmarks.bench_trained_1d [--quick]`` (``--quick``: fewer frames and epochs, a short
distillation, no inductor; written to the ignored ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

from benchmarks.common import write_results
from fxrewrite.budget.layer_latency import clear_memory_cache
from fxrewrite.budget.target import BudgetInfeasible, Target
from fxrewrite.budget.whole_model import time_models
from fxrewrite.demos import pitch
from fxrewrite.demos.training import accuracy
from fxrewrite.frontends.api import rewrite
from fxrewrite.tuning.distill import distill

THREADS = 1
TARGETS: tuple[tuple[str, Target], ...] = (("macs=0.5", Target(macs=0.5)), ("macs=0.25", Target(macs=0.25)),
                                           ("latency=0.7 (eager)", Target(latency=0.7)))


def latency_ratio(original: nn.Module, rewritten: nn.Module, x: torch.Tensor, backend: str, repeats: int,
                  max_seconds: float) -> dict[str, float]:
    """Median over ``repeats`` interleaved measurements (one thread) of original ms, rewritten ms and their ratio."""
    timings = [time_models(original, rewritten, (x,), backend, threads=THREADS, min_runs=5, max_runs=60,
                           max_seconds=max_seconds, warmup=2) for _ in range(repeats)]
    return {"original_ms": statistics.median(t.original_ms for t in timings),
            "rewritten_ms": statistics.median(t.rewritten_ms for t in timings),
            "ratio": statistics.median(t.ratio for t in timings), "runs": sum(t.runs for t in timings)}


def _rewrite(model: nn.Module, x: torch.Tensor, target: Target, calibration: Any = None) -> tuple[Any, float]:
    clear_memory_cache()  # every plan times its layers cold: its plan time is what a first call costs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a slower model is warned about; the table shows the measured ratio
        start = time.perf_counter()
        result = rewrite(model, (x,), target=target, calibration=calibration, verify=False)
        return result, time.perf_counter() - start


def run(*, quick: bool, batch: int, repeats: int, inductor: bool, distill_steps: int, seed: int = 0
        ) -> dict[str, Any]:
    """Train, rewrite at every target (data-free, repaired, distilled), measure; returns rows and settings."""
    train, test, epochs = (2000, 1000, 2) if quick else (5000, 2000, 5)
    data = pitch.load_data(train=train, test=test, seed=seed)
    torch.set_num_threads(2)  # training as the demo trains (two threads); everything after on one
    t0 = time.perf_counter()
    model = pitch.train_cnn(data, epochs=epochs, seed=seed)
    train_seconds = time.perf_counter() - t0
    torch.set_num_threads(THREADS)
    xt, yt = data.x_test, data.y_test
    acc0 = accuracy(model, xt, yt)
    example = xt[:batch].clone()
    order = torch.randperm(train, generator=torch.Generator().manual_seed(seed + 1))
    calib = [(data.x_train[order[i:i + 64]],) for i in range(0, 16 * 64, 64)]
    frame = xt[:1]
    macs0 = sum(pitch.conv_macs(model, frame).values())
    print(f"trained in {train_seconds:.1f} s, test accuracy {acc0:.2f}%", file=sys.stderr)
    rows, details = [], []
    max_seconds = 1.0 if quick else 3.0
    for name, target in TARGETS:
        free, s_free = _rewrite(model, example, target)
        cal, s_cal = _rewrite(model, example, target, calib)
        torch.manual_seed(seed)
        t1 = time.perf_counter()
        dist = distill(model, cal.module, calib, steps=distill_steps, lr=1e-3, progress=False)
        s_dist = time.perf_counter() - t1
        budget = cal.report.context["budget"]
        plan_s = sum(budget["seconds"].values())
        plan_s_free = sum(free.report.context["budget"]["seconds"].values())
        eager = latency_ratio(model, cal.module, example, "eager", repeats, max_seconds)
        eager_free = latency_ratio(model, free.module, example, "eager", repeats, max_seconds)
        compiled: dict[str, Any] = {}
        if inductor:
            try:
                compiled = latency_ratio(model, cal.module, example, "inductor", 1, max_seconds)
            except Exception as exc:  # a compiler missing on the machine: the table says so
                compiled = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        fitted = budget.get("latency", {}).get("whole_model") if budget.get("latency") else None
        row = {"target": name, "acc_original": acc0, "acc_free": accuracy(free.module, xt, yt),
               "acc_repaired": accuracy(cal.module, xt, yt), "acc_distilled": accuracy(dist.module, xt, yt),
               "distill_reverted": dist.reverted,
               "macs_free": sum(pitch.conv_macs(free.module, frame).values()) / macs0,
               "macs_repaired": sum(pitch.conv_macs(cal.module, frame).values()) / macs0,
               "latency_eager_free": eager_free["ratio"], "latency_eager": eager["ratio"],
               "original_ms": eager["original_ms"], "rewritten_ms": eager["rewritten_ms"],
               "latency_inductor": compiled.get("ratio"), "inductor": compiled,
               "plan_seconds_free": plan_s_free, "plan_seconds": plan_s, "rewrite_seconds_free": s_free,
               "rewrite_seconds": s_cal, "distill_seconds": s_dist, "plan_seconds_parts": dict(budget["seconds"]),
               "changed_free": pitch.changed_sites(free), "changed_repaired": pitch.changed_sites(cal),
               "fit_rounds": fitted["rounds"] if fitted else None}
        details.append(row)
        ind = row["latency_inductor"]
        rows.append([name, acc0, row["acc_free"], row["acc_repaired"], row["acc_distilled"],
                     row["acc_repaired"] - acc0, row["macs_repaired"], row["latency_eager_free"],
                     row["latency_eager"], ind if ind is not None else "n/a", plan_s_free, plan_s, s_cal])
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    if inductor:
        row_i, detail_i = _inductor_target(model, example, calib, data, acc0, macs0, max_seconds)
        rows.append(row_i)
        details.append(detail_i)
        print(f"{row_i[0]}: {row_i}", file=sys.stderr)
    settings = {"train": train, "test": test, "epochs": epochs, "batch": batch, "calibration": "16 x 64 frames",
                "distill_steps": distill_steps, "distill_lr": 1e-3, "repeats": repeats, "threads": THREADS,
                "train_threads": 2, "train_seconds": train_seconds, "seed": seed}
    return {"rows": rows, "details": details, "settings": settings}


def _inductor_target(model: nn.Module, example: torch.Tensor, calib: Any, data: pitch.PitchData, acc0: float,
                     macs0: int, max_seconds: float) -> tuple[list[Any], dict[str, Any]]:
    """``Target(latency=0.7, backend="inductor")`` with calibration (repaired only: each whole-model measurement
    compiles a plan); an infeasible target is a row that says so, with the plans it measured."""
    name, target = "latency=0.7 (inductor)", Target(latency=0.7, backend="inductor")
    start = time.perf_counter()
    try:
        cal, s_cal = _rewrite(model, example, target, calib)
    except BudgetInfeasible as exc:
        seconds = time.perf_counter() - start
        detail = {"target": name, "infeasible": str(exc), "rewrite_seconds": seconds}
        return [name, acc0, "not run", "infeasible", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a",
                seconds], detail
    budget = cal.report.context["budget"]
    compiled = latency_ratio(model, cal.module, example, "inductor", 1, max_seconds)
    eager = latency_ratio(model, cal.module, example, "eager", 1, max_seconds)
    acc = accuracy(cal.module, data.x_test, data.y_test)
    macs = sum(pitch.conv_macs(cal.module, data.x_test[:1]).values()) / macs0
    plan_s = sum(budget["seconds"].values())
    detail = {"target": name, "acc_repaired": acc, "macs_repaired": macs, "latency_inductor": compiled["ratio"],
              "latency_eager": eager["ratio"], "plan_seconds": plan_s, "rewrite_seconds": s_cal,
              "changed_repaired": pitch.changed_sites(cal), "fit_rounds": budget["latency"]["whole_model"]["rounds"]}
    return [name, acc0, "not run", acc, "n/a", acc - acc0, macs, "n/a", eager["ratio"], compiled["ratio"], "n/a",
            plan_s, s_cal], detail


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller data, short distillation, no inductor")
    parser.add_argument("--batch", type=int, default=64, help="example batch in frames (latency measured on it)")
    parser.add_argument("--repeats", type=int, default=3, help="whole-model timings per model (median ratio)")
    parser.add_argument("--no-inductor", action="store_true", help="skip the torch.compile timings")
    parser.add_argument("--distill-steps", type=int, default=None, help="default 150 (quick: 20)")
    args = parser.parse_args(argv)
    steps = args.distill_steps if args.distill_steps is not None else (20 if args.quick else 150)
    threads_before = torch.get_num_threads()
    try:
        out = run(quick=args.quick, batch=args.batch, repeats=1 if args.quick else args.repeats,
                  inductor=not (args.quick or args.no_inductor), distill_steps=steps)
        return _write(out, args.quick)  # under the timing's thread count: the environment line says it
    finally:
        torch.set_num_threads(threads_before)


def _write(out: dict[str, Any], quick: bool) -> str:
    s = out["settings"]
    headers = ["target", "acc original %", "acc data-free %", "acc repaired %", "acc distilled %",
               "repaired - original", "conv MAC fraction (repaired)", "latency ratio data-free (eager)",
               "latency ratio repaired (eager)", "latency ratio repaired (inductor)", "plan s data-free",
               "plan s (repaired)", "rewrite s (repaired)"]
    notes = [f"PitchCNN trained seeded ({s['train']} frames, {s['epochs']} epochs, 2 threads, "
             f"{s['train_seconds']:.0f} s); test accuracy on {s['test']} frames; calibration = repair and "
             f"distillation data: {s['calibration']} unlabelled training frames; distillation {s['distill_steps']} "
             f"Adam steps, lr {s['distill_lr']:g}, seeded.",
             f"latency ratio = rewritten / original whole-model time, example batch {s['batch']} frames "
             f"({s['batch']}x1x1024x1), one thread, interleaved rounds (median), median of {s['repeats']} "
             "measurement(s); inductor = both compiled with torch.compile (compilation untimed). "
             "Noisy shared 2-core machine.",
             "MAC fraction: conv MACs counted with forward hooks, rewritten / original. plan s = the plan's timing "
             "fields (candidates, layer timing, optimiser, whole-model fit or end-to-end fit), every plan cold (no "
             "cached layer timings); rewrite s = the whole rewrite() call "
             "with calibration (plan + factorisation + repair), one thread.",
             "Target(latency=0.7) bounds the whole model's measured latency at the example batch (eager, one "
             "thread); data-free and repaired rewrites plan (and measure) separately. latency=0.7 (inductor): "
             "Target(latency=0.7, backend='inductor') with calibration only (every plan measured is compiled); "
             "'infeasible' = BudgetInfeasible, its message (every plan measured) is in the JSON."]
    name = "trained_1d" + ("_quick" if quick else "")
    rows = [[float(f"{v:.4g}") if isinstance(v, float) else v for v in row] for row in out["rows"]]  # 4 digits
    return write_results(name, "Budgets on the trained 1-D pitch model (CPU)", headers, rows, notes,
                         extra={"details": out["details"], "settings": s})


if __name__ == "__main__":
    print(main())
