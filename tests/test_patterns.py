"""Tests for fxrewrite.graph.patterns: node predicates, multi-node patterns, failures with reasons, purity."""

from __future__ import annotations

import models
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.capture import trace
from fxrewrite.graph.patterns import CONV2D_FUNCTION, CONV2D_MODULE, Match, MatchFailure, NodePattern, Pattern

CONV = NodePattern("conv", op="call_module", module_type=nn.Conv2d)
BN = NodePattern("bn", op="call_module", module_type=nn.BatchNorm2d)
CONV_BN = Pattern(nodes=(CONV, BN), edges=(("conv", "bn"),))


class ConvBnNet(nn.Module):
    """Three conv->bn pairs: a plain one, one whose conv also feeds a residual add, one behind a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b1(self.c1(x))
        y = self.c2(x)
        x = self.b2(y) + y  # c2 has a second user
        return self.b3(torch.relu(self.c3(x)))


def node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def test_single_node_pattern_finds_exact_type_only() -> None:
    gm = trace(models.Conv2dSubclass())  # conv (Conv2d) and same (a Conv2d subclass)
    assert [m["conv"].target for m in Pattern((CONV,)).match(gm)] == ["conv"]
    with_subclasses = NodePattern("conv", op="call_module", module_type=nn.Conv2d, subclasses=True)
    assert [m["conv"].target for m in Pattern((with_subclasses,)).match(gm)] == ["conv", "same"]
    assert [m["conv"].target for m in Pattern((CONV2D_MODULE,)).match(gm)] == ["conv", "same"]


def test_attribute_predicates_equality_and_callables() -> None:
    gm = trace(models.Plain())  # conv1 3->16 k3, conv2 16->32 k3 s2, dw 32 groups=32, pw 32->8 k1
    depthwise = NodePattern("c", op="call_module", module_type=nn.Conv2d,
                            attrs={"groups": lambda g: g > 1})
    assert [m["c"].target for m in Pattern((depthwise,)).match(gm)] == ["dw"]
    wide_3x3 = NodePattern("c", op="call_module", attrs={"kernel_size": (3, 3), "in_channels": lambda c: c >= 16})
    assert [m["c"].target for m in Pattern((wide_3x3,)).match(gm)] == ["conv2", "dw"]
    strided = NodePattern("c", attrs={"stride": (2, 2)}, where=lambda n, g: n.target != "conv1")
    assert [m["c"].target for m in Pattern((strided,)).match(gm)] == ["conv2"]


def test_function_target_pattern() -> None:
    gm = trace(models.FunctionalConv())
    assert [m["conv"].name for m in Pattern((CONV2D_FUNCTION,)).match(gm)] == ["conv2d", "conv2d_1", "conv2d_2"]
    mul = NodePattern("m", op="call_function", target=(torch.mul, __import__("operator").mul))
    assert [m["m"].name for m in Pattern((mul,)).match(gm)] == ["mul"]


def test_conv_bn_pattern_respects_single_use() -> None:
    gm = trace(ConvBnNet())
    matches = CONV_BN.match(gm)
    assert [(m["conv"].target, m["bn"].target) for m in matches] == [("c1", "b1")]  # c2 shared, c3 -> relu -> b3
    loose = Pattern(nodes=(CONV, BN), edges=(("conv", "bn"),), single_use=False)
    assert [(m["conv"].target, m["bn"].target) for m in loose.match(gm)] == [("c1", "b1"), ("c2", "b2")]


def test_three_node_chain_pattern() -> None:
    gm = trace(ConvBnNet())
    relu = NodePattern("act", op="call_function", target=(torch.relu, F.relu))
    conv_relu_bn = Pattern((CONV, relu, BN), edges=(("conv", "act"), ("act", "bn")))
    assert [(m["conv"].target, m["act"].name, m["bn"].target) for m in conv_relu_bn.match(gm)] == [
        ("c3", "relu", "b3")]


def test_match_node_returns_match_or_reason() -> None:
    gm = trace(ConvBnNet())
    ok = CONV_BN.match_node(gm, node(gm, "c1"))
    assert isinstance(ok, Match) and ok["bn"].target == "b1"
    shared = CONV_BN.match_node(gm, node(gm, "c2"))
    assert isinstance(shared, MatchFailure) and not shared
    assert "c2 is also used by ['add']" in shared.reason
    wrong_user = CONV_BN.match_node(gm, node(gm, "c3"))
    assert isinstance(wrong_user, MatchFailure)
    assert "no user matches pattern node 'bn'" in wrong_user.reason and "relu" in wrong_user.reason
    not_conv = CONV_BN.match_node(gm, node(gm, "b1"))
    assert isinstance(not_conv, MatchFailure)
    assert not_conv.reason == "b1: module type is BatchNorm2d, not Conv2d"
    placeholder = CONV_BN.match_node(gm, node(gm, "x"))
    assert isinstance(placeholder, MatchFailure) and "op is placeholder, not call_module" in placeholder.reason


def test_node_failure_reasons() -> None:
    gm = trace(models.Plain())
    attrs = NodePattern("c", op="call_module", attrs={"groups": 4})
    assert attrs.failure(node(gm, "conv1"), gm) == "conv1: groups=1, not 4"
    missing = NodePattern("c", attrs={"no_such": 1})
    assert missing.failure(node(gm, "conv1"), gm) == "conv1: no_such=missing, not 1"

    def is_wide(c: int) -> bool:
        return c >= 64

    assert NodePattern("c", attrs={"in_channels": is_wide}).failure(node(gm, "conv1"), gm) == (
        "conv1: in_channels=3 fails is_wide")
    relu = node(gm, "relu")
    assert NodePattern("c", attrs={"groups": 1}).failure(relu, gm) == "relu: not a module call (op is call_function)"


def test_matching_never_edits_the_graph() -> None:
    gm = trace(ConvBnNet())
    code, nodes = gm.code, [(n.name, n.op, n.target, n.args) for n in gm.graph.nodes]
    users = {n.name: sorted(u.name for u in n.users) for n in gm.graph.nodes}
    CONV_BN.match(gm)
    for n in list(gm.graph.nodes):
        CONV_BN.match_node(gm, n)
    Pattern((CONV,)).match(gm)
    assert gm.code == code
    assert [(n.name, n.op, n.target, n.args) for n in gm.graph.nodes] == nodes
    assert {n.name: sorted(u.name for u in n.users) for n in gm.graph.nodes} == users
    assert not any("fx" in n.meta for n in gm.graph.nodes)


def test_invalid_patterns_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown op 'call_modul'"):
        NodePattern("c", op="call_modul")
    with pytest.raises(ConfigError, match="unique"):
        Pattern((CONV, CONV))
    with pytest.raises(ConfigError, match=r"unknown nodes \['relu'\]"):
        Pattern((CONV, BN), edges=(("conv", "relu"),))
    with pytest.raises(ConfigError, match="not connected"):
        Pattern((CONV, BN))
    with pytest.raises(ConfigError, match="at least one node"):
        Pattern(())


def test_match_counts_on_a_real_network() -> None:
    """conv->bn pairs in resnet18: every conv is followed by its own bn (20 = number of convs)."""
    torchvision = pytest.importorskip("torchvision")
    gm = trace(torchvision.models.resnet18(weights=None))
    pairs = CONV_BN.match(gm)
    modules = dict(gm.named_modules())
    expected = sum(isinstance(m, nn.Conv2d) for m in modules.values())
    assert len(pairs) == expected == 20
    # the bn of each pair is the conv's sibling: same prefix, "conv1"->"bn1", "downsample.0"->"downsample.1"
    for m in pairs:
        conv, bn = str(m["conv"].target), str(m["bn"].target)
        assert bn == conv.replace("conv", "bn") or bn == conv[:-1] + "1"
    # match_node agrees with match at every node (it searches only the anchor's neighbourhood)
    anchored = {n for n in gm.graph.nodes if CONV_BN.match_node(gm, n)}
    assert anchored == {m["conv"] for m in pairs}
