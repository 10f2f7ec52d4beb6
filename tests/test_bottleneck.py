"""Bottleneck passes (depthwise-bottleneck, grouped-bottleneck) and their fits (fxrewrite.maths.bottleneck_fit).

Exactness at the exact rank through ``fxrewrite.rewrite`` (stride, dilation, padding strings and modes, bias, odd
channels, grouped source convs), the precise Tucker-2 exactness condition, ALS never worse than its closed-form start
and never worse with more sweeps, errors falling with rank, the recorded error equal to the one recomputed here from
the new modules' weights, preservation of dtype / flags / layout, idempotence, eligibility and option errors.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxrewrite
from fxrewrite.errors import ConfigError
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.maths import bottleneck_fit as bf
from fxrewrite.maths.block_term_als import cp_als
from fxrewrite.maths.bottleneck_factors import Unfolded, dense_oki, fit_error
from fxrewrite.passes import REGISTRY, PassManager
from fxrewrite.passes.bottleneck import DepthwiseBottleneck, GroupedBottleneck
from fxrewrite.passes.pipeline import parse_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")



def _rewrite(model: nn.Module, x: torch.Tensor, *passes: Any) -> fxrewrite.RewriteResult:
    return fxrewrite.rewrite(model, (x,), passes=list(passes), verify=False)


def _decaying(o: int, i: int, kh: int, kw: int, seed: int = 0) -> torch.Tensor:
    """A float64 conv weight whose mode-O and mode-I spectra decay like exp(-3t) (trained weights look like this)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, kh * kw, dtype=torch.float64, generator=g)
    w = w * torch.linspace(0, -3, o, dtype=torch.float64).exp()[:, None, None]
    w = w * torch.linspace(0, -3, i, dtype=torch.float64).exp()[None, :, None]
    qo = torch.linalg.qr(torch.randn(o, o, dtype=torch.float64, generator=g))[0]
    qi = torch.linalg.qr(torch.randn(i, i, dtype=torch.float64, generator=g))[0]
    return torch.einsum("oik,ao,bi->abk", w, qo, qi).reshape(o, i, kh, kw)


def _dense_from_modules(seq: nn.Sequential) -> torch.Tensor:
    """The effective dense (O, I, kh, kw) weight of 1x1 -> grouped kxk -> 1x1, computed here independently."""
    first, core, last = (c.weight.detach().double() for c in seq)
    g = seq[1].groups
    r_in = first.shape[0]
    r_out, per, kh, kw = core.shape
    dense_core = torch.zeros(r_out, r_in, kh, kw, dtype=torch.float64)
    for b in range(g):  # block-diagonal expansion of the grouped conv
        dense_core[b * (r_out // g):(b + 1) * (r_out // g), b * per:(b + 1) * per] = core[
            b * (r_out // g):(b + 1) * (r_out // g)]
    mid = torch.einsum("pqhw,qi->pihw", dense_core, first[:, :, 0, 0])
    return torch.einsum("op,pihw->oihw", last[:, :, 0, 0], mid)


# ------------------------------------------------------------------------------------- exactness through rewrite

CONVS = [  # (in, out, kernel, stride, padding, dilation, padding_mode, bias, groups)
    (3, 5, (3, 3), 1, 1, 1, "zeros", True, 1),
    (4, 6, (3, 1), 2, (1, 0), 1, "reflect", False, 2),
    (5, 3, (2, 2), 1, "same", 2, "circular", True, 1),
    (6, 9, (3, 3), (2, 1), 2, 2, "replicate", True, 3),
    (4, 7, (1, 5), 1, "valid", (1, 2), "zeros", False, 1),
    (2, 9, (2, 2), 1, 0, 1, "zeros", True, 1),  # O > I*K: the mode-O rank is I*K, not O
]
EXACT_PASSES = [GroupedBottleneck(groups=1, rank="exact"), GroupedBottleneck(groups=2, rank="exact"),
                GroupedBottleneck(groups=3, rank="exact"), DepthwiseBottleneck(rank="exact")]


@pytest.mark.parametrize("cfg", CONVS, ids=str)
@pytest.mark.parametrize("p", EXACT_PASSES, ids=lambda p: p.spec())
def test_exact_rank_reproduces_the_conv(cfg: tuple, p: Any) -> None:
    cin, cout, kernel, stride, padding, dilation, mode, bias, groups = cfg
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias, padding_mode=mode,
                     dtype=torch.float64)
    x = torch.randn(2, cin, 9, 11, dtype=torch.float64)
    result = _rewrite(nn.Sequential(conv), x, p)
    (record,) = result.report.records
    assert record.status == "rewritten" and record.exact is True and record.rel_error < 1e-12
    seq = result.module.get_submodule("0")
    first, core, last = seq
    rank = record.details["rank"]
    assert rank == record.details["exact_rank"]
    assert (first.in_channels, first.out_channels, core.in_channels, core.out_channels, last.out_channels) == (
        cin, rank, rank, rank, cout)
    assert core.groups == (rank if isinstance(p, DepthwiseBottleneck) else p.groups)
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(core, attr) == getattr(conv, attr), attr
    for c in (first, last):
        assert (c.kernel_size, c.stride, c.padding, c.dilation, c.groups) == ((1, 1), (1, 1), (0, 0), (1, 1), 1)
    assert first.bias is None and core.bias is None and (last.bias is not None) is bias
    if bias:
        torch.testing.assert_close(last.bias, conv.bias, rtol=0, atol=0)
    torch.testing.assert_close(result.module(x), conv(x))


def test_exact_rank_in_float32_matches_at_float_level() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, stride=2))
    x = torch.randn(2, 6, 10, 10)
    for p in (GroupedBottleneck(groups=1, rank="exact"), DepthwiseBottleneck(rank="exact")):
        result = _rewrite(model, x, p)
        assert [r.status for r in result.report.records] == ["rewritten", "rewritten"]
        assert {q.dtype for q in result.module.parameters()} == {torch.float32}
        torch.testing.assert_close(result.module(x), model(x))


def test_tucker2_exactness_condition_is_tight() -> None:
    """Exact iff rank_out >= min(O, I*K) and rank_in >= min(I, O*K) (generic weights): one less on either side is
    not, and the error then equals the discarded mode spectrum's share (Eckart-Young on the unfolding)."""
    torch.manual_seed(0)
    for o, i, kh, kw in ((9, 2, 2, 2), (3, 7, 1, 2), (6, 5, 3, 3)):
        w = torch.randn(o, i, kh, kw, dtype=torch.float64)
        ro, ri = min(o, i * kh * kw), min(i, o * kh * kw)
        fit = bf.tucker2(w, ri, ro)
        assert fit.exact and fit.rel_error < 1e-12
        torch.testing.assert_close(fit.dense(), w, rtol=0, atol=1e-12)
        less_out = bf.tucker2(w, ri, ro - 1, max_iter=0)
        s = torch.linalg.svdvals(w.reshape(o, -1))
        assert not less_out.exact
        assert less_out.rel_error == pytest.approx(float(s[ro - 1] / s.norm()), rel=1e-9)
        less_in = bf.tucker2(w, ri - 1, ro)
        assert not less_in.exact and less_in.rel_error > 1e-3


@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (4, 9, 3, 3), (6, 6, 1, 3), (3, 2, 2, 2)])
@pytest.mark.parametrize("groups", [None, 1, 2, 3])
def test_block_term_is_exact_at_its_exact_rank(shape: tuple[int, ...], groups: int | None) -> None:
    torch.manual_seed(1)
    w = torch.randn(*shape, dtype=torch.float64)
    rank = bf.exact_rank(shape, groups)
    g = rank if groups is None else groups
    fit = bf.block_term(w, g, rank)
    assert fit.exact and fit.rel_error < 1e-12
    torch.testing.assert_close(fit.dense(), w, rtol=0, atol=1e-12)
    assert fit.first.shape == (rank, shape[1], 1, 1) and fit.core.shape == (rank, rank // g, *shape[2:])


def test_exact_rank_formulas() -> None:
    # CP: one SVD per input (or output) channel: min(I * min(O, K), O * min(I, K))
    assert bf.exact_rank((16, 8, 3, 3), None) == min(8 * 9, 16 * 8) == 72
    assert bf.exact_rank((4, 20, 3, 3), None) == min(20 * 4, 4 * 9) == 36
    # Tucker-2: max(min(O, I*K), min(I, O*K))
    assert bf.exact_rank((16, 8, 3, 3), 1) == 16 and bf.exact_rank((30, 2, 2, 2), 1) == 8
    # grouped, given a source conv with groups: I counts all input channels
    assert bf.exact_rank((8, 2, 3, 3), 1, source_groups=4) == 8


# ------------------------------------------------------------------------------------------ fitting behaviour

@pytest.mark.parametrize("groups", [1, 2, 8])
def test_als_is_never_worse_than_its_closed_form_start(groups: int) -> None:
    w = _decaying(12, 10, 3, 3)
    rank = 8
    start = bf.block_term(w, groups, rank, max_iter=0)
    fit = bf.block_term(w, groups, rank)
    assert fit.init_rel_error == pytest.approx(start.rel_error, rel=1e-9)
    assert fit.rel_error <= fit.init_rel_error
    if groups > 1:  # ALS really moves away from the block diagonal of the HOSVD core
        assert fit.rel_error < 0.95 * fit.init_rel_error
    random = bf.block_term(w, groups, rank, init="random", tol=0.0, max_iter=5)
    assert random.rel_error <= random.init_rel_error


@pytest.mark.parametrize("kind", ["tucker", "cp-random", "grouped-random"])
def test_more_sweeps_never_increase_the_error(kind: str) -> None:
    w = _decaying(10, 8, 3, 3, seed=3)
    errors = []
    for n in (0, 1, 2, 4, 8, 16):
        if kind == "tucker":
            fit = bf.tucker2(w, 4, 5, tol=0.0, max_iter=n)
        else:
            g = 6 if kind == "cp-random" else 2
            fit = bf.block_term(w, g, 6, init="random", tol=0.0, max_iter=n)
        if kind != "tucker":
            assert fit.iterations == n and fit.converged is False
        errors.append(fit.rel_error)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < errors[0]


def test_tolerance_stops_early_and_reports_convergence() -> None:
    w = _decaying(16, 12, 3, 3)
    loose = bf.block_term(w, 10, 10, tol=1e-2, max_iter=2000)
    tight = bf.block_term(w, 10, 10, tol=1e-5, max_iter=2000)
    assert loose.converged and tight.converged
    assert loose.iterations < tight.iterations
    assert tight.rel_error <= loose.rel_error
    # the cap applies per stage: one stage on the weight when the HOSVD would not compress (2 R R > O I) ...
    capped = bf.block_term(w, 10, 10, tol=0.0, max_iter=3)
    assert not capped.converged and capped.iterations == 3
    # ... and two (on the HOSVD core, then on the weight) when it does
    capped = bf.block_term(w, 2, 4, tol=0.0, max_iter=3)
    assert not capped.converged and capped.iterations == 6
    # CP: one stage on the weight while O*I*K*R < SMALL_FIT_MACS (the compression would save no time), else two
    assert 16 * 12 * 9 * 4 < bf.SMALL_FIT_MACS <= 64 * 64 * 9 * 32
    capped = bf.block_term(w, 4, 4, tol=0.0, max_iter=3)
    assert not capped.converged and capped.iterations == 3
    capped = bf.block_term(_decaying(64, 64, 3, 3), 32, 32, tol=0.0, max_iter=3)
    assert not capped.converged and capped.iterations == 6


def test_cp_sweeps_with_float32_products_track_the_float64_ones() -> None:
    """The CP stage on a large HOSVD core takes its products with the weight in float32: from the same start, the
    same number of sweeps lands within float32 rounding of the float64 result."""
    w3 = _decaying(24, 20, 3, 3, seed=5).reshape(24, 20, 9)
    unf = Unfolded(w3)
    g = torch.Generator().manual_seed(0)
    start = (torch.randn(24, 6, 1, generator=g, dtype=torch.float64), torch.zeros(6, 1, 1, 9, dtype=torch.float64),
             torch.randn(20, 6, 1, generator=g, dtype=torch.float64))
    (_, double, e_double, n_double, _), (_, single, e_single, n_single, _) = (
        cp_als(unf, start, 0.0, 12, fit_core=True, offset2=0.0, ref2=unf.norm2, single=s) for s in (False, True))
    assert n_double == n_single == 12 and e_single == pytest.approx(e_double, rel=1e-6)
    err_double, err_single = fit_error(unf, double), fit_error(unf, single)
    assert err_double < 0.9 * e_double and err_single == pytest.approx(err_double, rel=1e-5)
    gap = float((dense_oki(single) - dense_oki(double)).norm())
    assert 0 < gap < 1e-5 * float(w3.norm())  # not bit-identical: the float32 products were really used


def test_cp_sweeps_switch_to_float64_products_near_an_exact_fit() -> None:
    """Float32 products resolve the squared error to ~1e-7 of ||W||^2 only (a plateau near 1e-4 relative error on an
    exact CP tensor): below SINGLE_MIN_ERROR the sweeps go on in float64 and reach the float64 fit's accuracy."""
    g = torch.Generator().manual_seed(0)
    u, v, c = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (12, 10, 9))
    unf = Unfolded(torch.einsum("or,ir,kr->oik", u, v, c))
    start = (u.reshape(12, 3, 1) + 0.1 * torch.randn(12, 3, 1, generator=g, dtype=torch.float64),
             torch.zeros(3, 1, 1, 9, dtype=torch.float64),
             v.reshape(10, 3, 1) + 0.1 * torch.randn(10, 3, 1, generator=g, dtype=torch.float64))
    errors = [fit_error(unf, cp_als(unf, start, 0.0, 40, fit_core=True, offset2=0.0, ref2=unf.norm2,
                                    single=s)[1]) for s in (False, True)]
    assert errors[0] < 1e-7 and errors[1] < 1e-6, errors


@pytest.mark.parametrize("groups", [1, 2, None])
def test_error_falls_with_rank(groups: int | None) -> None:
    w = _decaying(16, 12, 3, 3, seed=2)
    ranks = [2, 4, 6, 8, 12] if groups != 2 else [2, 4, 8, 12]
    errors = [bf.block_term(w, r if groups is None else groups, r).rel_error for r in ranks]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors), errors


def test_fit_beats_the_separable_and_grouped_forms_at_equal_macs() -> None:
    """The issue's observation, on a decaying-spectrum weight: CP beats depthwise-separable multiplier 1 at equal
    MACs, and Tucker-2 at half the MACs beats the block-diagonal grouped conv with 2 groups."""
    from fxrewrite.maths import factorize
    w = _decaying(32, 32, 3, 3, seed=4)
    o, i = 32, 32
    cp_rank = bf.rank_for_macs(i, o, 3, i * 9 + o * i, depthwise=True)
    separable = factorize.depthwise_separable(w, rank=1).rel_error
    assert bf.block_term(w, cp_rank, cp_rank).rel_error < separable
    t_rank = bf.rank_for_macs(i, o, 3, o * i * 9 / 2)
    assert bf.tucker2(w, t_rank, t_rank).rel_error < factorize.block_diagonal(w, groups=2).rel_error


def test_macs_and_equal_macs_ranks() -> None:
    assert bf.bottleneck_macs(16, 32, 3, 8, groups=2) == 16 * 8 + 8 * 4 * 9 + 8 * 32
    assert bf.bottleneck_macs(16, 32, (1, 3), 4, rank_out=6) == 16 * 4 + 6 * 4 * 3 + 6 * 32
    for groups, depthwise in ((1, False), (4, False), (1, True)):
        budget = 16 * 32 * 9 / 3
        r = bf.rank_for_macs(16, 32, 3, budget, groups=groups, depthwise=depthwise)
        step = 1 if depthwise else groups
        costs = [bf.bottleneck_macs(16, 32, 3, rank, groups=rank if depthwise else groups) for rank in (r, r + step)]
        assert r % step == 0 and costs[0] <= budget < costs[1]
    # and the MACs of a built module (stride 1, size-preserving padding) are the formula times the pixels
    torch.manual_seed(0)
    x = torch.randn(1, 16, 6, 5)
    result = _rewrite(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)), x, GroupedBottleneck(groups=2, rank=8))
    assert result.report.records[0].macs_after == 6 * 5 * bf.bottleneck_macs(16, 32, 3, 8, groups=2)


def test_zero_weight_and_bad_arguments() -> None:
    zero = bf.block_term(torch.zeros(4, 3, 3, 3), 2, 4)
    assert zero.rel_error == 0.0 and not zero.core.any()
    assert bf.tucker2(torch.zeros(4, 3, 3, 3), 2, 2).rel_error == 0.0
    with pytest.raises(ValueError, match="multiple of groups"):
        bf.block_term(torch.randn(4, 3, 3, 3), 3, 4)
    with pytest.raises(ValueError, match="non-finite"):
        bf.tucker2(torch.full((4, 3, 3, 3), math.nan), 2, 2)
    with pytest.raises(ValueError, match="init"):
        bf.block_term(torch.randn(4, 3, 3, 3), 2, 4, init="hosvd")


# ---------------------------------------------------------------------------------------------- through a pass

@pytest.mark.parametrize("p", [GroupedBottleneck(groups=1, rank=4), GroupedBottleneck(groups=2, rank=6),
                               DepthwiseBottleneck(rank=5)], ids=lambda p: p.spec())
def test_recorded_error_equals_the_error_of_the_new_modules(p: Any) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(_decaying(10, 6, 3, 3, seed=5))
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    result = _rewrite(nn.Sequential(conv), x, p)
    (record,) = result.report.records
    seq = result.module.get_submodule("0")
    dense = _dense_from_modules(seq)
    weight = conv.weight.detach()
    expected = float((dense - weight).norm() / weight.norm())
    assert record.rel_error == pytest.approx(expected, rel=1e-9) and 0.01 < expected < 1
    assert record.exact is False and record.details["iterations"] >= 1
    assert record.rel_error <= record.details["init_rel_error"]
    # the three convs compute exactly the conv with the dense fitted weight (and the bias)
    torch.testing.assert_close(result.module(x), F.conv2d(x, dense, conv.bias, stride=2, padding=1))


def test_rank_increases_lower_the_recorded_error() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, dtype=torch.float64)
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    errors = [_rewrite(nn.Sequential(conv), x, DepthwiseBottleneck(rank=r)).report.records[0].rel_error
              for r in (2, 4, 8, 16)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] - 0.1


def test_grouped_source_conv_and_functional_conv() -> None:
    torch.manual_seed(0)

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 2, 3, 3, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.w, None, stride=1, padding=1, groups=2)

    model = Functional()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    result = _rewrite(model, x, GroupedBottleneck(groups=1, rank="exact"))
    assert [r.status for r in result.report.records] == ["rewritten"]
    torch.testing.assert_close(result.module(x), model(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_layout_and_flags_are_preserved(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).to(dtype)
    model = model.to(memory_format=torch.channels_last)
    model[0].weight.requires_grad_(False)
    model.train()
    model[2].eval()
    x = torch.randn(1, 4, 9, 9).to(dtype)
    result = _rewrite(model, x, GroupedBottleneck(groups=2, rank=8))
    assert result.module.training is True
    for name, frozen, training in (("0", True, True), ("2", False, False)):
        seq = result.module.get_submodule(name)
        assert all(m.training is training for m in seq.modules())
        for c in seq:
            assert c.weight.dtype == dtype and c.weight.requires_grad is not frozen
            assert c.weight.is_contiguous(memory_format=torch.channels_last)
        assert seq[2].bias.requires_grad is True and seq[2].bias.dtype == dtype
    assert result.module(x).dtype == dtype


def test_random_init_is_a_fresh_initialisation() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3)
    result = _rewrite(nn.Sequential(conv), torch.randn(1, 6, 7, 7), DepthwiseBottleneck(rank=4, init="random"))
    (record,) = result.report.records
    assert record.status == "rewritten" and record.rel_error is None and record.exact is False
    seq = result.module.get_submodule("0")
    assert [c.weight.shape for c in seq] == [(4, 6, 1, 1), (4, 1, 3, 3), (8, 4, 1, 1)]
    assert not torch.equal(seq[2].bias, conv.bias)  # torch's default init, not the trained bias


@pytest.mark.parametrize("spec", ["grouped-bottleneck{groups=1, rank=6}", "grouped-bottleneck{groups=2, rank=6}",
                                  "depthwise-bottleneck{rank=6}", "grouped-bottleneck{groups=1, rank=exact}"])
def test_running_a_pass_twice_changes_nothing_the_second_time(spec: str) -> None:
    registry = {**REGISTRY, "depthwise-bottleneck": DepthwiseBottleneck, "grouped-bottleneck": GroupedBottleneck}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 8, (1, 3))).double()
    x = torch.randn(2, 8, 6, 7, dtype=torch.float64)
    gm = trace(model)
    propagate_shapes(gm, (x,))
    first = PassManager(parse_pipeline(spec, registry))(gm)
    assert first.modified
    code, state = first.graph_module.code, {k: v.clone() for k, v in first.graph_module.state_dict().items()}
    for p in parse_pipeline(spec, registry):
        second = p(first.graph_module)
        assert second.modified is False and all(r.status == "skipped" for r in second.records)
        codes = {r.site: r.code for r in second.records}
        assert codes["0.0"] == codes["0.2"] == "pointwise-kernel"
        assert codes["0.1"] == ("already-depthwise" if spec.startswith("depthwise") else "already-bottleneck")
    assert first.graph_module.code == code
    assert all(torch.equal(v, state[k]) for k, v in first.graph_module.state_dict().items())
    again = fxrewrite.rewrite(first.graph_module, (x,), passes=parse_pipeline(spec, registry), verify=False)
    assert not any(r.status == "rewritten" for r in again.report.records)
    # a plain model with the same structure (no provenance: e.g. rebuilt from a saved plan) is recognised too
    plain = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 8, 1))
    rerun = _rewrite(plain, x.float(), GroupedBottleneck(groups=1, rank=2))
    assert [r.code for r in rerun.report.records] == ["pointwise-kernel", "already-bottleneck", "pointwise-kernel"]


def test_eligibility_reasons() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 3))
    x = torch.randn(1, 4, 8, 8)
    result = _rewrite(model, x, DepthwiseBottleneck(rank=40), GroupedBottleneck(groups=2, rank=4))
    codes = [(r.pass_name, r.site, r.code) for r in result.report.records]
    assert codes == [("depthwise-bottleneck", "0", "pointwise-kernel"),
                     ("depthwise-bottleneck", "1", "already-depthwise"),
                     ("depthwise-bottleneck", "2", "rank-too-large"),  # exact rank min(8*4, 4*8) = 32 < 40
                     ("grouped-bottleneck", "0", "pointwise-kernel"),
                     ("grouped-bottleneck", "1", "already-depthwise"),
                     ("grouped-bottleneck", "2", None)]


def test_options_are_validated_and_parse_from_pipeline_strings() -> None:
    registry = {"depthwise-bottleneck": DepthwiseBottleneck, "grouped-bottleneck": GroupedBottleneck}
    (p,) = parse_pipeline("grouped-bottleneck{groups=2, rank=8, init=random, tol=1e-6, max_iter=50}", registry)
    assert p == GroupedBottleneck(groups=2, rank=8, init="random", tol=1e-6, max_iter=50)
    assert p.spec() == "grouped-bottleneck{groups=2, rank=8, init=random, tol=1e-06, max_iter=50}"
    for bad, match in (("grouped-bottleneck{groups=3, rank=8}", "must divide rank"),
                       ("depthwise-bottleneck{rank=0}", "positive integer"),
                       ("depthwise-bottleneck{init=hosvd}", "init must be"),
                       ("depthwise-bottleneck{tol=-1}", "tol must be"),
                       ("grouped-bottleneck{max_iter=1.5}", "max_iter must be")):
        with pytest.raises(ConfigError, match=match):
            parse_pipeline(bad, registry)
