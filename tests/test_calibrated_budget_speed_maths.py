"""The calibrated budget's shared computations (issue 15: resnet18 at 224 with 8 images in at most 10 s) give the
errors of the built factorisations: on the kept columns, the wide group counts' slice outputs ``Y_x = A_x F_x`` are
formed once at the finest whole-channel slicing and summed (``U^T Y`` instead of ``(A^T U)^T F``), the tall group
counts' ``c x c`` Grams are diagonal blocks of the coarsest one's, the grouped form reads its blocks off the same slice
outputs; all of it in float32 from 1024 columns on, as the dense path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from error_oracle import check_errors
from torch import nn

from fxrewrite.budget.calibration import collect_site_stats
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.graph.sites import find_sites
from fxrewrite.maths.output_error import SiteStats, grouped_output_error, separable_output_errors


def _stats(conv: nn.Conv2d, batches: list[tuple[torch.Tensor]]) -> Any:
    gm = trace(nn.Sequential(conv).eval())
    propagate_shapes(gm, batches[0])
    (_, stats), = collect_site_stats(gm, find_sites(gm), batches)
    return stats


@pytest.mark.parametrize(("source_groups", "finest"), [(1, 8), (2, 16)])
def test_float32_column_errors_are_the_measured_ones(source_groups: int, finest: int) -> None:
    """d = 1152 columns per source group (float32 formulas), 50 kept columns: wide group counts (slices wider than
    the 96 / source_groups outputs: from the outputs of the finest such slicing, 8 or 16 slices), tall ones and the
    grouped form equal the measured output errors of the built weights."""
    torch.manual_seed(0)
    conv = nn.Conv2d(128 * source_groups, 96, 3, padding=1, groups=source_groups, bias=True).eval()
    batches = [(torch.randn(2, 128 * source_groups, 5, 5),)]
    stats = _stats(conv, batches)
    assert stats.method == "columns" and stats.weight.shape[-1] == 1152
    levels = [g * source_groups for g in (1, 2, 4, 8, 16, 32, 128)]
    check_errors(stats, conv, batches, source_groups, levels, lambda g: (1, 7), (), separable_rel=2e-5)
    assert [k for k in stats._cache if k.startswith("chunk:y")] == [f"chunk:y{b}:0:50:torch.float32:{finest}"
                                                                   for b in range(source_groups)]


def test_group_counts_in_any_order_give_the_same_errors() -> None:
    """The shared Grams and slice outputs do not depend on which group count came first (the tall Grams of 16 slices
    hold those of 32 and 64 as diagonal blocks; 64 first forms its own)."""
    torch.manual_seed(1)
    x = torch.randn(1, 576, 120, dtype=torch.float64)
    w = torch.randn(1, 48, 576, dtype=torch.float64)
    energy = float((w @ x).square().sum())
    orders = [(1, 2, 4, 8, 16, 32, 64), (64, 32, 16, 8, 4, 2, 1)]
    results = []
    for order in orders:
        stats = SiteStats(None, w, energy, 120, factor=x, method="columns", taps=9)
        results.append({g: (separable_output_errors(stats, g), grouped_output_error(stats, g) if 48 % g == 0 else 0.0)
                        for g in order})
    for g in orders[0]:
        np.testing.assert_allclose(results[0][g][0], results[1][g][0], rtol=1e-10, atol=1e-13)
        assert results[0][g][1] == pytest.approx(results[1][g][1], rel=1e-10)
    dense = SiteStats(x @ x.mT, w, energy, 120)
    for g in orders[0]:
        np.testing.assert_allclose(results[0][g][0], separable_output_errors(dense, g), rtol=1e-9, atol=1e-12)


class _CountingList(list):  # type: ignore[type-arg]
    """A list of batches that counts how often it is read."""

    reads = 0

    def __iter__(self) -> Any:
        self.reads += 1
        return super().__iter__()


def test_sites_that_keep_their_columns_share_one_pass() -> None:
    """Two 32 -> 32 3x3 convs under a 2 MiB cap: planned as dense Grams (663 KB each, 3x with the working set) they
    need one pass over the data each; the data's 32 unfolded columns per site (known from the batches' shapes) are
    kept themselves (74 KB), so both are collected in one pass (one more read counts the samples), with the same
    statistics as one site at a time."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    data = _CountingList([(torch.randn(1, 32, 4, 4),) for _ in range(2)])
    gm = trace(model)
    propagate_shapes(gm, data[0])
    sites = find_sites(gm)
    together = list(collect_site_stats(gm, sites, data, max_bytes=2 << 20))
    assert data.reads == 2 and [s.method for _, s in together] == ["columns", "columns"]
    for site, stats in together:
        (_, alone), = collect_site_stats(gm, [site], list(data), max_bytes=2 << 20)
        assert torch.equal(alone.factor, stats.factor) and alone.energy == stats.energy
    other_shape = _CountingList([(torch.randn(1, 32, 6, 6),) for _ in range(2)])  # positions unknown: dense plan
    assert [s.method for _, s in collect_site_stats(gm, sites, other_shape, max_bytes=2 << 20)] == ["columns"] * 2
    assert other_shape.reads == 4  # the shape check, the check that it can be read again, one pass per site


def _from_columns(method: str, w: torch.Tensor, x: torch.Tensor) -> SiteStats:
    """Statistics of the columns ``x`` (1 x d x n, float64) for the weight ``w`` (1 x m x d): the columns themselves
    ("columns") or their dense Gram ("gram")."""
    energy, n = float((w @ x).square().sum()), x.shape[-1]
    if method == "columns":
        return SiteStats(None, w, energy, n, factor=x, method="columns", taps=9)
    return SiteStats(x @ x.mT, w, energy, n)


def _measured(dw: torch.Tensor, x: torch.Tensor, energy: float) -> float:
    """The relative output error on the columns ``x`` of a change ``dw`` given per slice (q x m x d/q), in float64."""
    q, m, c = dw.shape
    return float((dw.transpose(0, 1).reshape(m, q * c) @ x[0]).square().sum() / energy) ** 0.5


@pytest.mark.parametrize("method", ["columns", "gram"])
def test_float32_eigenvectors_stay_within_the_stated_error_on_a_decaying_spectrum(method: str) -> None:
    """d = 1152 (float32 formulas and eigenvectors) with singular values e^{-j/30}, as trained weights' spectra fall,
    from the kept columns and from their dense Gram: every rank's predicted error is within 2e-4 of the float64
    evaluation of the same truncation (SiteStats.compute says so; here at most 3.5e-6), and within 1e-5 relative
    where the error is above 0.1 (here 3e-7)."""
    torch.manual_seed(5)
    m, d, n = 128, 1152, 300
    u, _, vh = torch.linalg.svd(torch.randn(m, d, dtype=torch.float64), full_matrices=False)
    w = ((u * torch.exp(-torch.arange(m, dtype=torch.float64) / 30)) @ vh)[None]
    x = torch.randn(1, d, n, dtype=torch.float64) * torch.linspace(0.1, 2, d, dtype=torch.float64)[None, :, None]
    energy = float((w @ x).square().sum())
    for g in (1, 8, 32):
        predicted = separable_output_errors(_from_columns(method, w, x), g)
        q, c = g, d // g
        a = w[0].reshape(m, q, c).transpose(0, 1)
        uu, ss, vv = torch.linalg.svd(a, full_matrices=False)  # float64 truncations, measured on x directly
        for r in range(0, min(m, c), 3):
            kept = (uu[..., :r] * ss[:, None, :r]) @ vv[:, :r]  # (q, m, c)
            exact = _measured(a - kept, x, energy)
            assert abs(predicted[r] - exact) <= 2e-4, (g, r, predicted[r], exact)
            if exact > 0.1:
                assert predicted[r] == pytest.approx(exact, rel=1e-5), (g, r)


@pytest.mark.parametrize("method", ["columns", "gram"])
def test_an_exactly_low_rank_weight_reads_float32_level_errors_at_its_rank(method: str) -> None:
    """A rank-3 weight at d = 1152 (float32 eigenvectors): below rank 3 the errors are the float64 ones to 1e-6,
    from rank 3 on they read float32's level (SiteStats.compute: ~5e-7), never more than 2e-6."""
    torch.manual_seed(6)
    m, d, n = 128, 1152, 200
    w = (torch.randn(m, 3, dtype=torch.float64) @ torch.randn(3, d, dtype=torch.float64))[None]
    x = torch.randn(1, d, n, dtype=torch.float64)
    energy = float((w @ x).square().sum())
    errors = separable_output_errors(_from_columns(method, w, x), 8)
    u, s, vh = torch.linalg.svd(w[0].reshape(m, 8, d // 8).transpose(0, 1), full_matrices=False)
    for r in (0, 1, 2):
        exact = _measured((u[..., r:] * s[:, None, r:]) @ vh[:, r:], x, energy)  # the discarded part, float64
        assert errors[r] == pytest.approx(exact, abs=1e-6)
    assert np.all(errors[3:] <= 2e-6), errors[3:8]
