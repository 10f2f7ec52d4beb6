"""Where ``rewrite()`` with its default options spends its time, stage by stage (issue 15's resnet152 row).

The pipeline's stages are timed by wrapping the functions it calls (``fxrewrite.frontends.pipeline``'s names, the
pass manager, the factorisation and the ownership step) with wall clocks while ``fxrewrite.rewrite(model, (x,),
passes="depthwise-separable{rank=1}")`` runs as users call it; medians over rounds, one torch thread, next to
``torch.fx.symbolic_trace`` and one eager forward (no_grad) timed in the same rounds. Nested stages are reported
apart (the factorisation is inside the pass; "pass, rest" is the pass without it); "other" is the whole rewrite
less the top-level stages (options, selectors, the report). A stage the pipeline no longer calls fails the run
(the wrapper was never reached), so the table cannot silently drift from the code.

Run alone: ``.venv/bin/python -m benchmarks.bench_rewrite_stages [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torchvision
from torch import nn

import fxrewrite
from benchmarks.common import write_results

PASSES = "depthwise-separable{rank=1}"

#: (label, module path, attribute, nested inside another stage)
STAGES: tuple[tuple[str, str, str, bool], ...] = (
    ("capture (trace + copy)", "fxrewrite.frontends.pipeline", "trace", False),
    ("shapes (FakeTensor)", "fxrewrite.frontends.pipeline", "propagate_shapes", False),
    ("tensor copies (ownership)", "fxrewrite.graph.ownership", "SharedTensors.own", False),
    ("sites", "fxrewrite.frontends.pipeline", "find_sites", False),
    ("pass validation", "fxrewrite.passes.conv_rewrite", "ConvRewritePass.validate", False),
    ("NaN/inf weight check", "fxrewrite.frontends.pipeline", "nonfinite_weights", False),
    ("costs (before, after)", "fxrewrite.frontends.pipeline", "model_cost", False),
    ("reference graph", "fxrewrite.frontends.pipeline", "_reference", False),
    ("pass", "fxrewrite.passes.manager", "PassManager.__call__", False),
    ("factorisation (in the pass)", "fxrewrite.maths.factorize", "grouped_separable", True),
    ("verification", "fxrewrite.frontends.pipeline", "verify_rewrite", False),
)


@contextlib.contextmanager
def _timed_stages(seconds: dict[str, list[float]]) -> Iterator[None]:
    """Wrap every stage's function so that each call adds its wall time to ``seconds[label]``."""
    import importlib
    restore: list[tuple[Any, str, Any]] = []
    try:
        for label, module_name, attr, _ in STAGES:
            owner: Any = importlib.import_module(module_name)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, name)

            def timed(*args: Any, _f: Callable[..., Any] = original, _label: str = label, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _f(*args, **kwargs)
                finally:
                    seconds[_label].append(time.perf_counter() - start)

            restore.append((owner, name, original))
            setattr(owner, name, functools.wraps(original)(timed))
        yield
    finally:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)


def stage_row(name: str, model: nn.Module, x: torch.Tensor, rounds: int) -> list[Any]:
    fxrewrite.rewrite(model, (x,), passes=PASSES)  # warm-up
    totals: list[float] = []
    bases: list[float] = []
    per_round: list[dict[str, float]] = []
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        torch.fx.symbolic_trace(model)
        with torch.no_grad():
            model(x)
        bases.append(time.perf_counter() - start)
        seconds: dict[str, list[float]] = defaultdict(list)
        gc.collect()
        with _timed_stages(seconds):
            start = time.perf_counter()
            fxrewrite.rewrite(model, (x,), passes=PASSES)
            totals.append(time.perf_counter() - start)
        missing = [label for label, *_ in STAGES if label not in seconds]
        if missing:
            raise RuntimeError(f"rewrite() no longer calls these stages: {missing}; update STAGES")
        per_round.append({k: sum(v) for k, v in seconds.items()})
    stages = {label: statistics.median(r[label] for r in per_round) for label, *_ in STAGES}
    total, base = statistics.median(totals), statistics.median(bases)
    top = sum(stages[label] for label, _, _, nested in STAGES if not nested)
    factor = stages["factorisation (in the pass)"]
    row = [name, total * 1e3, base * 1e3, total / base]
    for label, _, _, _ in STAGES:
        row.append((stages[label] - (factor if label == "pass" else 0.0)) * 1e3)
    row.append(max(total - top, 0.0) * 1e3)
    return row


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="resnet50 at 64x64 only, 3 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cases = [("resnet50 64x64", torchvision.models.resnet50().eval(), torch.randn(1, 3, 64, 64))] if args.quick else [
        ("resnet152 64x64", torchvision.models.resnet152().eval(), torch.randn(1, 3, 64, 64)),
        ("resnet50 224x224", torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224))]
    rows = []
    for name, model, x in cases:
        rows.append(stage_row(name, model, x, 3 if args.quick else args.rounds))
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    headers = ["model", "rewrite() ms", "trace + forward ms", "ratio",
               *[("pass, rest" if label == "pass" else label) + " ms" for label, *_ in STAGES], "other ms"]
    notes = [f"rewrite(model, (x,), passes={PASSES!r}) with default options; each stage's median wall time over the "
             "rounds, from wrappers around the functions the pipeline calls (nested: the factorisation, inside the "
             "pass; 'pass, rest' excludes it); 'other' = the whole less the top-level stages. trace + forward = "
             "torch.fx.symbolic_trace plus one eager no_grad forward, timed in the same rounds; one torch thread."]
    return write_results("rewrite_stages" + ("_quick" if args.quick else ""), "Where rewrite() spends its time (CPU)",
                         headers, rows, notes)


if __name__ == "__main__":
    print(main())
