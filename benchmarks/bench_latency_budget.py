"""Latency budgets: time to choose a ``Target(latency=...)`` plan (cold, warm memory cache, warm disk cache) and the
plan's predicted vs measured model latency, on the eager CPU backend.

Models: the digits CNN trained here (``fxrewrite.demos.digits``, batch 64 of 8x8 images) and resnet18 (random weights,
1x3x224x224; speed does not depend on values). The predicted latency is the original model's measured latency minus
the per-site savings timed by ``fxrewrite.budget.layer_latency``; the measured one times the whole rewritten model with
``fxrewrite.measure_latency`` (median of 20 runs, 3 repetitions, median taken). One torch thread.

Run alone: ``python -m benchmarks.bench_latency_budget [--quick]`` (``--quick``: digits only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from benchmarks.common import write_results
from fxrewrite.budget.choose import choose_plan
from fxrewrite.budget.layer_latency import LayerLatency, clear_memory_cache
from fxrewrite.budget.target import Target
from fxrewrite.demos import digits
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.measure.latency import measure_latency

THREADS = 1


def _traced(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    gm = trace(model)
    propagate_shapes(gm, (x,))
    return gm


def _models(quick: bool) -> list[tuple[str, nn.Module, torch.Tensor, float]]:
    torch.manual_seed(0)
    data = digits.load_data()
    cases = [("digits CNN (trained)", digits.train_cnn(data, epochs=3), data.x_test[:64].clone(), 0.7)]
    if not quick:
        torch.manual_seed(0)
        cases.append(("resnet18", torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224), 0.6))
    return cases


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="digits only")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    rows = []
    for name, model, x, fraction in _models(args.quick):
        cache = Path(tempfile.mkdtemp()) / "latency.json"
        clear_memory_cache()
        seconds = {}
        for phase in ("cold", "warm memory", "warm disk"):
            if phase == "warm disk":
                clear_memory_cache()
            timing = LayerLatency(cache=cache, progress=False, threads=THREADS)
            start = time.perf_counter()
            plan = choose_plan(_traced(model, x), Target(latency=fraction), latency=timing)
            seconds[phase] = time.perf_counter() - start
        rewritten = plan.apply(_traced(model, x)).graph_module
        checks = [plan.latency_check(measure_latency(model, rewritten, (x,), runs=20, warmup=3, backends=("eager",),
                                                     threads=THREADS)) for _ in range(3)]
        check = {k: statistics.median(c[k] for c in checks) for k in checks[0] if isinstance(checks[0][k], float)}
        rows.append([name, fraction, len(plan.changed), len(plan.choices), plan.latency_info["configs"],
                     seconds["cold"], seconds["warm memory"], seconds["warm disk"], plan.latency_fraction,
                     plan.macs_fraction, check["measured_original_ms"], check["measured_rewritten_ms"],
                     check["predicted_rewritten_ms"], check["predicted_over_measured"]])
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    notes = ["target = summed conv latency (timed per distinct layer configuration) <= fraction x original's; a "
             "candidate not faster than the original conv is never chosen. Plan time includes tracing, candidate "
             "generation and timing; warm = the same plan again with the layer timings cached.",
             "measured = whole model, eager, median of 20 runs after 3 warm-up, median of 3 repetitions; "
             "predicted = measured original - summed per-site savings. 1 torch thread. Noisy shared machine."]
    headers = ["model", "target", "sites changed", "sites", "configs timed", "plan s (cold)", "plan s (warm memory)",
               "plan s (warm disk)", "conv latency fraction", "MAC fraction", "original ms", "rewritten ms",
               "predicted ms", "predicted / measured"]
    return write_results("latency_budget" + ("_quick" if args.quick else ""), "Latency budgets (CPU, eager)",
                         headers, rows, notes)


if __name__ == "__main__":
    print(main())
