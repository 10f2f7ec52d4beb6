"""Tests for fxrewrite.graph.sites: which convolutions are sites, their specs, shapes and eligibility reason codes."""

from __future__ import annotations

import models
import pytest
import torch
from models import CAPTURE, EXPECTED, ZOO, example_input
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.graph.sites import (
    DROP_HOOKS_KEY,
    REWRITE_KINDS,
    ConvSpec,
    Reason,
    check_groups,
    dropping_hooks,
    find_sites,
    hidden_convs,
)


def sites_of(model: nn.Module, size: int = 16, **capture: object) -> list:
    gm = trace(model, **capture)  # type: ignore[arg-type]
    propagate_shapes(gm, (example_input(model, size),))
    return find_sites(gm)


def kinds(site) -> dict[str, str | None]:
    return {k: (r.code if r is not None else None) for k, r in site.eligibility}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_zoo_sites_and_blockers(key: str, seeded: None) -> None:
    sites = sites_of(ZOO[key](), **CAPTURE.get(key, {}))
    assert tuple((s.name, s.blocker.code if s.blocker else None) for s in sites) == EXPECTED[key]
    for s in sites:  # a blocker applies to every rewrite kind, with the same reason
        if s.blocker is not None:
            assert all(r == s.blocker for _, r in s.eligibility)
            assert s.blocker.text  # a sentence for people, not only a code


# Per site and rewrite kind, derived from the definitions in tests/models.py (channel counts, kernel, groups).
KIND_CODES = {
    ("plain", "conv1"): ("yes", "yes", "channels-not-divisible"),  # 3 input channels: no g > 1 divides 3
    ("plain", "conv2"): ("yes", "yes", "yes"),
    ("plain", "dw"): ("already-depthwise",) * 3,
    # 1x1: a depthwise 1x1 + 1x1 split always costs more; a grouped 1x1 + 1x1 split at rank 1 saves (32 + 8 < 256)
    ("plain", "pw"): ("pointwise-kernel", "yes", "yes"),
    ("residual", "shortcut"): ("pointwise-kernel", "yes", "yes"),
    ("residual", "grouped"): ("yes", "yes", "yes"),  # groups=4 of 32: 8, 16, 32 remain possible
    # one input channel: a rank-r split of the 8 x 9 filter bank costs r*(9 + 8) < 72 at r <= 4; no group count
    ("grouped", "single"): ("yes", "yes", "channels-not-divisible"),
    ("grouped", "g4"): ("yes", "yes", "already-grouped"),  # 8 -> 12, groups 4: no multiple of 4 divides both
    # depthwise with multiplier 2: a per-channel split would save (9 + 2 < 18) but the separable passes do not split
    # depthwise convs (their own kxk conv is one), and the message says so
    ("grouped", "dw2"): ("already-depthwise",) * 3,
    ("grouped", "g4_wide"): ("yes", "yes", "yes"),
    ("odd", "conv1"): ("yes", "yes", "channels-not-divisible"),
    ("odd", "conv2"): ("yes", "yes", "channels-not-divisible"),
    ("odd", "conv3"): ("yes", "yes", "channels-not-divisible"),
    ("functional", "conv2d_1"): ("pointwise-kernel", "yes", "yes"),
}


@pytest.mark.parametrize(("key", "name"), sorted(KIND_CODES))
def test_kind_eligibility_codes(key: str, name: str, seeded: None) -> None:
    site = next(s for s in sites_of(ZOO[key]()) if s.name == name)
    got = tuple("yes" if site.reason_for(k) is None else site.reason_for(k).code for k in REWRITE_KINDS)
    assert got == KIND_CODES[(key, name)]


def test_already_grouped_reason_names_the_valid_group_counts(seeded: None) -> None:
    site = next(s for s in sites_of(models.Residual()) if s.name == "grouped")  # 32 -> 32, groups=4
    why = check_groups(site, 4, out_divisible=True)
    assert why is not None and why.code == "already-grouped"
    larger = [g for g in range(5, 33) if 32 % g == 0 and g % 4 == 0]  # [8, 16, 32]
    assert str(larger) in why.text
    bad = check_groups(site, 6, out_divisible=True)
    assert bad is not None and bad.code == "groups-incompatible"
    assert check_groups(site, 8, out_divisible=True) is None
    g4 = next(s for s in sites_of(models.GroupedConvs()) if s.name == "g4")
    assert "4 is the only valid group count" in g4.reason_for("grouped").text


def test_channels_not_divisible_lists_valid_group_counts(seeded: None) -> None:
    site = next(s for s in sites_of(models.Plain()) if s.name == "conv2")  # 16 -> 32
    why = check_groups(site, 3, out_divisible=True)
    assert why is not None and why.code == "channels-not-divisible"
    valid = [g for g in range(2, 17) if 16 % g == 0 and 32 % g == 0]
    assert f"valid group counts: {valid}" in why.text
    # a grouped-separable split only needs g | in_channels
    assert check_groups(site, 8, out_divisible=False) is None


def test_specs_match_the_module_definitions(seeded: None) -> None:
    by_name = {s.name: s for s in sites_of(models.OddChannels())}
    assert by_name["conv2"].spec == ConvSpec(7, 11, (3, 3), (1, 1), (1, 2), (1, 2), 1, True, "reflect")
    assert by_name["conv3"].spec == ConvSpec(11, 5, (1, 3), (1, 1), "valid", (1, 1), 1, True, "zeros")
    plain = {s.name: s for s in sites_of(models.Plain())}
    assert plain["conv1"].spec.bias is False
    assert plain["conv2"].spec.stride == (2, 2)
    assert plain["dw"].spec.padding == "same" and plain["dw"].spec.groups == 32


def test_functional_specs_come_from_the_constant_weights(seeded: None) -> None:
    model = models.FunctionalConv()
    by_name = {s.name: s for s in sites_of(model)}
    first = by_name["conv2d"]
    assert first.kind == "function"
    assert first.spec == ConvSpec(4, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "zeros")
    assert by_name["conv2d_1"].spec.bias is False and by_name["conv2d_1"].spec.kernel_size == (1, 1)
    assert by_name["conv2d_2"].spec.padding == "same"


def real_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Input/output shapes of every Conv2d call, from forward hooks on a real run (independent of fxrewrite)."""
    shapes: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: shapes.setdefault(n, []).append(
        (tuple(args[0].shape), tuple(out.shape)))) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


@pytest.mark.parametrize("key", ["plain", "residual", "grouped", "shared", "odd", "subclass", "not-conv2d"])
def test_shapes_match_a_real_forward(key: str, seeded: None) -> None:
    model = ZOO[key]().eval()
    x = example_input(model, 12)  # 12: stride-2 and 'valid' convs change the spatial size
    gm = trace(model)
    propagate_shapes(gm, (x,))
    expected = real_shapes(model, x)
    got: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for s in find_sites(gm):
        got.setdefault(s.name, []).append((s.input_shape, s.output_shape))
    assert got == expected


def test_macs_and_params_agree_with_independent_counts(seeded: None) -> None:
    model = models.GroupedConvs().eval()
    for s in sites_of(model, 10):
        conv = model.get_submodule(s.name)
        assert s.params == sum(p.numel() for p in conv.parameters())
        with FlopCounterMode(display=False) as fcm:
            conv(torch.empty(s.input_shape))
        assert s.macs == fcm.get_total_flops() // 2  # FlopCounterMode counts 2 FLOPs per multiply-add


def test_sites_without_shape_propagation_have_no_shapes(seeded: None) -> None:
    gm = trace(models.Plain())
    sites = find_sites(gm)
    assert [s.name for s in sites] == ["conv1", "conv2", "dw", "pw"]
    assert all(s.input_shape is None and s.output_shape is None and s.macs == 0 for s in sites)


def test_dtype_is_reported(seeded: None) -> None:
    model = models.Plain().double()
    gm = trace(model)
    propagate_shapes(gm, (example_input(model).double(),))
    assert {s.dtype for s in find_sites(gm)} == {"float64"}


def test_subclass_without_own_forward_is_still_not_plain(seeded: None) -> None:
    class Renamed(nn.Conv2d):
        """A subclass that adds nothing: still not exactly nn.Conv2d."""

    model = nn.Sequential(Renamed(3, 8, 3), models.SameConv(8, 8, 3))
    sites = sites_of(model)
    assert [(s.name, s.module_type, s.blocker.code) for s in sites] == [
        ("0", "Renamed", "conv-subclass"), ("1", "SameConv", "conv-subclass")]
    assert "not exactly nn.Conv2d" in sites[0].blocker.text
    assert "with its own forward" in sites[1].blocker.text


def test_conv_inside_a_leaf_module_is_not_a_site(seeded: None) -> None:
    model = models.Residual()
    names = [s.name for s in sites_of(model, leaf_modules=["body"])]
    assert names == ["stem", "shortcut", "grouped"]


def test_groups_incompatible_reason_names_the_channels(seeded: None) -> None:
    site = next(s for s in sites_of(models.Residual()) if s.name == "grouped")  # 32 -> 32, groups=4
    why = check_groups(site, 6, out_divisible=True)
    assert why == Reason("groups-incompatible", "grouped: groups=6 is not a multiple of the existing groups=4 "
                         "(in_channels=32, out_channels=32); valid: [4, 8, 16, 32].")


def test_hooked_convs_are_sites_only_while_dropping_hooks(seeded: None) -> None:
    model = models.HookedConv()
    model.hooked.register_forward_pre_hook(lambda m, args: None)
    gm = trace(model)
    propagate_shapes(gm, (example_input(model),))
    blocked = find_sites(gm)
    assert [(s.name, s.blocker.code if s.blocker else None, s.hooks) for s in blocked] == [
        ("hooked", "module-hooks", 2), ("plain", None, 0)]
    with dropping_hooks(gm):
        allowed = find_sites(gm)
    assert [(s.name, s.blocker, s.hooks) for s in allowed] == [("hooked", None, 2), ("plain", None, 0)]
    assert allowed[0].eligibility == allowed[1].eligibility  # both 3x3 convs: the same verdict per kind
    assert find_sites(gm) == blocked and DROP_HOOKS_KEY not in gm.meta  # only inside the block
    with dropping_hooks(gm, enabled=False):
        assert find_sites(gm) == blocked


def test_convs_the_traced_forward_never_calls_are_listed_against_the_original(seeded: None) -> None:
    model = models.FlagForward()
    gm = trace(model, concrete_args={"use_second": False})
    assert hidden_convs(gm) == []  # the trace keeps only the modules its graph uses
    listed = hidden_convs(gm, model)
    assert [(h.name, h.container, h.reason.code) for h in listed] == [("second", None, "not-visible")]
    assert "the traced module does not hold it" in listed[0].reason.text
    leaf = trace(models.SubmoduleDataDependent(), leaf_modules=["block"])
    assert [(h.name, h.container) for h in hidden_convs(leaf, models.SubmoduleDataDependent())] == [
        ("block.conv", "block")]  # held by the leaf module: listed once, with its container


def test_finding_sites_is_pure(seeded: None) -> None:
    """Nothing changes: not the code, not the buffers (spectral_norm's power iteration runs when .weight is read
    in training mode), not the parameters."""
    model = models.ParametrizedConv().train()
    gm = trace(model)
    propagate_shapes(gm, (example_input(model),))
    code = gm.code
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    for _ in range(2):
        find_sites(gm)
    assert gm.code == code
    after = gm.state_dict()
    assert state.keys() == after.keys()
    for k, v in state.items():
        assert torch.equal(v, after[k]), k


def test_model_that_is_a_conv_is_one_site(seeded: None) -> None:
    conv = nn.Conv2d(4, 8, 3, stride=2)
    sites = sites_of(conv)
    assert [(s.name, s.input_shape, s.output_shape) for s in sites] == [("conv", (2, 4, 16, 16), (2, 8, 7, 7))]


def test_remembered_sites_follow_every_graph_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside sites_remembered the answer is reused only for the same nodes and hooks state: after a pass replaced
    convs (new nodes) or with hooks dropped, find_sites answers as a fresh call does; rewrite() with one built-in
    pass finds the sites once (capture, validation and the pass), with two passes twice."""
    import fxrewrite
    import fxrewrite.graph.sites as sites_module
    from fxrewrite.graph.sites import sites_remembered
    from fxrewrite.passes import PassManager, parse_pipeline

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    model[2].register_forward_hook(lambda m, i, o: o)
    gm = trace(model)
    propagate_shapes(gm, (torch.randn(1, 3, 8, 8),))
    with sites_remembered():
        before = find_sites(gm)
        assert find_sites(gm) == before and before[1].blocker is not None  # the hooked conv is blocked
        with dropping_hooks(gm):
            assert find_sites(gm)[1].blocker is None
        assert find_sites(gm)[1].blocker is not None
        PassManager(parse_pipeline("depthwise-separable{rank=2}"))(gm)
        after = find_sites(gm)
    assert after == find_sites(gm) and [s.name for s in after] != [s.name for s in before]
    calls: list[int] = []
    real = sites_module._find_sites
    monkeypatch.setattr(sites_module, "_find_sites", lambda g: calls.append(1) or real(g))
    plain = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 4, 8, 8)
    assert fxrewrite.rewrite(plain, (x,), passes="depthwise-separable{rank=exact}").ok
    assert len(calls) == 1
    result = fxrewrite.rewrite(plain, (x,), passes="grouped{groups=2},depthwise-separable{rank=exact}")
    assert len(calls) == 3 and [r.status for r in result.report.records].count("rewritten") == 4
