"""Channel permutations for the grouped rewrite: the grouping search (fxrewrite.maths.permutation), the channel-coupling
graph (fxrewrite.graph.coupling), folding permutations into layers (rewriter.permute_channels) and
``grouped{permute=true}`` end to end."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torchvision
from torch import nn

import fxrewrite
from fxrewrite.errors import ConfigError
from fxrewrite.graph.capture import trace
from fxrewrite.graph.coupling import channel_coupling
from fxrewrite.graph.rewriter import permute_channels
from fxrewrite.graph.select import Rule
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.maths import factorize
from fxrewrite.maths.permutation import (
    Space,
    Term,
    assignment_permutation,
    balanced_assignment,
    best_grouping,
    energy_matrix,
    kept_fraction,
    natural_assignment,
    search,
)
from fxrewrite.passes import Grouped, parse_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")



def hidden_block_weight(out_ch: int, in_ch: int, groups: int, kernel: int = 3, *,
                        gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight that is block-diagonal after permuting outputs by ``p_out`` and inputs by ``p_in`` (returned)."""
    ob, ib = out_ch // groups, in_ch // groups
    block = torch.zeros(out_ch, in_ch, kernel, kernel, dtype=torch.float64)
    for b in range(groups):
        block[b * ob:(b + 1) * ob, b * ib:(b + 1) * ib] = torch.randn(ob, ib, kernel, kernel, generator=gen,
                                                                      dtype=torch.float64)
    p_out, p_in = torch.randperm(out_ch, generator=gen), torch.randperm(in_ch, generator=gen)
    weight = torch.empty_like(block)
    weight[p_out[:, None], p_in[None, :]] = block  # channel p_out[k] of the weight is row k of the block form
    return weight, p_out, p_in


def total_gain(gain: torch.Tensor, a: torch.Tensor) -> float:
    return float(gain.gather(1, a[:, None]).sum())


# -------------------------------------------------------------------------------------------- the grouping search


def test_balanced_assignment_is_optimal_for_two_groups() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        gain = torch.rand(8, 2, generator=gen, dtype=torch.float64)
        best = max(sum(float(gain[c, 0 if c in first else 1]) for c in range(8))
                   for first in itertools.combinations(range(8), 4))
        a = balanced_assignment(gain, natural_assignment(8, 2))
        assert torch.bincount(a, minlength=2).tolist() == [4, 4]
        assert total_gain(gain, a) == pytest.approx(best, rel=1e-12)


def test_balanced_assignment_keeps_sizes_and_improves_on_start() -> None:
    gen = torch.Generator().manual_seed(2)
    for channels, groups in ((12, 3), (32, 4), (64, 8)):
        gain = torch.rand(channels, groups, generator=gen, dtype=torch.float64)
        start = natural_assignment(channels, groups)
        a = balanced_assignment(gain, start)
        assert torch.bincount(a, minlength=groups).tolist() == [channels // groups] * groups
        assert total_gain(gain, a) > total_gain(gain, start)
        # a start that is already optimal (every channel in its best group, balanced) stays
        best = torch.arange(channels) % groups
        peaked = torch.nn.functional.one_hot(best, groups).to(torch.float64) + 0.01 * gain
        assert torch.equal(balanced_assignment(peaked, start), best)


@pytest.mark.parametrize(("out_ch", "in_ch", "groups", "kernel"), [(32, 16, 4, 3), (24, 24, 3, 1), (16, 8, 2, 3),
                                                                     (64, 32, 8, 1)])
def test_hidden_block_structure_is_recovered(out_ch: int, in_ch: int, groups: int, kernel: int) -> None:
    gen = torch.Generator().manual_seed(out_ch * in_ch + groups)
    for _ in range(3):
        weight, _, _ = hidden_block_weight(out_ch, in_ch, groups, kernel, gen=gen)
        g = best_grouping(weight, groups=groups)
        assert g.kept == pytest.approx(1.0, abs=1e-12)
        assert g.kept_natural < 0.9
        block = factorize.block_diagonal(weight[g.perm_out][:, g.perm_in], groups=groups)
        assert block.exact and block.kept_energy == pytest.approx(1.0, abs=1e-12)


def test_kept_fraction_is_the_block_diagonal_energy_of_the_permuted_weight() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 8, 3, 3, generator=gen, dtype=torch.float64)
    energy = energy_matrix(weight)
    torch.testing.assert_close(energy, weight.square().sum((2, 3)))
    for _ in range(4):
        a_out = torch.randperm(12, generator=gen) % 4
        a_in = torch.randperm(8, generator=gen) % 4
        block = factorize.block_diagonal(weight[assignment_permutation(a_out)][:, assignment_permutation(a_in)],
                                         groups=4)
        assert kept_fraction(energy, a_out, a_in) == pytest.approx(block.kept_energy, rel=1e-12)
    # the energy of a grouped weight is that of its dense form
    grouped = torch.randn(8, 2, 1, 1, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(energy_matrix(grouped, source_groups=4), factorize.dense_weight(grouped, 4)[..., 0, 0]
                               .square())


def test_search_shares_spaces_keeps_fixed_ones_and_never_loses_to_natural() -> None:
    gen = torch.Generator().manual_seed(4)
    # a chain  s0 (fixed) -> t0 -> s1 -> t1 -> s2, a second reader t2 of s1, and t3 reading and writing s2
    spaces = [Space(16, 4, free=False), Space(32, 4), Space(16, 4)]
    terms = [Term(torch.rand(32, 16, generator=gen, dtype=torch.float64) ** 4, 1, 0),
             Term(torch.rand(16, 32, generator=gen, dtype=torch.float64) ** 4, 2, 1),
             Term(torch.rand(16, 32, generator=gen, dtype=torch.float64) ** 4, 2, 1),
             Term(torch.rand(16, 16, generator=gen, dtype=torch.float64) ** 4, 2, 2)]
    found = search(spaces, terms)
    assert torch.equal(found.assignments[0], natural_assignment(16, 4))
    for a, s in zip(found.assignments, spaces, strict=True):
        assert torch.bincount(a, minlength=s.groups).tolist() == [s.channels // s.groups] * s.groups
    for j, t in enumerate(terms):  # reported figures are the kept fractions of the returned groupings
        assert found.kept[j] == pytest.approx(
            kept_fraction(t.energy, found.assignments[t.out_space], found.assignments[t.in_space]), rel=1e-12)
        assert found.kept_natural[j] == pytest.approx(
            kept_fraction(t.energy, natural_assignment(*t.energy.shape[:1], 4),
                          natural_assignment(t.energy.shape[1], 4)), rel=1e-12)
        assert found.kept[j] >= found.kept_natural[j] - 1e-12
    assert sum(found.kept) > sum(found.kept_natural) + 0.1
    again = search(spaces, terms)  # deterministic
    assert all(torch.equal(a, b) for a, b in zip(found.assignments, again.assignments, strict=True))


def test_search_errors_name_the_mismatch() -> None:
    with pytest.raises(ValueError, match=r"term 0: energy \(8, 4\) does not match spaces 1 \(6 channels\)"):
        search([Space(4, 2), Space(6, 2)], [Term(torch.ones(8, 4, dtype=torch.float64), 1, 0)])
    with pytest.raises(ValueError, match="groups=4 does not divide channels=6"):
        natural_assignment(6, 4)


# ------------------------------------------------------------------------------------------ the coupling graph


class Blocky(nn.Module):
    """A residual join, a squeeze-excite style scale, a concat, a shared batch norm and a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.shared = nn.BatchNorm2d(8)
        self.g = nn.Conv2d(8, 8, 1, groups=2)
        self.d = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.relu(self.bn(self.a(x)))
        u = self.dw(self.b(t)) + t  # residual: t, dw output and the sum share one order
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(u.mean((2, 3), keepdim=True)))))
        v = u * scale * 0.5  # channel scale joins; the scalar does not
        w = self.shared(self.c(v)) + self.shared(self.g(v))
        return self.d(torch.cat([v, w], dim=1))


def test_coupling_components_and_blockers() -> None:
    gm = trace(Blocky())
    propagate_shapes(gm, (torch.randn(2, 3, 8, 8),))
    cc = channel_coupling(gm)
    assert (cc.component("x").consumers, cc.component("x").blockers) == (("a",), ("model input 'x'",))
    # t, b's output, the depthwise conv, the residual sum, its spatial mean, the excite scale and the scaled tensor
    # share one order; b reads and writes it; the scalar multiply joins nothing new
    main = cc.component("relu")
    assert main.spaces == ("a", "bn", "relu", "b", "dw", "add", "mean", "fc2", "sigmoid", "mul", "mul_1")
    assert (main.producers, main.consumers, main.channelwise) == (("a", "b", "fc2"), ("b", "fc1", "c"), ("bn", "dw"))
    assert main.joins == ("add at node 'add'", "mul at node 'mul'")
    assert main.blockers == ("grouped conv 'g' (groups=2)", "cat at node 'cat'") and not main.permutable
    assert main.why_fixed() == ("coupled to grouped conv 'g' (groups=2) and 1 more (joined by add at node 'add', mul "
                                "at node 'mul')")
    excite = cc.component("relu_1")  # the squeeze-excite bottleneck is free
    assert (excite.spaces, excite.producers, excite.consumers, excite.channels) == (
        ("fc1", "relu_1"), ("fc1",), ("fc2",), 4)
    assert excite.permutable
    assert cc.component("c").blockers == ("module 'shared' (called 2 times)",)
    assert cc.component("cat").blockers == ("cat at node 'cat'",) and cc.component("cat").channels == 16
    assert cc.component("d").blockers == ("the model output",)
    assert sorted(cc.index) == sorted(s for c in cc.components for s in c.spaces)  # one component per space
    tensors = [n for n in gm.graph.nodes if n.op != "output"]  # every value here is a 4-D tensor
    assert cc.graph.number_of_nodes() == len(cc.index) == len(tensors)


def test_coupling_of_torchvision_resnet18() -> None:
    gm = trace(torchvision.models.resnet18())
    propagate_shapes(gm, (torch.randn(1, 3, 64, 64),))
    cc = channel_coupling(gm)
    inner = cc.component("layer1_0_conv1")
    assert (inner.producers, inner.consumers, inner.channelwise, inner.blockers) == (
        ("layer1.0.conv1",), ("layer1.0.conv2",), ("layer1.0.bn1",), ())
    stream1 = cc.component("maxpool")  # stem output and layer1's residual stream
    assert stream1.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    assert stream1.consumers == ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0")
    assert stream1.joins == ("add at node 'add'", "add at node 'add_1'") and stream1.permutable
    stream4 = cc.component("layer4_1_relu_1")
    assert stream4.blockers == ("flatten at node 'flatten'",)
    assert stream4.producers == ("layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2")


# ---------------------------------------------------------------------------------------------- the rewriter


def test_permute_channels_folds_exactly_and_replaces_tensors() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.PReLU(6),
                          nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 5, 1)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[2].weight.uniform_(0.0, 1.0)
    model[4].weight.requires_grad_(False)
    gm = trace(model)
    old = gm.get_submodule("0").weight
    p_in, p_mid = torch.randperm(4), torch.randperm(6)
    permute_channels(gm, "0", in_perm=p_in, out_perm=p_mid)
    for name in ("1", "2", "3"):
        permute_channels(gm, name, out_perm=p_mid)
    permute_channels(gm, "4", in_perm=p_mid)
    gm.recompile()
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(gm(x[:, p_in]), model(x))
    assert gm.get_submodule("0").weight is not old and torch.equal(model[0].weight, old)  # nothing in place
    assert not gm.get_submodule("4").weight.requires_grad and gm.get_submodule("1").weight.requires_grad
    assert "running_mean" in dict(gm.get_submodule("1").named_buffers())
    with pytest.raises(ValueError, match="3: Conv2d cannot absorb a channel permutation of its input"):
        permute_channels(gm, "3", in_perm=p_mid)
    grouped = trace(nn.Sequential(nn.Conv2d(4, 4, 1, groups=2)))
    with pytest.raises(ValueError, match="0: Conv2d cannot absorb a channel permutation"):
        permute_channels(grouped, "0", out_perm=torch.randperm(4))


# ------------------------------------------------------------------------------------------ grouped{permute=true}


def hidden_model(seed: int) -> nn.Module:
    """conv(3->16) -> BN -> ReLU -> conv(16->32, block-diagonal under a hidden permutation) -> BN -> ReLU ->
    conv(32->3): only the middle conv is a grouped{groups=4} site."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 3, 1))
    weight, _, _ = hidden_block_weight(32, 16, 4, gen=gen)
    with torch.no_grad():
        model[3].weight.copy_(weight)
        for bn in (model[1], model[4]):
            randomize_bn(bn)
    return model.eval()


def randomize_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hidden_permutation_makes_the_grouped_rewrite_exact(seed: int) -> None:
    model = hidden_model(seed)
    x = torch.randn(2, 3, 8, 8)
    permuted = fxrewrite.rewrite(model, (x,), passes="grouped{groups=4, permute=true}", verify=False)
    natural = fxrewrite.rewrite(model, (x,), passes="grouped{groups=4}", verify=False)
    torch.testing.assert_close(permuted.module(x), model(x))
    assert (natural.module(x) - model(x)).abs().max() > 0.1
    rec = next(r for r in permuted.report.records if r.status == "rewritten")
    assert rec.site == "3" and rec.exact and rec.rel_error == 0.0
    assert rec.details["kept_energy"] == pytest.approx(1.0, abs=1e-12)
    nat = next(r for r in natural.report.records if r.status == "rewritten")
    assert rec.details["kept_energy_natural"] == pytest.approx(nat.details["kept_energy"], rel=1e-9)
    assert nat.details["kept_energy"] < 0.9
    assert rec.details["input_permuted"] and rec.details["output_permuted"]
    assert "input_reason" not in rec.details and "output_reason" not in rec.details
    assert permuted.module.code == natural.module.code  # the same ops: no gather / index op was added
    assert permuted.module.get_submodule("3").groups == 4


def test_plan_reports_the_run_and_changes_nothing() -> None:
    model = hidden_model(3)
    x = torch.randn(1, 3, 8, 8)
    gm = trace(model)
    propagate_shapes(gm, (x,))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    planned = Grouped(groups=4, permute=True).plan(gm)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    ran = Grouped(groups=4, permute=True).run(gm)
    by_site = {r.site: r for r in ran.records}
    for p in planned:
        assert p.status == ("planned" if by_site[p.site].status == "rewritten" else "skipped")
        assert dict(p.details) == pytest.approx(dict(by_site[p.site].details))
        assert (p.params_after, p.macs_after, p.exact) == (by_site[p.site].params_after, by_site[p.site].macs_after,
                                                           by_site[p.site].exact)


def test_second_run_changes_nothing() -> None:
    model = hidden_model(4)
    x = torch.randn(1, 3, 8, 8)
    first = fxrewrite.rewrite(model, (x,), passes="grouped{groups=4, permute=true}", verify=False)
    state = {k: v.clone() for k, v in first.module.state_dict().items()}
    second = Grouped(groups=4, permute=True)(first.module)
    assert not second.modified
    assert [r.code for r in second.records] == ["channels-not-divisible", "already-grouped", "channels-not-divisible"]
    assert all(torch.equal(state[k], v) for k, v in second.graph_module.state_dict().items())


def test_sites_with_permute_false_or_other_groups_keep_shared_orders() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    rules = [Rule(None), Rule("5", options={"permute": False})]
    result = fxrewrite.rewrite(model, (x,), passes="grouped{groups=4, permute=true}", select=rules, verify=False)
    rec = {r.site: r for r in result.report.records}
    assert rec["2"].details["input_permuted"] and not rec["2"].details["output_permuted"]
    assert rec["2"].details["output_reason"] == ("output channels: shared with site '5', rewritten with "
                                                 "permute=false; natural order")
    assert "kept_energy_natural" not in rec["5"].details  # permute=false: the plain record
    rules = [Rule(None), Rule("5", options={"groups": 2})]
    result = fxrewrite.rewrite(model, (x,), passes="grouped{groups=4, permute=true}", select=rules, verify=False)
    rec = {r.site: r for r in result.report.records}
    assert rec["5"].details["input_reason"] == ("input channels: shared by sites rewritten with different groups "
                                                "[2, 4]; natural order")
    assert rec["5"].details["output_permuted"]  # its output feeds only the dense 16->3 conv


def test_spec_and_option_checks() -> None:
    assert Grouped(groups=2).spec() == "grouped{groups=2, init=block}"  # unchanged by the new option
    assert Grouped(groups=2, permute=True).spec() == "grouped{groups=2, init=block, permute=True}"
    assert parse_pipeline(Grouped(groups=2, permute=True).spec()) == [Grouped(groups=2, permute=True)]
    with pytest.raises(ConfigError, match="grouped: permute must be true or false, got 1"):
        Grouped(permute=1)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ torchvision models


def bn_upstream(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    """The batch norm a tensor comes from through ReLUs / adds (first operand) in resnet18 / mobilenet_v2."""
    while not (node.op == "call_module" and isinstance(modules[str(node.target)], nn.BatchNorm2d)):
        node = node.args[0]
    return str(node.target)


def recovered_perm(original: nn.BatchNorm2d, rewritten: nn.BatchNorm2d) -> torch.Tensor:
    """The permutation folded into a batch norm: rewritten channel k is original channel perm[k]."""
    def rows(bn: nn.BatchNorm2d) -> torch.Tensor:
        return torch.stack([bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach()], dim=1)

    match = (rows(rewritten)[:, None] == rows(original)[None, :]).all(-1)
    assert match.sum(1).eq(1).all()
    return match.int().argmax(1)


def masked_reference(model: nn.Module, gm: torch.fx.GraphModule, result: fxrewrite.RewriteResult) -> nn.Module:
    """The original model with each rewritten site's dropped weights zeroed, in the original channel order: the
    groups are read off the permutations found in the rewritten model's batch norms."""
    reference = copy.deepcopy(model)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    modules = dict(gm.named_modules())
    for rec in (r for r in result.report.records if r.status == "rewritten"):
        conv = reference.get_submodule(rec.site)
        g = rec.options["groups"]
        node = nodes[rec.site]
        perms = []
        for bn_name in (bn_upstream(node.args[0], modules), bn_upstream(next(iter(node.users)), modules)):
            perms.append(recovered_perm(model.get_submodule(bn_name), result.module.get_submodule(bn_name)))
        p_in, p_out = perms
        group_in = torch.argsort(p_in) // (conv.in_channels // g)  # original channel c sits at position inv[c]
        group_out = torch.argsort(p_out) // (conv.out_channels // g)
        mask = (group_out[:, None] == group_in[None, :]).to(conv.weight.dtype)[:, :, None, None]
        weight = conv.weight.detach()
        kept = float((weight * mask).square().sum() / weight.square().sum())
        assert kept == pytest.approx(rec.details["kept_energy"], rel=1e-5)
        with torch.no_grad():
            conv.weight.mul_(mask)
    return reference


def torchvision_model(name: str) -> nn.Module:
    """A torchvision model with seeded random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(7)
    model = getattr(torchvision.models, name)().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    return model


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models(name: str) -> None:
    model = torchvision_model(name)
    x = torch.randn(1, 3, 64, 64)
    result = fxrewrite.rewrite(model, (x,), passes="grouped{groups=4, permute=true}", verify=False)
    natural = fxrewrite.rewrite(model, (x,), passes="grouped{groups=4}", verify=False)
    assert result.module.code == natural.module.code
    out = result.module(x)
    assert out.shape == model(x).shape
    records = [r for r in result.report.records if r.status == "rewritten"]
    assert [r.site for r in records] == [r.site for r in natural.report.records if r.status == "rewritten"]
    nat = {r.site: r.details["kept_energy"] for r in natural.report.records if r.status == "rewritten"}
    for r in records:
        assert r.details["kept_energy_natural"] == pytest.approx(nat[r.site], rel=1e-9)
        assert r.details["kept_energy"] >= r.details["kept_energy_natural"] - 1e-9
    assert sum(r.details["kept_energy"] for r in records) > sum(nat.values()) + 0.01 * len(records)
    # sides coupled (through residual adds) to the flatten before the classifier keep the natural order
    tail = {"resnet18": [("layer4.0.conv2", "output"), ("layer4.0.downsample.0", "output"),
                         ("layer4.1.conv1", "input"), ("layer4.1.conv2", "output")],
            "mobilenet_v2": [("features.18.0", "output")]}[name]
    by_site = {r.site: r for r in records}
    for site, side in tail:
        assert not by_site[site].details[f"{side}_permuted"]
        assert by_site[site].details[f"{side}_reason"].startswith(f"{side} channels: coupled to flatten at node "
                                                                  "'flatten'")
    if name == "resnet18":
        assert "joined by add at node 'add_6', add at node 'add_7'" in by_site["layer4.1.conv1"].details["input_reason"]
    permuted_sides = sum(r.details["input_permuted"] + r.details["output_permuted"] for r in records)
    assert permuted_sides == 2 * len(records) - len(tail)
    gm = trace(model)
    reference = masked_reference(model, gm, result)
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)


def test_doctests_of_the_new_modules() -> None:
    import doctest

    from fxrewrite.graph import coupling as cc_module
    from fxrewrite.maths import permutation as perm_module
    for module in (perm_module, cc_module):
        assert doctest.testmod(module).failed == 0


# ------------------------------------------------------------------------------ an ExportedProgram (ATen graph)


def _module_roles(gm: torch.fx.GraphModule, x: torch.Tensor) -> list[tuple[object, ...]]:
    """Each coupling component that touches a module: its producers, consumers, channel-wise modules, whether it
    can be permuted (sorted: node names differ between a traced model and a program, module names do not)."""
    propagate_shapes(gm, (x,))
    return sorted((c.producers, c.consumers, c.channelwise, c.permutable) for c in channel_coupling(gm).components
                  if c.producers or c.consumers or c.channelwise)


@pytest.mark.parametrize(("name", "decomposed"), [("resnet18", False), ("mobilenet_v2", True)])
def test_coupling_of_an_exported_program_equals_the_traced_models(name: str, decomposed: bool) -> None:
    from fxrewrite.frontends.models import exported_graph_module
    model, x = getattr(torchvision.models, name)().eval(), torch.randn(1, 3, 64, 64)
    ep = torch.export.export(model, (x,))
    program = exported_graph_module(ep.run_decompositions() if decomposed else ep)
    expected = _module_roles(trace(model), x)
    assert _module_roles(program, x) == expected
    assert sum(permutable for *_, permutable in expected) > 0
    # the residual stream before the classifier is blocked by the ATen flatten (a view once decomposed)
    last_conv = {"resnet18": "layer4.1.conv2", "mobilenet_v2": "features.18.0"}[name]
    last = channel_coupling(program).component(program.graph.find_nodes(op="call_module", target=last_conv)[0].name)
    flatten = "view.default at node 'view'" if decomposed else "flatten.using_ints at node 'flatten'"
    assert last.blockers == (flatten,)


@pytest.mark.parametrize(("name", "decomposed"), [("resnet18", True), ("mobilenet_v2", False)])
def test_grouped_permute_on_an_exported_program_folds_like_the_eager_model(name: str, decomposed: bool) -> None:
    from fxrewrite.io.replay import apply_plan, plan_from_result
    model = torchvision_model(name)
    x = torch.randn(1, 3, 64, 64)
    ep = torch.export.export(model, (x,))
    ep = ep.run_decompositions() if decomposed else ep
    passes = "grouped{groups=4, permute=true}"
    eager = fxrewrite.rewrite(model, (x,), passes=passes, verify=False)
    result = fxrewrite.rewrite(ep, (x,), passes=passes, verify=False)

    def sides(r: fxrewrite.RewriteResult) -> dict[str, tuple[bool, bool]]:
        return {rec.site: (rec.details["input_permuted"], rec.details["output_permuted"])
                for rec in r.report.records if rec.status == "rewritten"}

    assert sides(result) == sides(eager)
    assert sum(a + b for a, b in sides(result).values()) > len(sides(result))  # most sides are permuted
    kept = {rec.site: rec.details["kept_energy"] for rec in eager.report.records if rec.status == "rewritten"}
    for rec in (r for r in result.report.records if r.status == "rewritten"):
        assert rec.details["kept_energy"] == pytest.approx(kept[rec.site], rel=0, abs=1e-9)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(result.report.context["exported_program"]["batch_norms"]["converted"]) == n_bn
    with torch.no_grad():
        out = result.module.module()(x)
        torch.testing.assert_close(out, eager.module(x))
        # the plan replays on the eager model and takes the program's (permuted) weights
        rebuilt = apply_plan(getattr(torchvision.models, name)(), plan_from_result(result)).eval()
        rebuilt.load_state_dict(result.module.state_dict, strict=True)
        torch.testing.assert_close(rebuilt(x), out, rtol=1e-5, atol=1e-5)
