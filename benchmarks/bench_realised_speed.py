"""Realised speed: MAC ratio vs measured latency ratio of rewritten torchvision models.

For resnet18, resnet50 and vgg16 (random weights: speed does not depend on values), each rewritten with
depthwise-separable rank 1, grouped g=4 and g=32, and grouped-separable g=4 rank 4 (every eligible site), the
median latency of the original and of every rewritten model is measured side by side in one process (round robin:
each round calls all five once), eager contiguous and channels_last, batch 1 and 8 (and onnxruntime when it is
installed), and compiled with ``torch.compile`` (inductor, contiguous; the compilation happens in the warm-up round
and is not timed; ``--no-compiled`` skips it, ``--quick`` too). "realised" = (1 - latency ratio) /
(1 - MAC ratio): the share of the MAC saving that the latency realises (1.0 = the limit; < 0 = slower).

Run alone: ``.venv/bin/python -m benchmarks.bench_realised_speed [--quick] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

import fxrewrite
from benchmarks.common import write_results
from fxrewrite.measure.latency import time_round_robin

VARIANTS = {
    "dw-sep r1": "depthwise-separable{rank=1}",
    "grouped g4": "grouped{groups=4}",
    "grouped g32": "grouped{groups=32}",
    "grouped-sep g4 r4": "grouped-separable{groups=4, rank=4}",
}


def _prepare(module: nn.Module, layout: str, device: str) -> nn.Module:
    module = copy.deepcopy(module).to(device).eval()  # .to() mutates: keep the caller's model on the CPU
    return module.to(memory_format=torch.channels_last) if layout == "channels_last" else module


def _ort_session(module: nn.Module, x: torch.Tensor) -> Callable[[], Any] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import io
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, dynamo=False, input_names=["x"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same thread count as the eager runs
    sess = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)


def _runs(device: str, quick: bool, batch: int) -> int:
    """Timed rounds: a round runs the original and every variant once, so the count stays small on the CPU, where a
    batch-8 round of vgg16 and its four rewrites takes tens of seconds on one thread."""
    if device == "cuda":
        return 30
    return 5 if quick or batch == 1 else 3


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="resnet18, batch 1, two variants")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=None, help="timed rounds (default 5 at batch 1, 3 at batch 8 on "
                        "the CPU; 30 on CUDA)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--models", default=None, help="comma-separated torchvision model names")
    parser.add_argument("--no-compiled", action="store_true", help="skip the torch.compile (inductor) rows")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable on a shared 2-core machine)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    models = ["resnet18"] if args.quick else ["resnet18", "resnet50", "vgg16"]
    batches = [1] if args.quick else [1, 8]
    models = args.models.split(",") if args.models else models
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    variants = dict(list(VARIANTS.items())[:2]) if args.quick else VARIANTS
    rows: list[list[Any]] = []
    with torch.inference_mode():
        for name in models:
            model = torchvision.models.get_model(name, weights=None).eval()
            x224 = torch.randn(1, 3, 224, 224)
            rewritten: dict[str, tuple[nn.Module, float]] = {}
            for label, spec in variants.items():
                result = fxrewrite.rewrite(model, (x224,), passes=spec, verify=False)
                ctx = result.report.context
                rewritten[label] = (result.module, ctx["model_macs_after"] / ctx["model_macs_before"])
            modules = [model, *(m for m, _ in rewritten.values())]
            for batch in batches:
                runs = args.runs or _runs(device, args.quick, batch)
                x = torch.randn(batch, 3, 224, 224)
                for backend, calls in _backends(modules, x, device, compiled=not (args.quick or args.no_compiled)):
                    # the original and every variant in turn, round after round: load reaches them alike
                    times = [statistics.median(t) for t in time_round_robin(calls, runs, 1, sync)]
                    for (label, (_, mac_ratio)), t1 in zip(rewritten.items(), times[1:], strict=True):
                        rows.append(_row(name, label, batch, backend, mac_ratio, times[0], t1, runs))
                        print(rows[-1], file=sys.stderr)
    threads = torch.get_num_threads()
    notes = ["latency: median over timed rounds after 1 warm-up round; a round calls the original and each rewritten "
             "model once, in turn (so machine load reaches all alike); rounds per row in the 'rounds' column; "
             f"torch and onnxruntime intra-op threads = {threads}; input 224x224; MACs = multiply-adds of the whole "
             "model (bias not counted; FLOPs = 2 x MACs)",
             "realised = (1 - latency ratio) / (1 - MAC ratio): 1.0 means the latency fell as much as the MACs"]
    headers = ["model", "rewrite", "batch", "backend", "MAC ratio", "orig ms", "new ms", "latency ratio", "realised",
               "rounds"]
    suffix = ("_quick" if args.quick else "") + ("" if device == "cpu" else f"_{device}")
    suffix += f"_batch{'-'.join(map(str, batches))}" if args.batches else ""
    return write_results("realised_speed" + suffix, f"Realised speed ({device})", headers, rows, notes)


def _backends(modules: list[nn.Module], x: torch.Tensor, device: str, compiled: bool = False
              ) -> list[tuple[str, list[Callable[[], Any]]]]:
    """Per backend, one call per module on ``x``: eager contiguous and channels_last, onnxruntime on the CPU when it
    is installed, and with ``compiled`` every module compiled by ``torch.compile`` (inductor; compiled on the first
    call, which the timing's warm-up round makes)."""
    out = []
    for layout in ("contiguous", "channels_last"):
        xin = x.to(device)
        if layout == "channels_last":
            xin = xin.contiguous(memory_format=torch.channels_last)
        prepared = [_prepare(m, layout, device) for m in modules]
        out.append((f"eager {layout} ({device})", [lambda m=m, i=xin: m(i) for m in prepared]))
    if device == "cpu":
        sessions = [_ort_session(m, x) for m in modules]
        if all(s is not None for s in sessions):
            out.append(("onnxruntime (cpu)", sessions))
    if compiled:
        xin = x.to(device)
        prepared = [torch.compile(_prepare(m, "contiguous", device), backend="inductor", dynamic=False)
                    for m in modules]
        out.append((f"inductor ({device})", [lambda m=m, i=xin: m(i) for m in prepared]))
    return out


def _row(name: str, label: str, batch: int, backend: str, mac_ratio: float, t0: float, t1: float,
         runs: int) -> list[Any]:
    ratio = t1 / t0
    realised = (1 - ratio) / (1 - mac_ratio) if mac_ratio < 1 else float("nan")
    return [name, label, batch, backend, round(mac_ratio, 4), round(t0 * 1e3, 3), round(t1 * 1e3, 3),
            round(ratio, 4), round(realised, 3), runs]


if __name__ == "__main__":
    print(main())
