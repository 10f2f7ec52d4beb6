"""Realised speed: MAC ratio vs measured latency ratio of rewritten torchvision models.

For resnet18, resnet50 and vgg16 (random weights: speed does not depend on values), each rewritten with
depthwise-separable rank 1, grouped g=4 and g=32, and grouped-separable g=4 rank 4 (every eligible site), the
median latency of the original and the rewritten model is measured side by side in one process, eager contiguous
and channels_last, batch 1 and 8 (and onnxruntime when it is installed). "realised" = (1 - latency ratio) /
(1 - MAC ratio): the share of the MAC saving that the latency realises (1.0 = the limit; < 0 = slower).

Run alone: ``.venv/bin/python -m benchmarks.bench_realised_speed [--quick] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

import fxrewrite
from benchmarks.common import write_results

VARIANTS = {
    "dw-sep r1": "depthwise-separable{rank=1}",
    "grouped g4": "grouped{groups=4}",
    "grouped g32": "grouped{groups=32}",
    "grouped-sep g4 r4": "grouped-separable{groups=4, rank=4}",
}


def latency(fn: Callable[[], Any], runs: int, warmup: int, device: str) -> float:
    """Median seconds of ``fn()`` after warm-up (CUDA timed with a synchronise around each call)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="resnet18, batch 1, two variants")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--models", default=None, help="comma-separated torchvision model names")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable on a shared 2-core machine)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = args.device
    models = ["resnet18"] if args.quick else ["resnet18", "resnet50", "vgg16"]
    batches = [1] if args.quick else [1, 8]
    models = args.models.split(",") if args.models else models
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    variants = dict(list(VARIANTS.items())[:2]) if args.quick else VARIANTS
    layouts = ["contiguous", "channels_last"]
    runs = args.runs or (30 if device == "cuda" else (5 if args.quick else 7))
    rows = []
    with torch.inference_mode():
        for name in models:
            model = torchvision.models.get_model(name, weights=None).eval()
            x224 = torch.randn(1, 3, 224, 224)
            for label, spec in variants.items():
                result = fxrewrite.rewrite(model, (x224,), passes=spec, verify=False)
                ctx = result.report.context
                mac_ratio = ctx["model_macs_after"] / ctx["model_macs_before"]
                for batch in batches:
                    x = torch.randn(batch, 3, 224, 224)
                    backends = [(layout, _prepare(model, layout, device), _prepare(result.module, layout, device))
                                for layout in layouts]
                    for layout, orig, new in backends:
                        xin = x.to(device)
                        if layout == "channels_last":
                            xin = xin.contiguous(memory_format=torch.channels_last)
                        t0 = latency(lambda o=orig, i=xin: o(i), runs, 2, device)
                        t1 = latency(lambda n=new, i=xin: n(i), runs, 2, device)
                        rows.append(_row(name, label, batch, f"eager {layout} ({device})", mac_ratio, t0, t1))
                        print(rows[-1], file=sys.stderr)
                    if device == "cpu":
                        f0, f1 = _ort_session(model, x), _ort_session(result.module, x)
                        if f0 is not None and f1 is not None:
                            t0, t1 = latency(f0, runs, 2, device), latency(f1, runs, 2, device)
                            rows.append(_row(name, label, batch, "onnxruntime (cpu)", mac_ratio, t0, t1))
                            print(rows[-1], file=sys.stderr)
    threads = torch.get_num_threads()
    notes = [f"latency: median of {runs} runs after 2 warm-ups, original and rewritten measured back to back; "
             f"torch and onnxruntime intra-op threads = {threads}; input 224x224; MACs = multiply-adds of the whole "
             "model (bias not counted)",
             "realised = (1 - latency ratio) / (1 - MAC ratio): 1.0 means the latency fell as much as the MACs"]
    headers = ["model", "rewrite", "batch", "backend", "MAC ratio", "orig ms", "new ms", "latency ratio", "realised"]
    suffix = ("_quick" if args.quick else "") + ("" if device == "cpu" else f"_{device}")
    suffix += f"_batch{'-'.join(map(str, batches))}" if args.batches else ""
    return write_results("realised_speed" + suffix, f"Realised speed ({device})", headers, rows, notes)


def _row(name: str, label: str, batch: int, backend: str, mac_ratio: float, t0: float, t1: float) -> list[Any]:
    ratio = t1 / t0
    realised = (1 - ratio) / (1 - mac_ratio) if mac_ratio < 1 else float("nan")
    return [name, label, batch, backend, round(mac_ratio, 4), round(t0 * 1e3, 3), round(t1 * 1e3, 3),
            round(ratio, 4), round(realised, 3)]


if __name__ == "__main__":
    print(main())
