"""Cost model: agreement and speed against ``FlopCounterMode`` and fvcore on the torchvision classification zoo.

For each model at its usual input size (random weights, eval mode, batch 1), in one run:

- **agreement**: fxrewrite's conv + linear (+ attention / matmul) MACs minus ``FlopCounterMode`` total / 2, and minus
  fvcore's ``FlopCountAnalysis`` for the same operators (1 MAC = one multiply-add; bias not counted; FLOPs = 2 x MACs);
- **speed**: median wall time of fxrewrite's count from the module (``symbolic_trace`` + FakeTensor shape propagation
  + ``model_cost``, no real compute), of ``model_cost`` alone on a graph that already has shapes (what a rewrite
  pays, since shapes are propagated once anyway), of one ``FlopCounterMode`` forward pass and of fvcore's analysis.
  Goal: fxrewrite's count <= 0.5x ``FlopCounterMode``.

Run: ``python -m benchmarks.bench_cost_model`` (``--quick``: three models).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import warnings
from typing import Any

import torch
import torchvision
from torch import nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import median_time, write_results
from fxrewrite.measure.cost import model_cost

MODELS = ("alexnet", "vgg11", "resnet18", "resnet50", "resnet152", "resnext50_32x4d", "wide_resnet50_2",
          "squeezenet1_1", "densenet121", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_large",
          "mnasnet1_0", "shufflenet_v2_x1_0", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf",
          "regnet_y_1_6gf", "convnext_tiny", "swin_t", "maxvit_t", "vit_b_16")
QUICK = ("resnet18", "mobilenet_v2", "vit_b_16")
MAC_KINDS = ("conv", "linear", "matmul", "attention")
FVCORE_KEYS = ("conv", "linear", "addmm", "matmul", "mm", "bmm", "einsum")
#: nn.MultiheadAttention's fused no-grad path hides its matmuls from both counters; these run with grad on
GRAD_ON = ("vit_b_16",)


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    kwargs: dict[str, Any] = {"aux_logits": False, "init_weights": False} if name in ("googlenet",
                                                                                       "inception_v3") else {}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = 299 if name == "inception_v3" else 224
    return model, torch.randn(1, 3, size, size)


def _grad(name: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if name in GRAD_ON else torch.no_grad()


def ours(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.fx.GraphModule]:
    """fxrewrite's count from the module: trace, fake shape propagation, cost model."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    gm = torch.fx.symbolic_trace(model)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
    kinds = model_cost(gm).by_kind()
    return sum(kinds[k] for k in MAC_KINDS), gm


def flop_counter_macs(name: str, model: nn.Module, x: torch.Tensor) -> int:
    with _grad(name), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fcm:
        model(x)
    return sum(fcm.get_flop_counts()["Global"].values()) // 2


def fvcore_macs(name: str, model: nn.Module, x: torch.Tensor) -> int | None:
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError:
        return None
    with warnings.catch_warnings(), _grad(name):
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        by_op = analysis.by_operator()
    return sum(by_op.get(k, 0) for k in FVCORE_KEYS)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1, as the other benchmarks: stable on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, ratios = [], []
    for name in QUICK if args.quick else MODELS:
        model, x = _model(name)
        macs, gm = ours(model, x)
        fcm = flop_counter_macs(name, model, x)
        fv = fvcore_macs(name, model, x)
        t_ours = median_time(lambda m=model, i=x: ours(m, i), runs=args.runs)
        t_cost = median_time(lambda g=gm: model_cost(g), runs=args.runs)
        t_fcm = median_time(lambda n=name, m=model, i=x: flop_counter_macs(n, m, i), runs=args.runs)
        t_fv = median_time(lambda n=name, m=model, i=x: fvcore_macs(n, m, i), runs=1, warmup=0) if fv else None
        ratios.append(t_ours / t_fcm)
        rows.append([name, macs / 1e9, macs - fcm, "-" if fv is None else macs - fv, t_ours * 1e3, t_cost * 1e3,
                     t_fcm * 1e3, "-" if t_fv is None else t_fv * 1e3, t_ours / t_fcm])
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    median_ratio = statistics.median(ratios)
    notes = [
        "MACs: conv + linear + matmul + attention, 1 MAC = one multiply-add, bias not counted (FLOPs = 2 x MACs); "
        "diff = fxrewrite - counter (0 = exact agreement). fvcore has no count for scaled_dot_product_attention and "
        "rounds einsum counts (swin_t, maxvit_t, vit_b_16 differ by those, see tests/test_cost_zoo.py).",
        "fxrewrite from module = symbolic_trace + FakeTensorProp + model_cost (no real compute); model_cost alone = "
        "the count on a graph that already carries shapes (a rewrite has them anyway); FlopCounterMode = one real "
        "forward pass under the counter; fvcore = jit trace + count, one run. Medians of the runs, same process.",
        f"median ratio fxrewrite-from-module / FlopCounterMode: {median_ratio:.2f} (goal <= 0.5); "
        f"models at or under 0.5: {sum(r <= 0.5 for r in ratios)} of {len(ratios)}",
    ]
    headers = ["model", "GMACs", "diff vs FlopCounterMode/2", "diff vs fvcore", "fxrewrite from module ms",
               "model_cost alone ms", "FlopCounterMode ms", "fvcore ms", "fxrewrite / FlopCounterMode"]
    return write_results("cost_model" + ("_quick" if args.quick else ""), "Cost model vs FlopCounterMode and fvcore "
                         "(CPU, batch 1)", headers, rows, notes)


if __name__ == "__main__":
    print(main())
