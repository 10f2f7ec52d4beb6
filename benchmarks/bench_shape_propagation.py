"""Shape propagation at the example size: three exact routes side by side (issue 15, item 3).

The capture records every node's output metadata (shape, strides, dtype, device) in ``node.meta["val"]``. Routes:

- **fake**: ``fxrewrite.graph.shapes.propagate_shapes`` - FakeTensors, with shortcuts for plain convs (the shape
  formula), shape-preserving modules and elementwise functions (no fake dispatch), what ``rewrite()`` uses;
- **real**: a ``torch.fx.Interpreter`` run on the example input under ``no_grad``, recording a FakeTensor of each
  value's metadata (what ``propagate_shapes`` falls back to for data-dependent models);
- **meta**: the model's parameters and buffers as meta tensors through ``torch.func.functional_call`` on a meta
  input - the run alone, without recording anything, so a lower bound on that route.

Also one eager forward (``no_grad``) for scale. The metadata of fake and real are compared node by node (strides
along size-1 dimensions excepted, which the kernels set arbitrarily). Medians of interleaved rounds, one thread.

Run alone: ``.venv/bin/python -m benchmarks.bench_shape_propagation [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
import torchvision
from torch import nn

from benchmarks.bench_pass_speed import ConvChain
from benchmarks.common import write_results
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import fake_like, fake_mode, propagate_shapes


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.mode = fake_mode()

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["val"] = pytree.tree_map_only(torch.Tensor, lambda t: fake_like(self.mode, t), out)
        return out


def _metadata(gm: torch.fx.GraphModule) -> list[Any]:
    def one(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        return tuple(v.shape), tuple(s if d > 1 else None for d, s in zip(v.shape, v.stride(), strict=True)), v.dtype
    return [one(n.meta.get("val")) for n in gm.graph.nodes if n.op != "output"]


def row(name: str, model: nn.Module, x: torch.Tensor, runs: int) -> list[Any]:
    gm = trace(model)
    meta_state = {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
                  for k, v in (*gm.named_parameters(), *gm.named_buffers())}

    def real() -> None:
        with torch.no_grad():
            _Recorder(gm).run(x)

    def meta() -> None:
        with torch.no_grad():
            torch.func.functional_call(gm, meta_state, (x.to("meta"),))

    def forward() -> None:
        with torch.no_grad():
            model(x)

    steps: dict[str, Callable[[], Any]] = {"fake": lambda: propagate_shapes(gm, (x,)), "real": real, "meta": meta,
                                           "forward": forward}
    for fn in steps.values():
        fn()
    propagate_shapes(gm, (x,))
    fake_meta = _metadata(gm)
    real()
    same = fake_meta == _metadata(gm)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(runs):
        for key, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    nodes = len(gm.graph.nodes)
    fastest = min(("fake", "real", "meta"), key=lambda k: ms[k])
    return [name, nodes, ms["fake"], ms["real"], ms["meta"], ms["forward"], fastest, same]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small models only")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cases = [("resnet18 64x64", torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)),
             ("chain-300", ConvChain(300).eval(), torch.randn(1, 16, 8, 8))]
    if not args.quick:
        cases = [("resnet152 64x64", torchvision.models.resnet152().eval(), torch.randn(1, 3, 64, 64)),
                 ("resnet50 224x224", torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224)),
                 ("chain-1000", ConvChain(1000).eval(), torch.randn(1, 16, 8, 8))]
    rows = []
    for name, model, x in cases:
        rows.append(row(name, model, x, 5))
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    headers = ["model", "graph nodes", "fake ms", "real ms", "meta ms (run only)", "eager forward ms", "fastest",
               "fake == real metadata"]
    notes = ["fake = propagate_shapes (FakeTensors with the conv / shape-preserving / elementwise shortcuts, what "
             "rewrite() uses); real = Interpreter run under no_grad recording each value's metadata; meta = "
             "functional_call with meta parameters on a meta input, the run only (nothing recorded); medians of 5 "
             "interleaved rounds, one torch thread."]
    return write_results("shape_propagation" + ("_quick" if args.quick else ""),
                         "Shape propagation at the example size (CPU)", headers, rows, notes)


if __name__ == "__main__":
    print(main())
