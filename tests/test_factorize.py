"""Tests for fxrewrite.maths.factorize (pure tensor maths)."""

from __future__ import annotations

import doctest
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fxrewrite.maths import factorize
from fxrewrite.maths.factorize import (
    BlockDiagonal,
    SeparableFactors,
    block_diagonal,
    channel_shuffle_permutation,
    dense_weight,
    depthwise_separable,
    exact_rank,
    grouped_separable,
    predicted_rel_error,
    singular_values,
)

CHANNELS = (1, 3, 4, 6, 8, 16)
KERNELS = ((3, 3), (1, 1), (3, 1), (1, 5), (2, 2), (5, 5))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add contention


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _configs() -> list[tuple[int, int, int, int]]:
    """All (O, I, G, g) with G | gcd(O, I), G | g, g | I."""
    out = []
    for o, i in itertools.product(CHANNELS, CHANNELS):
        for big_g in _divisors(math.gcd(o, i)):
            for g in _divisors(i):
                if g % big_g == 0:
                    out.append((o, i, big_g, g))
    return out


def _weight(o: int, i: int, big_g: int, kernel: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    fan_in = (i // big_g) * kernel[0] * kernel[1]
    return torch.randn(o, i // big_g, *kernel, dtype=torch.float64).div(math.sqrt(fan_in)).to(dtype)


def _dense_loop(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Independent (loop-based) densification of a grouped conv weight."""
    o, ipg = weight.shape[:2]
    dense = weight.new_zeros(o, ipg * groups, *weight.shape[2:])
    opg = o // groups
    for b in range(groups):
        dense[b * opg : (b + 1) * opg, b * ipg : (b + 1) * ipg] = weight[b * opg : (b + 1) * opg]
    return dense


def _reconstruct(f: SeparableFactors, source_groups: int) -> torch.Tensor:
    """Effective dense (O, I, kh, kw) weight of conv1x1(groups=G, pointwise) o conv(groups=g, spatial)."""
    spatial = _dense_loop(f.spatial, f.groups)  # (g*r, I, kh, kw)
    pointwise = _dense_loop(f.pointwise, source_groups)[:, :, 0, 0]  # (O, g*r)
    return torch.einsum("os,sikl->oikl", pointwise, spatial)


def _compose(x: torch.Tensor, f: SeparableFactors, source_groups: int, **conv_kwargs: object) -> torch.Tensor:
    return F.conv2d(F.conv2d(x, f.spatial, groups=f.groups, **conv_kwargs), f.pointwise, groups=source_groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", KERNELS)
def test_exact_rank_reproduces_conv(kernel: tuple[int, int], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x_all = torch.randn(2, 16, 6, 6, dtype=dtype)
    for o, i, big_g, g in _configs():
        w = _weight(o, i, big_g, kernel, dtype)
        r = exact_rank(tuple(w.shape), big_g, g)
        assert r == min(o // big_g, (i // g) * kernel[0] * kernel[1])
        f = grouped_separable(w, source_groups=big_g, groups=g, rank=r)
        assert f.spatial.shape == (g * r, i // g, *kernel)
        assert f.pointwise.shape == (o, g * r // big_g, 1, 1)
        assert f.spatial.dtype == dtype and f.pointwise.dtype == dtype
        assert f.rank == r and f.groups == g and f.exact
        assert f.rel_error < 1e-6
        x = x_all[:, :i]
        torch.testing.assert_close(
            _compose(x, f, big_g),
            F.conv2d(x, w, groups=big_g),
            msg=lambda m, cfg=(o, i, big_g, g): f"{cfg}: {m}",
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("o", "i", "big_g", "g", "kernel", "kwargs"),
    [
        (8, 6, 1, 3, (3, 3), {"stride": 2, "padding": 1}),
        (16, 8, 2, 4, (3, 3), {"dilation": 2, "padding": 2}),
        (6, 16, 2, 16, (5, 5), {"stride": (2, 1), "padding": (2, 0), "dilation": (1, 2)}),
        (3, 3, 3, 3, (1, 5), {"stride": 3, "padding": (0, 2)}),
        (4, 8, 4, 8, (2, 2), {"dilation": 3}),
    ],
)
def test_exact_with_stride_dilation_padding(
    o: int, i: int, big_g: int, g: int, kernel: tuple[int, int], kwargs: dict, dtype: torch.dtype
) -> None:
    torch.manual_seed(1)
    w = _weight(o, i, big_g, kernel, dtype)
    x = torch.randn(2, i, 11, 9, dtype=dtype)
    f = grouped_separable(w, source_groups=big_g, groups=g, rank=exact_rank(tuple(w.shape), big_g, g))
    torch.testing.assert_close(_compose(x, f, big_g, **kwargs), F.conv2d(x, w, groups=big_g, **kwargs))


@pytest.mark.parametrize(
    ("o", "i", "big_g", "g", "kernel"),
    [
        (16, 8, 1, 1, (3, 3)),
        (16, 8, 1, 4, (3, 3)),
        (16, 16, 2, 8, (1, 5)),
        (8, 16, 1, 16, (5, 5)),
        (18, 6, 3, 6, (3, 1)),
        (16, 4, 1, 2, (1, 1)),
    ],
)
def test_truncated_rank_error(o: int, i: int, big_g: int, g: int, kernel: tuple[int, int]) -> None:
    torch.manual_seed(2)
    w = _weight(o, i, big_g, kernel, torch.float64)
    dense = _dense_loop(w, big_g)
    norm = dense.norm()
    sv = singular_values(w, source_groups=big_g, groups=g)
    full = exact_rank(tuple(w.shape), big_g, g)
    assert sv.dtype == torch.float64 and sv.shape == (g, full)
    assert torch.all(sv[:, :-1] >= sv[:, 1:])
    errors = []
    for r in range(1, full + 1):
        f = grouped_separable(w, source_groups=big_g, groups=g, rank=r)
        recon_err = float((dense - _reconstruct(f, big_g)).norm() / norm)
        assert f.rel_error == pytest.approx(recon_err, abs=1e-6)
        assert f.rel_error == pytest.approx(predicted_rel_error(sv, r), abs=1e-12)
        assert f.exact == (r == full)
        assert f.spatial.is_contiguous() and f.pointwise.is_contiguous()  # adopted by make_conv without a copy
        # ordering/scaling: ||spatial[i*r + j]||^2 == s_j of group i; sign convention holds
        rows = f.spatial.reshape(g, r, -1)
        torch.testing.assert_close(rows.square().sum(-1), sv[:, :r])
        biggest = rows.gather(-1, rows.abs().argmax(-1, keepdim=True))
        assert torch.all(biggest > 0)
        errors.append(f.rel_error)
    assert errors[-1] < 1e-7
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(errors))
    if full > 1:
        assert errors[0] > 1e-3  # random weights are not low rank


def test_truncated_is_optimal_against_perturbation() -> None:
    torch.manual_seed(3)
    w = _weight(8, 8, 1, (3, 3), torch.float64)
    f = grouped_separable(w, groups=2, rank=3)
    dense = _dense_loop(w, 1)
    for _ in range(5):
        pert = SeparableFactors(
            spatial=f.spatial + 1e-3 * torch.randn_like(f.spatial),
            pointwise=f.pointwise + 1e-3 * torch.randn_like(f.pointwise),
            rank=3,
            groups=2,
            rel_error=0.0,
            exact=False,
        )
        assert float((dense - _reconstruct(pert, 1)).norm() / dense.norm()) >= f.rel_error - 1e-12


def test_deterministic_and_grad_input() -> None:
    torch.manual_seed(4)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    a = grouped_separable(w, groups=2, rank=4)
    b = grouped_separable(w.detach().clone(), groups=2, rank=4)
    assert not a.spatial.requires_grad
    torch.testing.assert_close(a.spatial, b.spatial, rtol=0, atol=0)
    torch.testing.assert_close(a.pointwise, b.pointwise, rtol=0, atol=0)


def test_depthwise_separable() -> None:
    torch.manual_seed(5)
    w = _weight(12, 6, 1, (3, 3), torch.float64)
    x = torch.randn(1, 6, 8, 8, dtype=torch.float64)
    assert exact_rank(tuple(w.shape), 1, 6) == 9
    f = depthwise_separable(w, rank=9)
    assert f.groups == 6 and f.spatial.shape == (54, 1, 3, 3) and f.pointwise.shape == (12, 54, 1, 1)
    torch.testing.assert_close(_compose(x, f, 1, padding=1), F.conv2d(x, w, padding=1))
    g = depthwise_separable(w, rank=1)
    assert g.spatial.shape == (6, 1, 3, 3) and g.rank == 1 and not g.exact
    # grouped source conv, multiplier T=2
    wg = _weight(8, 4, 2, (3, 3), torch.float64)
    h = depthwise_separable(wg, source_groups=2, rank=2)
    assert h.groups == 4 and h.pointwise.shape == (8, 4, 1, 1)
    sv = singular_values(wg, source_groups=2, groups=4)
    assert h.rel_error == pytest.approx(predicted_rel_error(sv, 2))


def test_zero_weight() -> None:
    w = torch.zeros(4, 2, 3, 3)
    f = grouped_separable(w, groups=2, rank=1)
    assert f.rel_error == 0.0 and not torch.isnan(f.spatial).any() and not torch.isnan(f.pointwise).any()
    assert predicted_rel_error(singular_values(w, groups=2), 1) == 0.0
    bd = block_diagonal(w, groups=2)
    assert bd.kept_energy == 1.0 and bd.rel_error == 0.0 and bd.exact


@pytest.mark.parametrize("o, i, big_g, g", [(8, 6, 1, 6), (8, 6, 1, 3), (8, 6, 2, 6), (8, 8, 4, 8), (6, 12, 3, 6),
                                             (16, 16, 1, 16), (4, 10, 1, 10)])
@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (1, 5)])
def test_group_matrix_chunks_are_the_group_slices_in_equal_runs(o: int, i: int, big_g: int, g: int,
                                                               kernel: tuple[int, int]) -> None:
    """Every chunk size (from one group to all): the chunks, read as they are drawn, are the float64 slices of the
    weight that input group ``i`` and its output block see, in order; as few runs as ``max_bytes`` allows, whose
    sizes differ by at most one group."""
    weight = _weight(o, i, big_g, kernel, torch.float32)
    ob, c, per_block, k = o // big_g, i // g, g // big_g, kernel[0] * kernel[1]
    expected = torch.stack([weight[(j // per_block) * ob:(j // per_block + 1) * ob,
                                   (j % per_block) * c:(j % per_block + 1) * c].reshape(ob, c * k)
                            for j in range(g)]).to(torch.float64)
    group_bytes = ob * c * k * 8
    for per_run in range(1, g + 1):  # a cap a few bytes above whole groups: runs are whole groups, rounded down
        drawn = [chunk.clone() for chunk in factorize.group_matrix_chunks(weight, big_g, g,
                                                                           max_bytes=per_run * group_bytes + 7)]
        sizes = [chunk.shape[0] for chunk in drawn]
        assert len(drawn) == -(-g // per_run) and max(sizes) <= per_run and max(sizes) - min(sizes) <= 1
        torch.testing.assert_close(torch.cat(drawn), expected, rtol=0, atol=0)
    torch.testing.assert_close(factorize.group_matrices(weight, big_g, g), expected, rtol=0, atol=0)


@pytest.mark.parametrize("o, i, big_g, g, kernel, rank, from_weight", [
    (64, 32, 1, 32, (3, 3), 1, True),  # depthwise-separable rank 1: formed from the float32 weight
    (64, 1, 1, 1, (7, 7), 1, True),  # a one-channel stem, 49 terms an entry
    (96, 32, 1, 8, (3, 3), 1, True),  # 4 channels a group: 36 terms
    (128, 16, 1, 2, (3, 3), 1, False),  # 72 terms: over the float32 limit
    (64, 32, 1, 32, (3, 3), 2, False),  # rank 2
    (64, 32, 2, 32, (3, 3), 1, False),  # a grouped source
    (4, 8, 1, 8, (3, 3), 1, False),  # wide matrices (O < c*K)
])
def test_float32_rank_one_pointwise_is_the_float64_one_to_float32_rounding(
        o: int, i: int, big_g: int, g: int, kernel: tuple[int, int], rank: int, from_weight: bool) -> None:
    """A float32 weight's factors against those of the same weight in float64: the spatial factors and the error are
    the same; the pointwise factor is the float64 one rounded to float32, or, where it is formed from the float32
    weight (rank 1, dense, tall, at most 64 terms an entry), within the rounding bound of a float32 sum of products:
    ``(terms + 1) * eps`` times the sum of the terms' magnitudes."""
    weight = _weight(o, i, big_g, kernel, torch.float32)
    k = kernel[0] * kernel[1]
    ob, terms = o // big_g, i // g * k
    assert factorize._pointwise_from_weight(weight, big_g, rank, ob, terms) is from_weight
    f32 = grouped_separable(weight, source_groups=big_g, groups=g, rank=rank)
    f64 = grouped_separable(weight.double(), source_groups=big_g, groups=g, rank=rank)
    assert f32.rel_error == f64.rel_error
    torch.testing.assert_close(f32.spatial, f64.spatial.float(), rtol=0, atol=0)
    if not from_weight:
        torch.testing.assert_close(f32.pointwise, f64.pointwise.float(), rtol=0, atol=0)
        return
    # rank 1: each group's spatial row is sqrt(s) v, so the vector the weight is multiplied by, v / sqrt(s), is
    # that row over its squared norm
    rows = f64.spatial.reshape(g, terms)
    scaled = rows / rows.square().sum(1, keepdim=True)
    magnitudes = (weight.double().reshape(o, g, terms).abs() * scaled.abs()).sum(-1)  # (O, g)
    error = (f32.pointwise.double() - f64.pointwise).reshape(o, g).abs()
    assert error.max() > 0 and bool((error <= (terms + 1) * torch.finfo(torch.float32).eps * magnitudes).all())


def test_exact_rank_values() -> None:
    assert exact_rank((8, 4, 3, 3), 1, 4) == 8
    assert exact_rank((32, 4, 3, 3), 1, 4) == 9
    assert exact_rank((32, 2, 3, 3), 2, 4) == 9
    assert exact_rank((32, 2, 1, 1), 2, 2) == 2
    assert exact_rank((6, 2, 1, 5), 3, 6) == 2


def test_dense_weight() -> None:
    torch.manual_seed(6)
    for o, i, big_g in [(8, 4, 2), (6, 3, 3), (4, 4, 1), (16, 16, 16)]:
        w = torch.randn(o, i // big_g, 3, 2)
        d = dense_weight(w, big_g)
        assert d.shape == (o, i, 3, 2)
        torch.testing.assert_close(d, _dense_loop(w, big_g), rtol=0, atol=0)
        x = torch.randn(1, i, 5, 5)
        torch.testing.assert_close(F.conv2d(x, d), F.conv2d(x, w, groups=big_g))


def test_block_diagonal_exact_on_block_diagonal_weight() -> None:
    torch.manual_seed(7)
    for o, i, big_g, g in [(8, 4, 1, 2), (16, 8, 2, 4), (6, 6, 1, 6), (12, 6, 3, 3), (4, 4, 2, 2)]:
        w_g = torch.randn(o, i // g, 3, 3, dtype=torch.float64)
        dense = _dense_loop(w_g, g)  # block diagonal for g (hence also for big_g)
        w = torch.cat(
            [
                dense[b * o // big_g : (b + 1) * o // big_g, b * i // big_g : (b + 1) * i // big_g]
                for b in range(big_g)
            ]
        )
        bd = block_diagonal(w, source_groups=big_g, groups=g)
        assert isinstance(bd, BlockDiagonal)
        assert bd.exact and bd.groups == g
        assert bd.kept_energy == pytest.approx(1.0, abs=1e-12)
        assert bd.rel_error == pytest.approx(0.0, abs=1e-6)
        torch.testing.assert_close(bd.weight, w_g, rtol=0, atol=0)
        x = torch.randn(2, i, 7, 7, dtype=torch.float64)
        torch.testing.assert_close(F.conv2d(x, bd.weight, groups=g), F.conv2d(x, w, groups=big_g))


def test_block_diagonal_random_kept_energy() -> None:
    torch.manual_seed(8)
    for o, i, big_g, g in [(8, 4, 1, 2), (16, 8, 2, 4), (6, 6, 1, 3), (12, 6, 3, 6)]:
        w = torch.randn(o, i // big_g, 3, 1, dtype=torch.float64)
        dense = _dense_loop(w, big_g)
        ob, c = o // g, i // g
        kept = sum(float(dense[b * ob : (b + 1) * ob, b * c : (b + 1) * c].square().sum()) for b in range(g))
        manual = kept / float(dense.square().sum())
        bd = block_diagonal(w, source_groups=big_g, groups=g)
        assert bd.kept_energy == pytest.approx(manual, rel=1e-12)
        assert bd.rel_error == pytest.approx(math.sqrt(1 - manual), rel=1e-9)
        assert bd.exact == (g == big_g)
        assert bd.weight.shape == (o, c, 3, 1)
        recon = _dense_loop(bd.weight, g)
        assert float((dense - recon).norm() / dense.norm()) == pytest.approx(bd.rel_error, rel=1e-9)


def test_channel_shuffle_permutation() -> None:
    torch.manual_seed(9)
    for c, g in [(12, 3), (12, 4), (8, 1), (8, 8), (6, 2)]:
        x = torch.randn(2, c, 3, 3)
        shuffled = x.view(2, g, c // g, 3, 3).transpose(1, 2).reshape(2, c, 3, 3)
        perm = channel_shuffle_permutation(c, g)
        assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(c))
        torch.testing.assert_close(x[:, perm], shuffled, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"groups=5.*channels=12"):
        channel_shuffle_permutation(12, 5)


def test_errors_name_the_numbers() -> None:
    w = torch.randn(8, 8, 3, 3)
    with pytest.raises(ValueError, match=r"groups=3.*I=8"):
        grouped_separable(w, groups=3, rank=1)
    with pytest.raises(ValueError, match=r"rank=0.*exact rank 8"):
        grouped_separable(w, groups=2, rank=0)
    with pytest.raises(ValueError, match=r"rank=9.*exact rank 8"):
        grouped_separable(w, groups=2, rank=9)
    with pytest.raises(ValueError, match=r"rank=10.*exact rank 9"):
        depthwise_separable(torch.randn(16, 2, 3, 3), rank=10)
    wg = torch.randn(8, 4, 3, 3)  # source_groups=2 -> I=8
    with pytest.raises(ValueError, match=r"groups=1.*source_groups=2"):
        grouped_separable(wg, source_groups=2, groups=1, rank=1)
    with pytest.raises(ValueError, match=r"groups=1.*source_groups=2"):
        singular_values(wg, source_groups=2, groups=1)
    with pytest.raises(ValueError, match=r"groups=16.*I=8"):
        exact_rank((8, 4, 3, 3), 2, 16)
    with pytest.raises(ValueError, match=r"groups=4.*O=6"):
        block_diagonal(torch.randn(6, 8, 3, 3), groups=4)
    with pytest.raises(ValueError, match=r"groups=1.*source_groups=2"):
        block_diagonal(wg, source_groups=2, groups=1)
    with pytest.raises(ValueError, match=r"source_groups=3.*8"):
        dense_weight(torch.randn(8, 2, 3, 3), 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_round_trip(dtype: torch.dtype) -> None:
    torch.manual_seed(10)
    w = _weight(8, 4, 1, (3, 3), torch.float32).to(dtype)
    f = grouped_separable(w, groups=2, rank=8)
    assert f.spatial.dtype == dtype and f.pointwise.dtype == dtype and f.exact
    recon = _reconstruct(
        SeparableFactors(f.spatial.double(), f.pointwise.double(), f.rank, f.groups, f.rel_error, f.exact), 1
    )
    torch.testing.assert_close(recon, w.double(), rtol=0.05, atol=0.02)
    d = depthwise_separable(w, rank=2)
    assert d.spatial.dtype == dtype and d.pointwise.dtype == dtype
    bd = block_diagonal(w, groups=2)
    assert bd.weight.dtype == dtype
    assert singular_values(w, groups=2).dtype == torch.float64


def test_doctests() -> None:
    result = doctest.testmod(factorize, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
