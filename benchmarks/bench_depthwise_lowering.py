"""How should a depthwise conv with multiplier T > 1 be expressed? A micro-benchmark of the alternatives.

A depthwise-separable rewrite with rank T emits a kxk conv with groups=C and C*T outputs. Backends often have a
fast path only for the plain depthwise case (in == out == groups). Alternatives measured side by side, with the
same numbers (checked): (a) the direct grouped conv (groups=C, C*T outputs); (b) repeat_interleave the input T
times, then a plain depthwise conv on C*T channels; (c) T separate depthwise convs, outputs concatenated and
interleaved; plus the dense kxk conv they replace. Contiguous and channels_last, batch 1 and 8.

Run alone: ``.venv/bin/python -m benchmarks.bench_depthwise_lowering [--quick] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.bench_realised_speed import latency
from benchmarks.common import write_results


def variants(x: torch.Tensor, w_dense: torch.Tensor, w_dw: torch.Tensor, t: int) -> dict[str, object]:
    c = x.shape[1]

    def direct() -> torch.Tensor:
        return F.conv2d(x, w_dw, padding=1, groups=c)

    def repeat() -> torch.Tensor:
        return F.conv2d(x.repeat_interleave(t, dim=1), w_dw, padding=1, groups=c * t)

    w_split = [w_dw[j::t] for j in range(t)]

    def split() -> torch.Tensor:
        outs = [F.conv2d(x, w, padding=1, groups=c) for w in w_split]
        return torch.stack(outs, dim=2).flatten(1, 2)

    def dense() -> torch.Tensor:
        return F.conv2d(x, w_dense, padding=1)

    return {"dense kxk": dense, "dw direct (groups=C, C*T out)": direct, "dw repeat_interleave + depthwise": repeat,
            "dw T separate convs + interleave": split}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    shapes = [(64, 56), (256, 14)] if not args.quick else [(64, 28)]
    multipliers = [1, 2, 4] if not args.quick else [1, 2]
    batches = [1, 8] if not args.quick else [1]
    runs = 50 if device == "cuda" else (5 if args.quick else 11)
    rows = []
    with torch.inference_mode():
        for c, hw in shapes:
            for batch in batches:
                for layout in ("contiguous", "channels_last"):
                    x = torch.randn(batch, c, hw, hw, device=device)
                    if layout == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                    w_dense = torch.randn(c, c, 3, 3, device=device)
                    dense_t = None
                    for t in multipliers:
                        w_dw = torch.randn(c * t, 1, 3, 3, device=device)
                        fns = variants(x, w_dense, w_dw, t)
                        ref = fns["dw direct (groups=C, C*T out)"]()
                        for name, fn in fns.items():
                            if name == "dense kxk" and dense_t is not None:
                                continue
                            if name != "dense kxk":
                                torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4)
                            ms = latency(fn, runs, 3, device) * 1e3
                            if name == "dense kxk":
                                dense_t = ms
                                rows.append([c, hw, batch, layout, "-", name, round(ms, 4), 1.0])
                            else:
                                rows.append([c, hw, batch, layout, t, name, round(ms, 4), round(ms / dense_t, 3)])
                            print(rows[-1], file=sys.stderr)
    notes = [f"median of {runs} runs after 3 warm-ups; torch threads = {torch.get_num_threads()}; "
             "3x3 kernels, padding 1; 'vs dense' = latency / the dense 3x3 conv on the same input",
             "all depthwise variants produce the same numbers (assert_close checked in the run)"]
    headers = ["C", "HxW", "batch", "layout", "T", "lowering", "ms", "vs dense"]
    suffix = ("_quick" if args.quick else "") + ("" if device == "cpu" else f"_{device}")
    return write_results("depthwise_lowering" + suffix, f"Depthwise multiplier lowering ({device})", headers, rows,
                         notes)


if __name__ == "__main__":
    print(main())
