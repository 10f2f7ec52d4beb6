"""The calibrated budget's fast paths (issue 15, item 4) give the same errors as the direct evaluation: a site with at
most d unfolded columns keeps the columns themselves (no Gram product) and its errors, every group count including a
single slice, equal the built factorisations' measured output errors; more columns fold into the Gram; the Gram is
accumulated from its upper blocks; the Pareto filter equals the pairwise definition."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from error_oracle import check_errors
from torch import nn

from fxrewrite.budget.calibration import _add_gram, collect_site_stats
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.graph.sites import find_sites
from fxrewrite.maths.output_error import SiteStats, grouped_output_error, separable_output_errors
from fxrewrite.maths.spectra import pareto_mask


def _stats(conv: nn.Conv2d, batches: list[tuple[torch.Tensor]]) -> Any:
    gm = trace(nn.Sequential(conv).eval())
    propagate_shapes(gm, batches[0])
    (_, stats), = collect_site_stats(gm, find_sites(gm), batches)
    return stats


@pytest.mark.parametrize("source_groups", [1, 2])
def test_few_columns_are_kept_and_exact(source_groups: int) -> None:
    """2 x 16 = 32 columns of d = 144 (or 72 per source group) under the default cap: the columns are kept, and every
    error (ranks of 1, 2, 4, 8 and all input channels' slices, grouped, Tucker-2) is the measured output error."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, groups=source_groups, bias=source_groups == 1).eval()
    batches = [(torch.randn(1, 16, 4, 4),) for _ in range(2)]
    stats = _stats(conv, batches)
    assert stats.method == "columns" and stats.gram is None and stats.factor.shape[-1] == 32
    check_errors(stats, conv, batches, source_groups, [g for g in (1, 2, 4, 8, 16) if g >= source_groups],
                 lambda g: (1, 2, 5), (1, 5, 16), separable_rel=1e-6)


def test_more_columns_than_d_fold_into_the_gram() -> None:
    """3 batches of 36 columns, d = 72: the first two batches are kept as columns, the third folds them into the Gram;
    the statistics are the dense ones (the Gram equals X X^T of all columns) and the errors the measured ones."""
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, padding=1).eval()
    batches = [(torch.randn(1, 8, 6, 6),) for _ in range(3)]
    stats = _stats(conv, batches)
    assert stats.method == "gram" and stats.factor is None and stats.columns == 108
    check_errors(stats, conv, batches, 1, (1, 2, 4, 8), lambda g: (1, 2, 5), (1, 5, 8), separable_rel=1e-6)


def test_column_and_gram_statistics_agree_on_a_wide_conv() -> None:
    """A 64 -> 96 3x3 conv on 200 columns (d = 576, float64 formulas): the kept columns and the Gram of the same
    columns give the same errors for wide (1, 2 slices, from the cached Grams of 4 slices), tall (16, 64 slices)
    group counts and the grouped form."""
    torch.manual_seed(2)
    x = torch.randn(1, 576, 200, dtype=torch.float64)
    w = torch.randn(1, 96, 576, dtype=torch.float64)
    energy = float((w @ x).square().sum())
    columns = SiteStats(None, w, energy, 200, factor=x, method="columns", taps=9)  # 1, 2 slices share 4 slices' Grams
    dense = SiteStats(x @ x.mT, w, energy, 200)
    for g in (1, 2, 16, 64):
        np.testing.assert_allclose(separable_output_errors(columns, g), separable_output_errors(dense, g),
                                   rtol=1e-9, atol=1e-12)
    assert [k for k in columns._cache if k.startswith("slice_grams")] == ["slice_grams0:4"]
    for g in (2, 4, 32):
        assert grouped_output_error(columns, g) == pytest.approx(grouped_output_error(dense, g), rel=1e-9)


@pytest.mark.parametrize(("groups", "d", "n"), [(1, 100, 30), (1, 576, 50), (2, 1100, 7)])
def test_gram_from_upper_blocks(groups: int, d: int, n: int) -> None:
    torch.manual_seed(3)
    cols = torch.randn(groups, d, n)
    gram = torch.zeros(groups, d, d, dtype=torch.float64)
    _add_gram(gram, cols)
    _add_gram(gram, cols)
    expected = 2 * (cols.double() @ cols.double().mT)
    assert torch.equal(gram, gram.mT)
    torch.testing.assert_close(gram, expected, rtol=1e-5, atol=1e-4)


def test_pareto_mask_is_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 7, 300, 2500):
        a = rng.integers(0, 8, size=(n, 3)).astype(float)
        _, first = np.unique(a, axis=0, return_index=True)
        expected = np.zeros(n, dtype=bool)
        for i in first:  # the first of equal rows, and no other row <= everywhere and < somewhere
            expected[i] = not ((a <= a[i]).all(axis=1) & (a < a[i]).any(axis=1)).any()
        assert (pareto_mask(a) == expected).all(), n
