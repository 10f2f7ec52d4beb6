"""Tests for fxrewrite.maths.top_eigen: the certified top eigenpair against torch.linalg.eigh."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

from fxrewrite.maths import factorize, top_eigen
from fxrewrite.maths.factorize import depthwise_separable, grouped_separable
from fxrewrite.maths.top_eigen import TOL, top_eigenpairs, top_eigenpairs_filtered

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _grams(batch: int, rows: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, rows, n, dtype=F64, generator=gen)
    return a.mT @ a


def _with_spectrum(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """Symmetric matrices ``Q diag(eigenvalues) Q^T`` with random orthogonal ``Q``, one per row of ``eigenvalues``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*eigenvalues.shape, eigenvalues.shape[-1], dtype=F64, generator=gen))
    return (q * eigenvalues.unsqueeze(-2)) @ q.mT


def _check_against_eigh(g: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor, angle_gap: float = 1e-3) -> None:
    """Top eigenvalue to 1e-12 of the trace, unit vector, optimal energy, and the eigh vector up to sign where the
    top gap is at least ``angle_gap`` of the trace (elsewhere any vector of the top eigenspace is as good)."""
    ref_lam, ref_vec = torch.linalg.eigh(g)
    trace = g.diagonal(dim1=-2, dim2=-1).sum(-1)
    scale = trace.clamp_min(1e-300)
    assert torch.all((lam - ref_lam[:, -1]).abs() <= 1e-12 * scale)
    torch.testing.assert_close(vec.norm(dim=-1), torch.ones_like(lam), rtol=0, atol=1e-12)
    energy = torch.einsum("bi,bij,bj->b", vec, g, vec)
    assert torch.all(energy >= ref_lam[:, -1] - 1e-12 * scale)
    top = ref_vec[:, :, -1]
    sign = torch.where((vec * top).sum(-1) < 0, -1.0, 1.0)
    separated = ref_lam[:, -1] - ref_lam[:, -2] >= angle_gap * scale
    err = (vec - sign[:, None] * top).norm(dim=-1)
    gap = (ref_lam[:, -1] - ref_lam[:, -2]).clamp_min(1e-300)
    # eigh's own vector is accurate to ~eps ||G|| / gap; ours to TOL * trace / gap (its certified backward error)
    assert torch.all(err[separated] <= 4 * (TOL + 1e-15) * scale[separated] / gap[separated] + 1e-13)


@pytest.mark.parametrize("n", [2, 3, 9, 16, 25])
def test_random_grams_match_eigh(n: int) -> None:
    g = _grams(300, 4 * n + 7, n, seed=n)
    lam, vec = top_eigenpairs(g)
    _check_against_eigh(g, lam, vec)


def test_kaiming_3x3_grams_are_mostly_certified() -> None:
    """resnet-like 3x3 slices (256 x 9, small top gaps: median lambda2/lambda1 ~0.92) mostly avoid eigh."""
    g = _grams(512, 256, 9, seed=1)
    ref = torch.linalg.eigvalsh(g)
    assert float((ref[:, -2] / ref[:, -1]).median()) > 0.85  # the hard case the filter is tuned on
    lam, vec, ok = top_eigenpairs_filtered(g.numpy())
    assert ok.mean() >= 0.95
    certified = torch.from_numpy(ok)
    _check_against_eigh(g[certified], torch.from_numpy(lam)[certified], torch.from_numpy(vec)[certified])
    # certified backward error
    r = g.numpy() @ vec[:, :, None] - lam[:, None, None] * vec[:, :, None]
    assert np.all(np.linalg.norm(r[ok, :, 0], axis=-1) <= TOL * np.trace(g.numpy()[ok], axis1=1, axis2=2))


@pytest.mark.parametrize("rank", [0, 1, 2, 5])
def test_rank_deficient(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    a = torch.randn(200, 64, rank, dtype=F64, generator=gen) @ torch.randn(200, rank, 9, dtype=F64, generator=gen)
    g = a.mT @ a
    lam, vec = top_eigenpairs(g)
    if rank == 0:
        assert torch.all(lam == 0) and torch.all(vec.norm(dim=-1) > 0.99)
        return
    _check_against_eigh(g, lam, vec)


def test_repeated_and_near_degenerate_top_eigenvalues() -> None:
    base = torch.tensor([3.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.0, 0.0, 0.0], dtype=F64)
    cases = {
        "repeated": base,
        "near": base - torch.tensor([0.0, 3e-9] + [0.0] * 7, dtype=F64),
        "close": base - torch.tensor([0.0, 3e-4] + [0.0] * 7, dtype=F64),
        "scalar": torch.full((9,), 2.0, dtype=F64),
        "one": torch.tensor([1.0] + [0.0] * 8, dtype=F64),
    }
    for name, spectrum in cases.items():
        g = _with_spectrum(spectrum.expand(64, 9).clone(), seed=len(name))
        lam, vec = top_eigenpairs(g)
        _check_against_eigh(g, lam, vec)
        # the vector lies in the top eigenspace (to the accuracy its gap allows)
        top = float(spectrum.max())
        resid = (g @ vec.unsqueeze(-1)).squeeze(-1) - top * vec
        assert float(resid.norm(dim=-1).max()) <= 1e-6 * top, name


def test_top_vector_orthogonal_to_the_start() -> None:
    """The power steps that place the filter start from G 1; a top eigenvector orthogonal to 1 is still found."""
    v1 = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=F64) / math.sqrt(2)
    v2 = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64) / 2
    g = (5.0 * torch.outer(v1, v1) + 4.0 * torch.outer(v2, v2) + 0.1 * torch.eye(4, dtype=F64)).expand(40, 4, 4)
    lam, vec = top_eigenpairs(g.contiguous())
    torch.testing.assert_close(lam, torch.full((40,), 5.1, dtype=F64), rtol=1e-13, atol=0)
    torch.testing.assert_close((vec @ v1).abs(), torch.ones(40, dtype=F64), rtol=0, atol=1e-12)


def test_zero_and_nonfinite_rows_are_left_to_eigh() -> None:
    g = _grams(8, 20, 9, seed=3)
    g[2] = 0.0
    g[5, 0, 0] = math.inf
    lam, vec, ok = top_eigenpairs_filtered(g.numpy())
    assert not ok[2] and not ok[5]
    g[5] = _grams(1, 20, 9, seed=4)[0]
    lam, vec = top_eigenpairs(g)
    assert float(lam[2]) == 0.0
    _check_against_eigh(g, lam, vec)


def test_batch_shapes_and_dtype() -> None:
    g = _grams(12, 30, 4, seed=5).reshape(3, 4, 4, 4)
    lam, vec = top_eigenpairs(g)
    assert lam.shape == (3, 4) and vec.shape == (3, 4, 4) and lam.dtype == F64
    with pytest.raises(TypeError, match="float64"):
        top_eigenpairs(g.float())
    empty_lam, empty_vec = top_eigenpairs(torch.zeros(0, 3, 3, dtype=F64))
    assert empty_lam.shape == (0,) and empty_vec.shape == (0, 3)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e20])
def test_certificate_is_sound(scale: float) -> None:
    """Whatever the spectrum (top gap from 0 to 1, any floor, any scale), every certified pair is the top one.

    A seeded sweep of 60 spectra a scale: size 2..12, second eigenvalue ``ratio`` (0..1) of the top, the rest spread
    below it."""
    rng = np.random.default_rng(int(math.log10(scale)) + 40)
    for case in range(60):
        n = int(rng.integers(2, 13))
        ratio = float(rng.choice([rng.random(), 1 - 10 ** -rng.uniform(1, 12), 1.0]))
        spread = float(rng.random())
        gen = torch.Generator().manual_seed(case)
        rest = spread * ratio * torch.rand(32, n - 1, dtype=F64, generator=gen) + (1 - spread) * ratio
        rest[:, 0] = ratio
        spectrum = torch.cat([torch.ones(32, 1, dtype=F64), rest.clamp(0, 1)], 1) * scale
        g = _with_spectrum(spectrum, case)
        lam, vec, ok = top_eigenpairs_filtered(g.numpy())
        certified = torch.from_numpy(ok)
        if certified.any():
            _check_against_eigh(g[certified], torch.from_numpy(lam)[certified], torch.from_numpy(vec)[certified])
        full_lam, full_vec = top_eigenpairs(g)
        _check_against_eigh(g, full_lam, full_vec)


def _eigh_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factorize, "_TOP_EIGEN_MIN_BATCH", 10**9)


def test_depthwise_rank1_matches_the_eigh_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(6)
    w = torch.randn(256, 96, 3, 3, dtype=F64) / math.sqrt(256 * 9)
    fast = depthwise_separable(w, rank=1)
    _eigh_only(monkeypatch)
    ref = depthwise_separable(w, rank=1)
    assert fast.rel_error == pytest.approx(ref.rel_error, rel=1e-12)
    # same factors under the sign rule (largest-magnitude spatial entry positive); gaps here are >= ~1e-4 of the
    # trace, so the vectors agree to ~1e-9 (eigh's and ours)
    torch.testing.assert_close(fast.spatial, ref.spatial, rtol=0, atol=1e-8)
    torch.testing.assert_close(fast.pointwise, ref.pointwise, rtol=0, atol=1e-8)


def test_exact_rank1_weight_reconstructs_exactly() -> None:
    torch.manual_seed(7)
    cols = torch.randn(64, 48, 1, dtype=F64)
    kernels = torch.randn(1, 48, 9, dtype=F64)
    w = (cols * kernels).reshape(64, 48, 3, 3)  # every input channel's (64 x 9) slice has rank 1
    f = depthwise_separable(w, rank=1)
    recon = torch.einsum("oc,ckl->ockl", f.pointwise[:, :, 0, 0], f.spatial[:, 0])
    torch.testing.assert_close(recon, w, rtol=1e-12, atol=1e-12)
    assert f.rel_error < 1e-7
    w32 = w.float()
    f32 = depthwise_separable(w32, rank=1)
    torch.testing.assert_close(torch.einsum("oc,ckl->ockl", f32.pointwise[:, :, 0, 0], f32.spatial[:, 0]), w32)


def test_grouped_rank1_wide_slices() -> None:
    """Wide slices (O/G < (I/g) K) take the Gram of the rows; rank 1 of 4 x 18 slices against the eigh path."""
    torch.manual_seed(8)
    w = torch.randn(8, 64, 3, 3, dtype=F64)
    f = grouped_separable(w, groups=32, rank=1)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(factorize, "_TOP_EIGEN_MIN_BATCH", 10**9)
    try:
        ref = grouped_separable(w, groups=32, rank=1)
    finally:
        monkey.undo()
    assert f.rel_error == pytest.approx(ref.rel_error, rel=1e-12)
    torch.testing.assert_close(f.spatial, ref.spatial, rtol=0, atol=1e-8)
    torch.testing.assert_close(f.pointwise, ref.pointwise, rtol=0, atol=1e-8)


def test_doctests() -> None:
    result = doctest.testmod(top_eigen, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
