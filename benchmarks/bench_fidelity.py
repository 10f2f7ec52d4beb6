"""Fidelity on trained weights: every rewrite form on the digits CNN at 2x and 4x fewer conv MACs, with tensorly's
Tucker-2 (``partial_tucker``) and CP (``parafac``) as anchors at equal MACs, in one table.

The model is ``fxrewrite.demos.digits``' 4-conv CNN trained on scikit-learn's ``load_digits`` (seeded; no download). For
each form and target, ``demos.digits.run_demo`` chooses per-site options meeting the target, rewrites every conv
but the stem and reports: the weight-space relative error ||W - W'|| / ||W|| over the rewritten convs, the relative
L2 error of the test-set logits, and test accuracy - data-free, after ``fxrewrite.tuning.repair`` (8 unlabelled training
batches) and after a short ``fxrewrite.tuning.distill``.

Anchors: at the same per-site ranks as fxrewrite's Tucker-2 and depthwise-bottleneck rows (so the same MACs),
``partial_tucker(rank=[R, R], modes=[0, 1])`` and ``parafac(rank=R, init='svd')`` (tensorly defaults otherwise) are
loaded into the same 1x1 -> kxk -> 1x1 structure; their rows give the same errors and accuracies (data-free and
repaired; not distilled). Fit time: seconds over the three rewritten layers, fxrewrite's ``bottleneck_fit`` vs
tensorly, each timed alone on one thread (torch, numpy/BLAS).

Run alone: ``python -m benchmarks.bench_fidelity [--quick]`` (needs ``tensorly`` and ``scikit-learn``: the test
extra). ``--quick``: 2x only, three forms, fewer epochs, no distillation (its columns are nan).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fxrewrite
from benchmarks.common import write_results
from fxrewrite.demos import digits
from fxrewrite.maths import bottleneck_fit
from fxrewrite.tuning.repair import repair

#: fxrewrite form -> (tensorly anchor label, the anchor's groups in the bottleneck core: None = depthwise)
#: ``--quick``: one separable form and the two with tensorly anchors
QUICK_FORMS = ("depthwise-separable", "depthwise-bottleneck", "tucker2")
ANCHORS: dict[str, tuple[str, int | None]] = {"tucker2": ("tensorly partial_tucker", 1),
                                              "depthwise-bottleneck": ("tensorly parafac (CP)", None)}


def _limit_threads() -> None:
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits  # ships with scikit-learn
    threadpool_limits(1)


def tensorly_factors(weight: torch.Tensor, groups: int | None, rank: int) -> tuple[torch.Tensor, ...]:
    """(first 1x1, core kxk, last 1x1) weights from tensorly's Tucker-2 (``groups=1``) or CP (``groups=None``) of
    ``weight`` (O, I, kh, kw), float64 numpy backend."""
    from tensorly.decomposition import parafac, partial_tucker

    o, i, kh, kw = weight.shape
    w = weight.detach().double().numpy()
    if groups == 1:
        out = partial_tucker(w, rank=[rank, rank], modes=[0, 1], random_state=0)
        core, (u_out, u_in) = out[0] if isinstance(out[0], tuple) else out
        first = torch.from_numpy(u_in.T.copy()).reshape(rank, i, 1, 1)
        return first, torch.from_numpy(core.copy()), torch.from_numpy(u_out.copy()).reshape(o, rank, 1, 1)
    cp = parafac(w.reshape(o, i, kh * kw), rank=rank, init="svd", random_state=0)
    lam, (a, b, c) = cp.weights, cp.factors
    first = torch.from_numpy(b.T.copy()).reshape(rank, i, 1, 1)
    core = torch.from_numpy((c * lam[None, :]).T.copy()).reshape(rank, 1, kh, kw)
    return first, core, torch.from_numpy(a.copy()).reshape(o, rank, 1, 1)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def anchor_row(model: nn.Module, data: digits.DigitsData, calib: list[tuple[torch.Tensor]], form: str,
               choice: digits.Choice) -> tuple[list[Any], float, float]:
    """The tensorly anchor at ``choice``'s ranks: its table row, and the fit seconds (tensorly, fxrewrite)."""
    label, groups = ANCHORS[form]
    rules = [fxrewrite.Rule(site, options=opts) for site, opts in choice.options.items()]
    result = fxrewrite.rewrite(model, (data.x_test[:1],), passes=digits.pipeline(form) + "{init=random}",
                               select=rules, verify=False)
    rewritten = result.module
    err2 = ref2 = t_tensorly = t_ours = 0.0
    for site, opts in choice.options.items():
        weight = model.get_submodule(site).weight.detach()
        rank = int(opts["rank"])
        factors, seconds = _timed(lambda w=weight, r=rank: tensorly_factors(w, groups, r))
        t_tensorly += seconds
        _, seconds = _timed(lambda w=weight, r=rank: bottleneck_fit.block_term(w, r if groups is None else groups, r))
        t_ours += seconds
        convs = [rewritten.get_submodule(f"{site}.{j}") for j in range(3)]
        with torch.no_grad():
            for conv, f in zip(convs, factors, strict=True):
                conv.weight.copy_(f.to(conv.weight.dtype))
        dense = bottleneck_fit.compose(*factors, rank if groups is None else groups)
        err2 += float((dense - weight.double()).square().sum())
        ref2 += float(weight.double().square().sum())
    repaired = repair(model, rewritten, calib).module
    x, y = data.x_test, data.y_test
    row = [label, f"{choice.ratio:.2f}x", f"{math.sqrt(err2 / ref2):.3f}", _f(digits.output_error(rewritten, model, x)),
           _f(digits.output_error(repaired, model, x)), "-", _f(digits.accuracy(rewritten, x, y), 2),
           _f(digits.accuracy(repaired, x, y), 2), "-", f"{t_tensorly:.3f}"]
    return row, t_tensorly, t_ours


def _f(x: float, digits_: int = 3) -> str:
    return f"{x:.{digits_}f}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help=f"2x only, forms {', '.join(QUICK_FORMS)}, 5 epochs, no distillation")
    args = parser.parse_args(argv)
    _limit_threads()
    targets = (2.0,) if args.quick else digits.TARGETS
    forms = QUICK_FORMS if args.quick else digits.FORMS
    epochs, steps = (5, 0) if args.quick else (15, 150)
    demo = digits.run_demo(forms=forms, targets=targets, epochs=epochs, distill_steps=steps, threads=1)
    settings = demo.settings
    model = demo.model
    assert model is not None
    data = digits.load_data()  # the demo's split (deterministic)
    calib = digits.training_batches(data, settings["batch_size"], settings["seed"])[:settings["calib_batches"]]
    shapes = digits.conv_shapes(model, data.x_test[:1])
    rows: list[list[Any]] = []
    fit_seconds: dict[tuple[str, float], float] = {}
    for target in targets:
        for form in forms:
            r = next(r for r in demo.rows if r.form == form and r.target == target)
            rows.append([form, f"{r.ratio:.2f}x", f"{r.weight_rel_error:.3f}", _f(r.output_error_data_free),
                         _f(r.output_error_repaired), _f(r.output_error_distilled), _f(r.acc_data_free, 2),
                         _f(r.acc_repaired, 2), _f(r.acc_distilled, 2), "-"])
            if form in ANCHORS:
                row, t_tensorly, t_ours = anchor_row(model, data, calib, form, digits.choose_options(shapes, form,
                                                                                                      target))
                rows[-1][-1] = f"{t_ours:.3f}"
                rows.append(row)
                fit_seconds[(form, target)] = t_tensorly / t_ours
    speedups = ", ".join(f"{form} {t:g}x: {s:.1f}x" for (form, t), s in fit_seconds.items())
    notes = [f"digits CNN (width {settings['width']}), {settings['epochs']} epochs, test accuracy "
             f"{demo.acc_original:.2f}% (original), {settings['test']} test images; every conv but the stem rewritten",
             "conv MACs: fewer-by factor of the rewritten convs' MACs (1 MAC = one multiply-add; FLOPs = 2 x MACs); "
             "weight err = ||W - W'|| / ||W|| over the rewritten convs (data-free); output err = relative L2 of "
             "the test-set logits",
             f"repaired: fxrewrite.repair on {settings['calib_batches']} unlabelled training batches of "
             f"{settings['batch_size']}; distilled: {settings['distill_steps']} steps of fxrewrite.distill (nan: not "
             "run)",
             "tensorly rows: partial_tucker / parafac (init='svd', random_state=0, tensorly defaults otherwise) at the "
             "ranks of the fxrewrite row above (same MACs), loaded into the same structure; fit s = seconds over "
             f"the three layers, one thread; tensorly time / fxrewrite time: {speedups}",
             "goal (issue 8): fxrewrite's error no worse than tensorly's at equal MACs, in 1/10 of its time"]
    headers = ["form", "conv MACs fewer", "weight err", "output err data-free", "output err repaired",
               "output err distilled", "acc data-free", "acc repaired", "acc distilled", "fit s"]
    return write_results("fidelity" + ("_quick" if args.quick else ""),
                         "Fidelity on trained weights (digits CNN), every form vs tensorly at equal MACs (CPU)",
                         headers, rows, notes, extra={"acc_original": demo.acc_original})


if __name__ == "__main__":
    print(main())
