"""Exactness oracle: depthwise-separable / grouped-separable rewrites over hundreds of Conv2d configurations.

With ``rank=exact`` the rewritten module must equal the original within ``torch.testing.assert_close`` defaults, in
float32 and float64. With a truncated rank the rewritten module must compute exactly the conv with the weight
``W'`` that its two convs densify to (computed here independently of fxrewrite), and the recorded ``rel_error`` must
equal both ``||W - W'|| / ||W||`` and the prediction from the discarded singular values (Eckart-Young, computed here
from an independent SVD per input group).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import fxrewrite

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 7, 9  # small spatial size: the whole oracle stays well under a minute


KERNELS = [(3, 3), (3, 1), (1, 5), (2, 2), (5, 3)]
PADDINGS: list[Any] = [0, 1, (2, 1), "same", "valid"]
MODES = ["zeros", "reflect", "replicate", "circular"]
# (in, out, a groups count the source conv may have besides 1); odd channel counts included
CHANNELS = [(3, 5, 1), (4, 8, 2), (6, 4, 2), (5, 7, 1), (6, 9, 3), (8, 6, 2), (9, 3, 3)]
STRIDES: list[Any] = [1, 2, (2, 1), 1]
DILATIONS: list[Any] = [1, 2, 1, (1, 2)]


@dataclass(frozen=True)
class Cfg:
    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: Any
    padding: Any
    dilation: Any
    mode: str
    bias: bool
    groups: int

    def conv(self, dtype: torch.dtype = torch.float64) -> nn.Conv2d:
        return nn.Conv2d(self.cin, self.cout, self.kernel, self.stride, self.padding, self.dilation, self.groups,
                         self.bias, padding_mode=self.mode, dtype=dtype)

    def __str__(self) -> str:
        p = self.padding if isinstance(self.padding, str) else str(self.padding).replace(" ", "")
        return (f"{self.cin}x{self.cout}_k{self.kernel[0]}{self.kernel[1]}_s{self.stride}_p{p}_d{self.dilation}"
                f"_{self.mode}_b{int(self.bias)}_g{self.groups}").replace(" ", "")


def _valid(cfg: Cfg) -> bool:
    """torch accepts the conv and gives a non-empty output on an H x W input."""
    try:
        with torch.no_grad():
            y = cfg.conv()(torch.zeros(1, cfg.cin, H, W, dtype=torch.float64))
    except (RuntimeError, ValueError):
        return False
    return y.numel() > 0


def _configs() -> list[Cfg]:
    out = []
    for i, (kernel, padding, mode) in enumerate(itertools.product(KERNELS, PADDINGS, MODES)):
        for j in range(4):
            cin, cout, alt_groups = CHANNELS[(i + j) % len(CHANNELS)]
            stride = 1 if padding == "same" else STRIDES[(i + j) % 4]
            cfg = Cfg(cin, cout, kernel, stride, padding, DILATIONS[(i + 2 * j) % 4], mode, (i + j) % 2 == 0,
                      alt_groups if j % 2 == 1 else 1)
            if _valid(cfg):
                out.append(cfg)
    return out


CONFIGS = _configs()


def test_oracle_covers_enough_configurations() -> None:
    assert len(CONFIGS) >= 300
    assert {c.mode for c in CONFIGS} == set(MODES)
    assert {c.kernel for c in CONFIGS} == set(KERNELS)
    assert {str(c.padding) for c in CONFIGS} == {str(p) for p in PADDINGS}
    assert {c.groups > 1 for c in CONFIGS} == {True, False}
    assert {c.bias for c in CONFIGS} == {True, False}
    assert any(c.cin % 2 and c.cout % 2 for c in CONFIGS)
    assert any(c.kernel[0] % 2 == 0 and c.padding == "same" and c.dilation != 1 for c in CONFIGS)


# ------------------------------------------------------------------ independent reference maths (no fxrewrite)


def densify(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(O, I/groups, kh, kw) -> (O, I, kh, kw), zeros outside each group's block."""
    o, ig, kh, kw = weight.shape
    dense = weight.new_zeros(o, ig * groups, kh, kw)
    ob = o // groups
    for b in range(groups):
        dense[b * ob:(b + 1) * ob, b * ig:(b + 1) * ig] = weight[b * ob:(b + 1) * ob]
    return dense


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The dense (O, I, kh, kw) weight computed by Sequential(spatial conv, pointwise 1x1 conv)."""
    spatial, pointwise = module[0], module[1]
    assert pointwise.kernel_size == (1, 1)
    s = densify(spatial.weight.detach().double(), spatial.groups)
    p = densify(pointwise.weight.detach().double(), pointwise.groups)[:, :, 0, 0]
    return torch.einsum("om,mikl->oikl", p, s)


def predicted_error(weight: torch.Tensor, source_groups: int, groups: int, rank: int) -> float:
    """sqrt(discarded / total squared singular values) of the per-input-group matrices, from the dense weight."""
    dense = densify(weight.detach().double(), source_groups)
    o, i = dense.shape[:2]
    c, ob = i // groups, o // source_groups
    discarded = total = 0.0
    for grp in range(groups):
        block = (grp * c) // (i // source_groups)  # the source block this input group belongs to
        a = dense[block * ob:(block + 1) * ob, grp * c:(grp + 1) * c].reshape(ob, -1)
        s = torch.linalg.svdvals(a)
        discarded += float(s[rank:].square().sum())
        total += float(s.square().sum())
    return math.sqrt(discarded / total)


def dense_conv(cfg: Cfg, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    conv = nn.Conv2d(cfg.cin, cfg.cout, cfg.kernel, cfg.stride, cfg.padding, cfg.dilation, 1, bias is not None,
                     padding_mode=cfg.mode, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


# ------------------------------------------------------------------------------------------------- the oracle


def _rewrite(conv: nn.Module, x: torch.Tensor, passes: str) -> tuple[torch.fx.GraphModule, fxrewrite.SiteRecord]:
    result = fxrewrite.rewrite(nn.Sequential(conv), (x,), passes=passes, verify=False)  # the oracle verifies
    (record,) = result.report.records
    assert record.status == "rewritten", record
    return result.module, record


def _input(cfg: Cfg, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, cfg.cin, H, W, dtype=dtype)


def _separable_groups(cfg: Cfg) -> int | None:
    """The smallest group count for grouped-separable: a multiple of the source groups, above it, dividing I."""
    return next((g for g in range(cfg.groups + 1, cfg.cin + 1) if cfg.cin % g == 0 and g % cfg.groups == 0), None)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_depthwise_separable_exact(cfg: Cfg) -> None:
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        conv = cfg.conv(dtype)
        x = _input(cfg, dtype)
        module, record = _rewrite(conv, x, "depthwise-separable{rank=exact}")
        dw, pw = module.get_submodule("0")
        multiplier = min(cfg.cout // cfg.groups, math.prod(cfg.kernel))
        assert (dw.groups, dw.in_channels, dw.out_channels) == (cfg.cin, cfg.cin, cfg.cin * multiplier)
        assert (pw.kernel_size, pw.groups, pw.bias is not None, dw.bias) == ((1, 1), cfg.groups, cfg.bias, None)
        assert record.exact is True and record.rel_error == pytest.approx(0.0, abs=1e-6)
        torch.testing.assert_close(module(x), conv(x))


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if _separable_groups(c) is not None], ids=str)
def test_grouped_separable_exact(cfg: Cfg) -> None:
    g = _separable_groups(cfg)
    assert g is not None
    torch.manual_seed(1)
    conv = cfg.conv()
    x = _input(cfg, torch.float64)
    module, record = _rewrite(conv, x, f"grouped-separable{{groups={g}, rank=exact}}")
    spatial = module.get_submodule("0")[0]
    assert spatial.groups == g and record.exact is True
    assert record.details["rank"] == min(cfg.cout // cfg.groups, cfg.cin // g * math.prod(cfg.kernel))
    torch.testing.assert_close(module(x), conv(x))


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_truncated_rank_error_is_the_discarded_singular_values(cfg: Cfg) -> None:
    torch.manual_seed(2)
    conv = cfg.conv()
    weight = conv.weight.detach()
    x = _input(cfg, torch.float64)
    cases = [("depthwise-separable{rank=1}", cfg.cin, 1)]
    g = _separable_groups(cfg)
    if g is not None:
        full = min(cfg.cout // cfg.groups, cfg.cin // g * math.prod(cfg.kernel))
        cases.append((f"grouped-separable{{groups={g}, rank={max(1, full // 2)}}}", g, max(1, full // 2)))
    for passes, groups, rank in cases:
        module, record = _rewrite(conv, x, passes)
        w_new = effective_weight(module.get_submodule("0"))
        direct = float(torch.linalg.vector_norm(densify(weight, cfg.groups) - w_new) / torch.linalg.vector_norm(weight))
        predicted = predicted_error(weight, cfg.groups, groups, rank)
        assert record.rel_error == pytest.approx(direct, rel=1e-9, abs=1e-12), passes
        assert record.rel_error == pytest.approx(predicted, rel=1e-9, abs=1e-12), passes
        assert record.exact is (predicted == 0.0)
        # the module computes exactly the conv with W': its output error is the conv of (W - W')
        torch.testing.assert_close(module(x), dense_conv(cfg, w_new, conv.bias)(x))


def test_depthwise_source_is_left_alone_with_its_reason() -> None:
    conv = nn.Conv2d(6, 6, 3, groups=6)
    result = fxrewrite.rewrite(nn.Sequential(conv), (torch.randn(1, 6, H, W),),
                               passes="depthwise-separable{rank=exact},grouped-separable{groups=3},grouped{groups=3}")
    assert [(r.status, r.code) for r in result.report.records] == [("skipped", "already-depthwise")] * 3
    assert isinstance(result.module.get_submodule("0"), nn.Conv2d)


def test_block_diagonal_weight_converts_exactly() -> None:
    torch.manual_seed(3)
    for groups, source_groups in ((2, 1), (4, 1), (4, 2)):
        grouped = nn.Conv2d(8, 12, (3, 1), padding=(1, 0), groups=groups, dtype=torch.float64)
        conv = nn.Conv2d(8, 12, (3, 1), padding=(1, 0), groups=source_groups, dtype=torch.float64)
        with torch.no_grad():
            dense = densify(grouped.weight, groups)
            conv.weight.copy_(torch.cat([dense[b * 12 // source_groups:(b + 1) * 12 // source_groups,
                                               b * 8 // source_groups:(b + 1) * 8 // source_groups]
                                         for b in range(source_groups)]))
            conv.bias.copy_(grouped.bias)
        x = torch.randn(2, 8, H, W, dtype=torch.float64)
        torch.testing.assert_close(conv(x), grouped(x))  # the fixture really is block-diagonal
        result = fxrewrite.rewrite(nn.Sequential(conv), (x,), passes=f"grouped{{groups={groups}}}")
        (record,) = result.report.records
        new = result.module.get_submodule("0")
        assert (record.status, record.exact, record.rel_error, record.details["kept_energy"]) == (
            "rewritten", True, 0.0, 1.0)
        assert new.groups == groups
        torch.testing.assert_close(new.weight, grouped.weight)
        torch.testing.assert_close(result.module(x), conv(x))


def test_grouped_records_kept_energy_of_a_dense_weight() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 4, 3, dtype=torch.float64)
    result = fxrewrite.rewrite(nn.Sequential(conv), (torch.randn(1, 8, H, W, dtype=torch.float64),),
                               passes="grouped{groups=2}")
    (record,) = result.report.records
    w = conv.weight.detach()
    kept = float(w[:2, :4].square().sum() + w[2:, 4:].square().sum()) / float(w.square().sum())
    assert record.details["kept_energy"] == pytest.approx(kept, rel=1e-12)
    assert record.rel_error == pytest.approx(math.sqrt(1 - kept), rel=1e-12)
    assert record.exact is False
    torch.testing.assert_close(result.module.get_submodule("0").weight, torch.cat([w[:2, :4], w[2:, 4:]]))
