"""The direct evaluations the budget's output errors are checked against: per site (the closed forms of the dense Gram
path in test_budget_latency.py and of the bounded-memory column path in test_calibration_memory.py) and for a whole
model (test_calibration_memory.py, test_budget_end_to_end.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch import nn

from fxrewrite.maths import factorize
from fxrewrite.maths.output_error import grouped_output_error, separable_output_errors, tucker2_output_errors


def model_output_error(model: nn.Module, rewritten: nn.Module, batches: list[tuple[torch.Tensor]]) -> float:
    """``||rewritten(x) - model(x)|| / ||model(x)||`` over all batches, in float64, computed here (not by fxrewrite)."""
    num = den = 0.0
    with torch.no_grad():
        for (x,) in batches:
            ref, new = model(x).double(), rewritten(x).double()
            num += float((new - ref).square().sum())
            den += float(ref.square().sum())
    return math.sqrt(num / den)


def output_error(conv: nn.Conv2d, weight: torch.Tensor, batches: list[tuple[torch.Tensor]], groups: int) -> float:
    """Relative output error of replacing conv's weight by ``weight`` (bias kept), by running both in float64."""
    num = den = 0.0
    bias = None if conv.bias is None else conv.bias.detach().double()
    for (x,) in batches:
        ref = nn.functional.conv2d(x.double(), conv.weight.detach().double(), bias, conv.stride, conv.padding, 1,
                                   groups)
        new = nn.functional.conv2d(x.double(), weight.double(), bias, conv.stride, conv.padding, 1, groups)
        num += float((new - ref).square().sum())
        den += float(ref.square().sum())
    return math.sqrt(num / den)


def grouped_layout(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The (O, I/G, kh, kw) weight of a G-group conv from its dense (O, I, kh, kw) block-diagonal form."""
    o, i = dense.shape[:2]
    return torch.cat([dense[b * o // groups:(b + 1) * o // groups, b * i // groups:(b + 1) * i // groups]
                      for b in range(groups)])


def check_errors(stats: Any, conv: nn.Conv2d, batches: list[tuple[torch.Tensor]], source_groups: int,
                 group_counts: Iterable[int], ranks: Callable[[int], Iterable[int]], tucker_ranks: Iterable[int],
                 separable_rel: float) -> None:
    """Every closed-form error of ``stats`` (separable per group count and rank, grouped, Tucker-2) equals the
    output error of the built weights measured on ``batches``."""
    w = conv.weight.detach().double()
    o, i = w.shape[0], w.shape[1] * source_groups
    for g in group_counts:
        errors = separable_output_errors(stats, g)
        for r in ranks(g):
            f = factorize.grouped_separable(w, source_groups=source_groups, groups=g, rank=r)
            composed = torch.einsum("oc,cikl->oikl", factorize.dense_weight(f.pointwise, source_groups)[:, :, 0, 0],
                                    factorize.dense_weight(f.spatial, g))
            new = grouped_layout(composed, source_groups)
            expected = output_error(conv, new, batches, source_groups)
            assert errors[r] == pytest.approx(expected, rel=separable_rel, abs=separable_rel * 1e-3), (g, r)
            dw = (w - new).reshape(source_groups, o // source_groups, -1)
            assert stats.output_error(dw) == pytest.approx(expected, rel=1e-6, abs=1e-9)
        if o % g == 0:
            block = factorize.block_diagonal(w, source_groups=source_groups, groups=g)
            kept = grouped_layout(factorize.dense_weight(block.weight, g), source_groups)
            assert grouped_output_error(stats, g) == pytest.approx(output_error(conv, kept, batches, source_groups),
                                                                   rel=1e-6)
    if source_groups == 1:
        tucker_ranks = list(tucker_ranks)
        mode_o, mode_i = w.reshape(o, -1), w.transpose(0, 1).reshape(i, -1)
        u = torch.linalg.eigh(mode_o @ mode_o.mT).eigenvectors.flip(-1)
        v = torch.linalg.eigh(mode_i @ mode_i.mT).eigenvectors.flip(-1)
        for r, err in zip(tucker_ranks, tucker2_output_errors(stats, u, v, tucker_ranks), strict=True):
            pu, pv = u[:, :min(r, o)] @ u[:, :min(r, o)].T, v[:, :min(r, i)] @ v[:, :min(r, i)].T
            projected = torch.einsum("op,pikl,iq->oqkl", pu, w, pv)
            assert err == pytest.approx(output_error(conv, projected, batches, 1), rel=1e-6, abs=1e-9), r
