"""The passes as passes: grouped, channel shuffle, records, idempotence, pipelines, torch's PassManager, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager as TorchPassManager
from torch.utils.flop_counter import FlopCounterMode

import fxrewrite
from fxrewrite.errors import ConfigError, PassFailure
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.maths import factorize
from fxrewrite.measure.cost import model_cost
from fxrewrite.passes import (
    ChannelShuffle,
    DepthwiseSeparable,
    Grouped,
    GroupedSeparable,
    PassManager,
    channel_shuffle,
    parse_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_thread")



def reference_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's own formulation (torchvision.models.shufflenetv2.channel_shuffle)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


def densify(weight: torch.Tensor, groups: int) -> torch.Tensor:
    o, ig = weight.shape[:2]
    ob = o // groups
    dense = weight.new_zeros(o, ig * groups, *weight.shape[2:])
    for b in range(groups):
        dense[b * ob:(b + 1) * ob, b * ig:(b + 1) * ig] = weight[b * ob:(b + 1) * ob]
    return dense


def block_of(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The (O, I/groups, kh, kw) weight of the block diagonal of a dense weight."""
    o, i = dense.shape[:2]
    return torch.cat([dense[b * o // groups:(b + 1) * o // groups, b * i // groups:(b + 1) * i // groups]
                      for b in range(groups)])


class ShuffleBlock(nn.Module):
    """ShuffleNet v1 unit without the residual: GConv1x1 -> BN -> ReLU -> DW3x3 -> BN -> GConv1x1, plus a dense
    1x1 head fed by the second grouped conv through a ReLU."""

    def __init__(self, c: int = 12, g1: int = 3, g2: int = 4) -> None:
        super().__init__()
        self.gconv1 = nn.Conv2d(c, c, 1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.gconv2 = nn.Conv2d(c, 2 * c, 1, groups=g2)
        self.head = nn.Conv2d(2 * c, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.dw(torch.relu(self.bn1(self.gconv1(x)))))
        return self.head(torch.relu(self.gconv2(y)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_mean, -1, 1)
            nn.init.uniform_(m.running_var, 0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 2)
            nn.init.uniform_(m.bias, -1, 1)
    return model


def _block() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _randomize_bn(ShuffleBlock()).double().eval(), torch.randn(2, 12, 5, 6, dtype=torch.float64)


def _shuffle_nodes(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """Inserted shuffle chains by the site that asked for them."""
    out: dict[str, list[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        meta = n.meta.get("fxrewrite")
        if meta and meta["pass"] == "channel-shuffle":
            out.setdefault(meta["site"], []).append(n)
    return out


# ------------------------------------------------------------------------------------------------ channel shuffle


def test_channel_shuffle_function_matches_shufflenet() -> None:
    x = torch.randn(2, 12, 3, 4)
    for g in (2, 3, 4, 6):
        torch.testing.assert_close(channel_shuffle(x, g), reference_shuffle(x, g), rtol=0, atol=0)
        torch.testing.assert_close(channel_shuffle(x[0], g), reference_shuffle(x, g)[0], rtol=0, atol=0)


def _expected_consumer_weight(weight: torch.Tensor, groups: int, shuffle_groups: int) -> torch.Tensor:
    """W' with W'(shuffle(x)) = W(x) where representable: columns permuted, then the consumer's block diagonal."""
    dense = densify(weight, groups)
    perm = reference_shuffle(torch.arange(dense.shape[1], dtype=torch.float64).view(1, -1, 1, 1),
                             shuffle_groups).flatten().long()
    return block_of(dense[:, perm], groups)


@pytest.mark.parametrize("fold", [True, False])
def test_shufflenet_rule_on_a_shufflenet_unit(fold: bool) -> None:
    model, x = _block()
    result = fxrewrite.rewrite(model, (x,), passes=f"channel-shuffle{{fold={str(fold).lower()}}}", verify=False)
    records = {r.site: r for r in result.report.records}
    # dw: channel-wise, skipped; gconv2: fed by gconv1 through bn/relu/dw/bn -> op; head: dense -> not the rule
    assert (records["dw"].status, records["dw"].code) == ("skipped", "depthwise-consumer")
    assert (records["head"].status, records["head"].code) == ("skipped", "dense-consumer")
    rec = records["gconv2"]
    assert (rec.status, rec.details["shuffle"], rec.details["shuffle_groups"]) == ("rewritten", "op", 3)
    assert (rec.details["producer"], rec.details["through"]) == ("gconv1", ["dw"])
    assert set(records) == {"dw", "gconv2", "head"}
    # the graph has exactly one shuffle, as plain tensor methods in front of gconv2
    shuffles = _shuffle_nodes(result.module)
    assert list(shuffles) == ["gconv2"]
    assert [n.target for n in shuffles["gconv2"]] == ["unflatten", "transpose", "flatten"]
    gconv2_node = next(n for n in result.module.graph.nodes if n.target == "gconv2")
    assert gconv2_node.args[0] is shuffles["gconv2"][-1]
    # compensation: gconv2 keeps the block diagonal of its shuffled-back weight; the lost energy is reported
    w = model.gconv2.weight.detach()
    expected = _expected_consumer_weight(w, 4, 3)
    torch.testing.assert_close(result.module.gconv2.weight, expected, rtol=0, atol=0)
    lost = 1 - float(expected.square().sum() / w.square().sum())
    assert rec.rel_error == pytest.approx(math.sqrt(lost), rel=1e-12) and rec.exact is False
    # the rewritten function is exactly: original up to gconv2's input, shuffle, the compensated gconv2, rest
    ref = _manual_forward(model, x, {"gconv2": (3, expected)})
    torch.testing.assert_close(result.module(x), ref)
    result.module.graph.lint()


def _manual_forward(model: ShuffleBlock, x: torch.Tensor,
                    shuffled: dict[str, tuple[int, torch.Tensor]]) -> torch.Tensor:
    """ShuffleBlock.forward where each named conv gets shuffle(input, g) and the given weight."""

    def conv(name: str, inp: torch.Tensor) -> torch.Tensor:
        m = getattr(model, name)
        if name not in shuffled:
            return m(inp)
        g, weight = shuffled[name]
        return nn.functional.conv2d(reference_shuffle(inp, g), weight, m.bias, groups=m.groups)

    y = model.bn2(conv("dw", torch.relu(model.bn1(conv("gconv1", x)))))
    return conv("head", torch.relu(conv("gconv2", y)))


def test_rule_all_folds_into_a_dense_consumer() -> None:
    model, x = _block()
    result = fxrewrite.rewrite(model, (x,), passes="channel-shuffle{rule=all}", verify=False)
    records = {r.site: r for r in result.report.records}
    head = records["head"]
    # head is fed by gconv2 (4 groups); folded: no op, exact, its weight unchanged
    assert (head.code, head.details["shuffle"], head.details["shuffle_groups"], head.rel_error, head.exact) == (
        "folded", "folded", 4, 0.0, True)
    assert records["gconv2"].details["shuffle"] == "op"
    assert list(_shuffle_nodes(result.module)) == ["gconv2"]
    torch.testing.assert_close(result.module.head.weight, model.head.weight, rtol=0, atol=0)


def test_rule_all_without_fold_keeps_an_exact_op() -> None:
    model, x = _block()
    result = fxrewrite.rewrite(model, (x,), passes="channel-shuffle{rule=all, fold=false}", verify=False)
    records = {r.site: r for r in result.report.records}
    head = records["head"]
    assert (head.status, head.details["shuffle"], head.rel_error, head.exact) == ("rewritten", "op", 0.0, True)
    assert sorted(_shuffle_nodes(result.module)) == ["gconv2", "head"]
    # head: input channels permuted so the shuffle and the new weight cancel exactly
    w_head = _expected_consumer_weight(model.head.weight.detach(), 1, 4)
    torch.testing.assert_close(result.module.head.weight, w_head, rtol=0, atol=0)
    expected_g2 = _expected_consumer_weight(model.gconv2.weight.detach(), 4, 3)
    ref = _manual_forward(model, x, {"gconv2": (3, expected_g2), "head": (4, w_head)})
    torch.testing.assert_close(result.module(x), ref)
    # a shuffle with its fold is exact: only the gconv2 op changes the function
    only_g2 = _manual_forward(model, x, {"gconv2": (3, expected_g2)})
    torch.testing.assert_close(result.module(x), only_g2)


def test_shuffle_before_a_dense_conv_with_its_fold_is_exact() -> None:
    torch.manual_seed(1)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.BatchNorm2d(8), nn.ReLU6(),
                                        nn.Conv2d(8, 6, (1, 3)))).double().eval()
    x = torch.randn(2, 8, 6, 7, dtype=torch.float64)
    for fold, ops in ((True, 0), (False, 3)):
        result = fxrewrite.rewrite(model, (x,), passes=f"channel-shuffle{{rule=all, fold={fold}}}", verify=False)
        (rec,) = result.report.records
        assert (rec.site, rec.exact, rec.rel_error) == ("3", True, 0.0)
        assert sum(len(v) for v in _shuffle_nodes(result.module).values()) == ops
        torch.testing.assert_close(result.module(x), model(x))


def test_consumers_of_one_tensor_share_one_shuffle() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Conv2d(8, 8, 1, groups=4)
            self.a = nn.Conv2d(8, 4, 1, groups=2)
            self.b = nn.Conv2d(8, 4, 3, groups=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.g(x))
            return self.a(y).sum() + self.b(y).sum() + y.sum()

    result = fxrewrite.rewrite(TwoHeads(), (torch.randn(1, 8, 5, 5),), passes="channel-shuffle", verify=False)
    assert [r.details["shuffle"] for r in result.report.records] == ["op", "op"]
    shuffles = [n for n in result.module.graph.nodes if n.op == "call_method" and n.target == "unflatten"]
    assert len(shuffles) == 1
    transpose = next(iter(shuffles[0].users))
    flat = next(iter(transpose.users))
    assert flat.target == "flatten" and {u.target for u in flat.users} == {"a", "b"}
    relu = shuffles[0].args[0]
    assert len(relu.users) == 2  # the shuffle, and the plain sum that must keep the unshuffled tensor


def test_shufflenet_v2_has_no_shuffle_sites_and_accepts_a_pipeline() -> None:
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5().eval()
    x = torch.randn(1, 3, 64, 64)
    # its convs are dense 1x1 or depthwise: no grouped producer, nothing to do
    plain = fxrewrite.rewrite(model, (x,), passes="channel-shuffle{rule=all}", verify=False)
    assert plain.report.records == ()
    assert plain.module.code == trace(model).code
    # grouping its 1x1 convs creates grouped producers: every 'op' record has its shuffle chain in the graph
    result = fxrewrite.rewrite(model, (x,), passes="grouped{groups=2},channel-shuffle{rule=all, fold=false}",
                               verify=False)
    ops = {r.site for r in result.report.records if r.pass_name == "channel-shuffle" and r.status == "rewritten"}
    assert ops and set(_shuffle_nodes(result.module)) == ops
    assert all(len(v) == 3 for v in _shuffle_nodes(result.module).values())
    assert result.module(x).shape == model(x).shape
    cost = model_cost(result.module)  # every node, shuffles included, carries shape metadata
    assert cost.macs == result.report.context["model_macs_after"]


# ------------------------------------------------------------------------------------------------------ grouped


def test_grouped_skip_reasons_and_already_grouped_conv() -> None:
    model = nn.Sequential(nn.Conv2d(6, 9, 3), nn.Conv2d(9, 8, 3, groups=1), nn.Conv2d(8, 8, 3, groups=2),
                          nn.Conv2d(8, 8, 3, groups=8))
    result = fxrewrite.rewrite(model, (torch.randn(1, 6, 12, 12),), passes="grouped{groups=4}", verify=False)
    codes = [(r.site, r.status, r.code) for r in result.report.records]
    assert codes == [("0", "skipped", "channels-not-divisible"), ("1", "skipped", "channels-not-divisible"),
                     ("2", "rewritten", None), ("3", "skipped", "already-depthwise")]
    assert result.module.get_submodule("2").groups == 4  # groups=2 -> 4 keeps the block diagonal


def test_grouped_random_init_is_fresh() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3)
    result = fxrewrite.rewrite(nn.Sequential(conv), (torch.randn(1, 8, 6, 6),), passes="grouped{init=random}",
                               verify=False)
    (rec,) = result.report.records
    new = result.module.get_submodule("0")
    assert (rec.rel_error, rec.exact, new.groups) == (None, False, 4)
    block = factorize.block_diagonal(conv.weight.detach(), groups=4).weight
    assert not torch.equal(new.weight, block) and not torch.equal(new.bias, conv.bias)


def test_records_costs_are_the_conv_formulas() -> None:
    conv = nn.Conv2d(6, 10, (3, 5), stride=2, padding=(1, 2))
    x = torch.randn(3, 6, 11, 13)
    ho, wo = conv(x).shape[-2:]
    pixels = 3 * ho * wo
    for passes, params_after, macs_after in (
        ("depthwise-separable{rank=2}", 6 * 2 * 15 + 10 * 12 + 10, pixels * (12 * 15 + 10 * 12)),
        ("grouped-separable{groups=3, rank=4}", 12 * 2 * 15 + 10 * 12 + 10, pixels * (12 * 2 * 15 + 10 * 12)),
        ("grouped{groups=2}", 10 * 3 * 15 + 10, pixels * 10 * 3 * 15),
    ):
        result = fxrewrite.rewrite(nn.Sequential(conv), (x,), passes=passes, verify=False)
        (rec,) = result.report.records
        assert (rec.params_before, rec.macs_before) == (10 * 6 * 15 + 10, pixels * 10 * 6 * 15)
        assert (rec.params_after, rec.macs_after) == (params_after, macs_after), passes
        assert rec.pass_name == passes.split("{")[0]
        assert dict(rec.options) == parse_pipeline(passes)[0].options()
        assert model_cost(result.module).macs == macs_after
        assert model_cost(result.module).params == params_after


@pytest.mark.parametrize("passes", ["depthwise-separable{rank=2}", "grouped-separable{groups=3, rank=4}",
                                    "grouped{groups=2}", "depthwise-bottleneck{rank=4, max_iter=1}",
                                    "grouped-bottleneck{groups=2, rank=4, max_iter=1}"])
def test_record_costs_of_a_strided_site_equal_flop_counter_mode(passes: str) -> None:
    """Each conv of a replacement is counted at the resolution it runs at: a bottleneck's first 1x1 sees the
    11 x 13 input of this stride-2 site, the strided kxk and the rest its 6 x 7 output."""
    model = nn.Sequential(nn.Conv2d(6, 10, (3, 5), stride=2, padding=(1, 2)))
    x = torch.randn(3, 6, 11, 13)
    (planned,) = fxrewrite.plan(model, (x,), passes=passes).records
    result = fxrewrite.rewrite(model, (x,), passes=passes, verify=False)
    (rec,) = result.report.records
    replacement = result.module.get_submodule("0")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        replacement(x)
    assert counter.get_total_flops() % 2 == 0
    assert planned.macs_after == rec.macs_after == counter.get_total_flops() // 2 == model_cost(result.module).macs
    assert planned.params_after == rec.params_after == sum(p.numel() for p in replacement.parameters())
    if "bottleneck" in passes:  # 1x1 6 -> 4 at 11 x 13, kxk 4 -> 4 at 6 x 7, 1x1 4 -> 10 at 6 x 7
        groups = 2 if passes.startswith("grouped") else 4
        assert rec.macs_after == 3 * (11 * 13 * 4 * 6 + 6 * 7 * 4 * (4 // groups) * 15 + 6 * 7 * 10 * 4)


def test_rank_too_large_and_pointwise_kernels_are_skipped_with_reasons() -> None:
    model = nn.Sequential(nn.Conv2d(4, 3, 3), nn.Conv2d(3, 8, 1))
    result = fxrewrite.rewrite(model, (torch.randn(1, 4, 8, 8),), passes="depthwise-separable{rank=4}", verify=False)
    assert [(r.site, r.code) for r in result.report.records] == [("0", "rank-too-large"), ("1", "pointwise-kernel")]
    assert "exact rank 3" in result.report.records[0].reason


def test_separable_random_init_keeps_the_structure() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    result = fxrewrite.rewrite(nn.Sequential(conv), (torch.randn(1, 4, 7, 7),),
                               passes="depthwise-separable{rank=exact, init=random}", verify=False)
    (rec,) = result.report.records
    dw, pw = result.module.get_submodule("0")
    assert (rec.rel_error, rec.exact, dw.out_channels, pw.in_channels) == (None, False, 4 * 6, 4 * 6)
    assert not torch.equal(pw.bias, conv.bias)


def test_functional_conv_site_is_rewritten_exactly() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4, 3, 3, dtype=torch.float64))
            self.b = nn.Parameter(torch.randn(6, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.conv2d(x, self.w, self.b, stride=2, padding=1)

    model = Functional()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact}", verify=False)
    assert [r.status for r in result.report.records] == ["rewritten"]
    assert not hasattr(result.module, "w")  # the constant weight was dropped with the call
    torch.testing.assert_close(result.module(x), model(x))


# ------------------------------------------------------------------------------- idempotence, pipelines, plan


def _fixture() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(16, 8, (1, 3)))
    return _randomize_bn(model).double().eval(), torch.randn(2, 8, 6, 7, dtype=torch.float64)


@pytest.mark.parametrize("spec", ["depthwise-separable{rank=1}", "depthwise-separable{rank=exact}",
                                  "grouped-separable{groups=4, rank=2}", "grouped{groups=4}",
                                  "grouped{groups=2},channel-shuffle{rule=all}",
                                  "grouped{groups=2},channel-shuffle{rule=all, fold=false}",
                                  "grouped{groups=2},channel-shuffle"])
def test_running_a_pass_twice_changes_nothing_the_second_time(spec: str) -> None:
    model, x = _fixture()
    gm = trace(model)
    propagate_shapes(gm, (x,))
    first = PassManager(parse_pipeline(spec))(gm)
    assert first.modified
    code, state = first.graph_module.code, {k: v.clone() for k, v in first.graph_module.state_dict().items()}
    for p in parse_pipeline(spec):
        second = p(first.graph_module)
        assert second.modified is False, p.spec()
        assert all(r.status == "skipped" for r in second.records)
    assert first.graph_module.code == code
    assert all(torch.equal(v, state[k]) for k, v in first.graph_module.state_dict().items())
    # through the API as well: rewriting the result again rewrites nothing
    again = fxrewrite.rewrite(first.graph_module, (x,), passes=spec, verify=False)
    assert not any(r.status == "rewritten" for r in again.report.records)


def test_pipeline_of_several_passes() -> None:
    model, x = _fixture()
    grouped = fxrewrite.rewrite(model, (x,), passes="grouped{groups=2}", verify=False)
    both = fxrewrite.rewrite(model, (x,), passes="grouped{groups=2},depthwise-separable{rank=exact}", verify=False)
    assert [(r.pass_name, r.site, r.status) for r in both.report.records] == [
        ("grouped", "0", "rewritten"), ("grouped", "3", "skipped"), ("grouped", "5", "rewritten"),
        ("depthwise-separable", "0", "rewritten"), ("depthwise-separable", "3", "rewritten"),
        ("depthwise-separable", "5", "rewritten")]
    assert both.report.records[1].code == "already-grouped"
    # the second pass decomposes the already-grouped convs exactly: same function as after the first pass
    assert isinstance(both.module.get_submodule("0"), nn.Sequential) and both.module.get_submodule("0.1").groups == 2
    torch.testing.assert_close(both.module(x), grouped.module(x))
    # later passes see the sites earlier ones created: pointwise 1x1 convs of a dw-sep become grouped
    chain = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=2},grouped{groups=4}", verify=False)
    grouped_sites = [r.site for r in chain.report.records if r.pass_name == "grouped" and r.status == "rewritten"]
    assert grouped_sites == ["0.1", "3.1", "5.1"]
    assert chain.module.get_submodule("3.1").groups == 4  # the pointwise of a groups=2 conv: 2 -> 4


@pytest.mark.parametrize("spec", ["depthwise-separable{rank=2}", "grouped{groups=4}",
                                  "channel-shuffle{rule=all, fold=false}"])
def test_plan_changes_nothing_and_agrees_with_run(spec: str) -> None:
    model, x = _fixture()
    gm = trace(model)
    propagate_shapes(gm, (x,))
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    planned = PassManager(parse_pipeline(spec)).plan(gm)
    assert gm.code == code and all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    run = PassManager(parse_pipeline(spec))(gm)
    assert [(r.site, r.pass_name, r.code, r.params_after, r.macs_after, r.rel_error) for r in planned] == [
        (r.site, r.pass_name, r.code, r.params_after, r.macs_after, r.rel_error) for r in run.records]
    assert [r.status for r in planned] == [{"rewritten": "planned"}.get(r.status, r.status) for r in run.records]
    assert any(r.status == "planned" for r in planned)


def test_pass_result_works_with_torch_pass_manager() -> None:
    model, x = _fixture()
    gm = trace(model)
    propagate_shapes(gm, (x,))
    torch_pm = TorchPassManager(passes=[DepthwiseSeparable(rank="exact"), Grouped(groups=2)],
                                run_checks_after_each_pass=True)
    result = torch_pm(gm)
    assert result.modified is True
    assert isinstance(result.graph_module.get_submodule("0"), nn.Sequential)
    assert result.graph_module.get_submodule("0.1").groups == 2
    assert torch_pm(result.graph_module).modified is False


def test_option_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="groups must be an integer >= 2"):
        parse_pipeline("grouped{groups=1}")
    with pytest.raises(ConfigError, match="unknown option 'rnak'"):
        parse_pipeline("depthwise-separable{rnak=2}")
    with pytest.raises(ConfigError, match="rank must be a positive integer or 'exact'"):
        DepthwiseSeparable(rank=0)
    with pytest.raises(ConfigError, match="rule must be"):
        ChannelShuffle(rule="sometimes")
    with pytest.raises(ConfigError, match="init must be one of"):
        GroupedSeparable(init="zeros")


def test_errors_are_wrapped_with_pass_and_site(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("svd did not converge")

    monkeypatch.setattr(factorize, "grouped_separable", broken)
    with pytest.raises(PassFailure, match=r"pass 'depthwise-separable' failed at site '0': RuntimeError: svd did "
                                          r"not converge") as info:
        fxrewrite.rewrite(model, (torch.randn(1, 4, 8, 8),), passes="depthwise-separable{rank=1}", verify=False)
    assert isinstance(info.value.__cause__, RuntimeError)
    monkeypatch.undo()

    def broken_rewriter(*args: object, **kwargs: object) -> None:
        raise KeyError("node vanished")

    monkeypatch.setattr("fxrewrite.passes.conv_rewrite.replace_conv", broken_rewriter)
    with pytest.raises(PassFailure, match=r"pass 'grouped' failed at site '0': KeyError"):
        fxrewrite.rewrite(model, (torch.randn(1, 4, 8, 8),), passes="grouped{groups=2}", verify=False)
