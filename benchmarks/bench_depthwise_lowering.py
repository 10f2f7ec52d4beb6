"""How should a depthwise conv with multiplier T > 1 be expressed? A micro-benchmark of the alternatives.

A depthwise-separable rewrite with rank T emits a kxk conv with groups=C and C*T outputs. Backends often have a
fast path only for the plain depthwise case (in == out == groups). Alternatives measured side by side, with the
same numbers (checked): (a) the direct grouped conv (groups=C, C*T outputs); (b) repeat_interleave the input T
times, then a plain depthwise conv on C*T channels; (c) tile the input T times (``torch.cat``), then a plain
depthwise conv whose output channels come out in the order j*C+c (exact once the following 1x1 conv's input
channels are permuted to match); (d) T separate depthwise convs, outputs interleaved; plus the dense kxk conv they
replace. Eager contiguous and channels_last, and onnxruntime (each variant exported with the TorchScript ONNX
exporter), batch 1 and 8. Timing is round-robin: every round times each variant of one configuration once, and
"vs dense" is the median over rounds of the latency divided by the dense conv's latency in the same round, so load
on a shared machine cancels out.

Run alone: ``.venv/bin/python -m benchmarks.bench_depthwise_lowering [--quick] [--device cuda] [--threads N]``.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.common import write_results
from fxrewrite.passes.separable import ChannelRepeat

DENSE, DIRECT, REPEAT, TILE, SPLIT = ("dense kxk", "dw direct (groups=C, C*T out)", "dw repeat_interleave + depthwise",
                                      "dw tile (cat) + depthwise", "dw T separate convs + interleave")


class _Split(nn.Module):
    """T depthwise convs (one per multiplier index j), outputs interleaved to channel c*T+j."""

    def __init__(self, direct: nn.Conv2d, multiplier: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        for j in range(multiplier):
            conv = _depthwise(direct.in_channels, direct)
            conv.weight.data.copy_(direct.weight.detach()[j::multiplier])
            self.convs.append(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([conv(x) for conv in self.convs], dim=2).flatten(1, 2)


def _depthwise(channels: int, like: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, like.kernel_size, padding=like.padding, groups=channels, bias=False)


def variants(c: int, t: int, dense: nn.Conv2d) -> dict[str, tuple[nn.Module, torch.Tensor | None]]:
    """name -> (module, output channel order relative to the direct conv, None when it is the same)."""
    direct = nn.Conv2d(c, c * t, 3, padding=1, groups=c, bias=False)
    out: dict[str, tuple[nn.Module, torch.Tensor | None]] = {DIRECT: (direct, None)}
    if t == 1:
        return out
    rep_conv = _depthwise(c * t, direct)
    rep_conv.weight.data.copy_(direct.weight.detach())
    out[REPEAT] = (nn.Sequential(ChannelRepeat(t, interleave=True), rep_conv), None)
    tile_conv = _depthwise(c * t, direct)
    order = torch.arange(c * t).view(c, t).t().reshape(-1)  # tile output channel j*C+c holds direct channel c*T+j
    tile_conv.weight.data.copy_(direct.weight.detach()[order])
    out[TILE] = (nn.Sequential(ChannelRepeat(t), tile_conv), order)
    out[SPLIT] = (_Split(direct, t), None)
    return out


def _ort_run(module: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    import onnxruntime as ort
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, dynamo=False, input_names=["x"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.contiguous().numpy()}
    return lambda: sess.run(None, feed)[0]


def round_robin(fns: dict[str, Callable[[], Any]], rounds: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Per-variant lists of seconds; each round times every variant once, in the same order, after 2 warm-ups."""
    for fn in fns.values():
        fn(), fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def _rows(times: dict[str, list[float]], prefix: list[Any], labels: dict[str, tuple[str, str]]) -> list[list[Any]]:
    dense = times[DENSE]
    rows = []
    for key, ts in times.items():
        t, name = labels[key]
        ratio = statistics.median(a / b for a, b in zip(ts, dense, strict=True))
        rows.append([*prefix, t, name, round(statistics.median(ts) * 1e3, 4), round(ratio, 3)])
    return rows


def _check(got: torch.Tensor, ref: torch.Tensor, order: torch.Tensor | None) -> None:
    """The variant computes the direct conv's numbers (in its own channel order for the tile variant)."""
    torch.testing.assert_close(got if order is None else got[:, torch.argsort(order)], ref, rtol=1e-4, atol=1e-4)


def measure(c: int, hw: int, batch: int, multipliers: list[int], rounds: int, device: str,
            threads: int, with_ort: bool) -> list[list[Any]]:
    """Rows for one (C, HxW, batch): eager contiguous, eager channels_last and (CPU) onnxruntime."""
    dense = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device).eval()
    x = torch.randn(batch, c, hw, hw, device=device)
    models = {f"{t} {name}": (mod.to(device).eval(), order) for t in multipliers
              for name, (mod, order) in variants(c, t, dense).items()}
    labels = {DENSE: ("-", DENSE)} | {key: tuple(key.split(" ", 1)) for key in models}
    refs = {t: models[f"{t} {DIRECT}"][0](x) for t in multipliers}
    for key, (mod, order) in models.items():
        _check(mod(x), refs[int(labels[key][0])], order)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        xl = x.contiguous(memory_format=fmt)
        fns = {key: functools.partial(mod.to(memory_format=fmt), xl)
               for key, mod in [(DENSE, dense)] + [(k, m) for k, (m, _) in models.items()]}
        rows += _rows(round_robin(fns, rounds, sync), [c, hw, batch, "eager " + layout], labels)
    if with_ort:
        fns = {DENSE: _ort_run(dense, x, threads)}
        for key, (mod, order) in models.items():
            fns[key] = _ort_run(mod, x, threads)
            _check(torch.from_numpy(fns[key]()), refs[int(labels[key][0])], order)
        rows += _rows(round_robin(fns, rounds, sync), [c, hw, batch, "onnxruntime"], labels)
    for row in rows:
        print(row, file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and onnxruntime intra-op threads (default 1: stable on a shared machine)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    shapes = [(64, 56), (256, 14)] if not args.quick else [(64, 28)]
    multipliers = [1, 2, 4] if not args.quick else [1, 2]
    batches = [1, 8] if not args.quick else [1]
    rounds = args.rounds or (50 if device == "cuda" else (7 if args.quick else 31))
    with_ort = device == "cpu"
    load = os.getloadavg()[0]
    rows = []
    with torch.inference_mode():
        for c, hw in shapes:
            for batch in batches:
                rows += measure(c, hw, batch, multipliers, rounds, device, args.threads, with_ort)
    notes = [f"median of {rounds} round-robin rounds after 2 warm-ups; torch and onnxruntime threads = "
             f"{args.threads}; 1-minute load average at the start: {load:.1f}; 3x3 kernels, padding 1, no bias",
             "'vs dense' = median over rounds of latency / the dense 3x3 conv's latency in the same round and backend",
             "all depthwise variants produce the same numbers as the direct conv (assert_close checked in the run; the "
             "tile variant up to its channel order, which the following 1x1 conv would absorb)"]
    headers = ["C", "HxW", "batch", "backend", "T", "lowering", "ms", "vs dense"]
    name = f"depthwise_lowering{'_quick' if args.quick else ''}_{device}"
    return write_results(name, f"Depthwise multiplier lowering ({device})", headers, rows, notes)


if __name__ == "__main__":
    print(main())
