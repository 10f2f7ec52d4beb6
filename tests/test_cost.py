"""Tests for fxrewrite.measure.cost: hand-computed costs, ATen graphs, and agreement with FlopCounterMode.

The torchvision zoo against fvcore and FlopCounterMode, before and after rewrites, is tests/test_cost_zoo.py (which
imports the helpers below).
"""

from __future__ import annotations

import contextlib
import doctest
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fxrewrite.measure import cost
from fxrewrite.measure.cost import KINDS, UNITS, ModelCost, NodeCost, conv_macs, model_cost, node_macs

MAC_KINDS = ("conv", "linear", "matmul", "attention")


def traced(model: nn.Module, *inputs: torch.Tensor) -> torch.fx.GraphModule:
    """symbolic_trace + FakeTensorProp (real parameters, fake activations: no real compute)."""
    gm = torch.fx.symbolic_trace(model.eval())
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    return gm


def fcm_counts(model: nn.Module, *inputs: torch.Tensor, grad: bool = False) -> dict[Any, int]:
    """FlopCounterMode's FLOPs per ATen op of one forward (it only counts conv, mm, addmm, bmm, baddbmm, sdpa, ...).

    The MATH sdpa backend makes attention visible as bmm on CPU; ``grad=True`` keeps
    nn.MultiheadAttention off its fused inference fast path, which FlopCounterMode cannot see into.
    """
    grad_ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with grad_ctx, sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fcm:
        model(*inputs)
    return dict(fcm.get_flop_counts()["Global"])


def fcm_macs(model: nn.Module, *inputs: torch.Tensor, grad: bool = False) -> int:
    """FlopCounterMode total / 2 (see ``fcm_counts``)."""
    total = sum(fcm_counts(model, *inputs, grad=grad).values())
    assert total % 2 == 0
    return total // 2


def mac_total(c: ModelCost) -> int:
    kinds = c.by_kind()
    return sum(kinds[k] for k in MAC_KINDS)


def test_doctests() -> None:
    assert doctest.testmod(cost).failed == 0


def test_units_and_kinds() -> None:
    assert UNITS == {
        "macs": "multiply-accumulates (1 MAC = one multiply-add; bias not counted)",
        "flops": "2 x MACs",
        "params": "elements",
        "activation_bytes": "bytes of node outputs",
    }
    assert KINDS == ("conv", "linear", "matmul", "attention", "other")


def test_conv_macs() -> None:
    assert conv_macs((1, 8, 16, 16), in_channels=4, groups=2, kernel_size=(3, 3)) == 36864
    assert conv_macs((2, 6, 10), in_channels=6, groups=6, kernel_size=(5,)) == 2 * 6 * 10 * 1 * 5
    with pytest.raises(ValueError, match="groups"):
        conv_macs((1, 8, 4, 4), in_channels=6, groups=4, kernel_size=(1, 1))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # 9x9 input, padding 2, dilation 2 (effective kernel 5), stride 2 -> 5x5 output
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=True)
        self.fc = nn.Linear(200, 10)
        self.proj = nn.Parameter(torch.randn(10, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # (2, 8, 5, 5)
        h = self.fc(h.flatten(1))  # (2, 10)
        h = torch.matmul(h, self.proj)  # (2, 3)
        return h @ h.transpose(0, 1)  # (2, 2)


def test_tiny_model_hand_computed() -> None:
    gm = traced(Tiny(), torch.randn(2, 4, 9, 9))
    c = model_cost(gm)
    rows = {(n.target, n.kind): n for n in c.nodes}

    conv = rows[("conv", "conv")]
    assert conv.macs == (2 * 8 * 5 * 5) * (4 // 2) * 3 * 3 == 7200
    assert conv.params == 8 * 2 * 3 * 3 + 8 == 152
    assert conv.activation_bytes == 2 * 8 * 5 * 5 * 4 == 1600

    fc = rows[("fc", "linear")]
    assert (fc.macs, fc.params, fc.activation_bytes) == (2 * 10 * 200, 200 * 10 + 10, 2 * 10 * 4)

    mm = rows[("torch.matmul", "matmul")]
    assert (mm.macs, mm.params, mm.activation_bytes) == (2 * 3 * 10, 0, 24)
    assert rows[("proj", "other")].params == 30  # the get_attr node owns the bare parameter
    assert rows[("proj", "other")].activation_bytes == 0

    gram = rows[("_operator.matmul", "matmul")]
    assert (gram.macs, gram.activation_bytes) == (2 * 2 * 3, 16)

    assert c.macs == 7200 + 4000 + 60 + 12 == 11272
    assert c.flops == 2 * 11272
    assert c.params == 152 + 2010 + 30 == sum(p.numel() for p in gm.parameters())
    # conv, relu, flatten: 1600 each; fc 80; matmul 24; transpose 24; gram 16
    assert c.activation_bytes == 3 * 1600 + 80 + 24 + 24 + 16
    assert c.by_kind() == {"conv": 7200, "linear": 4000, "matmul": 72, "attention": 0, "other": 0}
    assert [n.node for n in c.nodes] == [n.name for n in gm.graph.nodes]
    assert all(isinstance(n, NodeCost) for n in c.nodes)
    assert [node_macs(gm, n) for n in gm.graph.nodes if n.op == "call_module"] == [
        ("conv", 7200),
        ("linear", 4000),
    ]
    assert c.macs == fcm_macs(Tiny().eval(), torch.randn(2, 4, 9, 9))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.b(self.a(x)) * self.scale) + self.a.bias


def test_params_tied_reused_and_buffers_counted_once() -> None:
    gm = traced(Tied(), torch.randn(3, 4))
    c = model_cost(gm)
    assert c.params == 16 + 4 == sum(p.numel() for p in gm.parameters())
    assert [n.params for n in c.nodes if n.params] == [20]  # first use of a: weight + bias
    assert c.macs == 3 * (3 * 4 * 4)


@pytest.mark.parametrize(
    ("module", "shape", "expected"),
    [
        # out (2, 6, 8) ; in/groups = 2 ; k = 3
        (nn.Conv1d(4, 6, 3, padding=1, groups=2), (2, 4, 8), 2 * 6 * 8 * 2 * 3),
        # out (1, 4, 3, 3, 3) ; k = 2*2*2 ; stride 2
        (nn.Conv3d(2, 4, 2, stride=2), (1, 2, 6, 6, 6), 4 * 27 * 2 * 8),
        # transposed: numel(input) * out/groups * prod(k) = (1*4*5*5) * (6/2) * 9
        (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (1, 4, 5, 5), 100 * 3 * 9),
        (nn.ConvTranspose1d(3, 5, 4, stride=3, padding=1), (2, 3, 7), 42 * 5 * 4),
        # depthwise 2-D conv with dilation
        (nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False), (1, 8, 6, 6), 8 * 36 * 1 * 9),
        (nn.Linear(5, 7), (2, 3, 5), 2 * 3 * 7 * 5),
    ],
)
def test_conv_and_linear_modules(module: nn.Module, shape: tuple[int, ...], expected: int) -> None:
    x = torch.randn(shape)
    c = model_cost(traced(nn.Sequential(module), x))
    assert c.macs == expected == fcm_macs(module, x)
    assert c.params == sum(p.numel() for p in module.parameters())


class Functional(nn.Module):
    """One of each call_function / call_method form, with weights fetched through get_attr."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 2, 3, 3))  # groups=2, in 4
        self.lw = nn.Parameter(torch.randn(5, 6))
        self.tw = nn.Parameter(torch.randn(6, 2, 2, 2))  # transposed, groups=3: out = 2 * 3 = 6

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = F.conv2d(x, self.w, None, 2, 1, 1, 2)  # (1, 6, 4, 4): 96 * 2 * 9 = 1728
        t = F.conv_transpose2d(y, self.tw, stride=2, groups=3)  # in numel 96 * 2 * 4 = 768
        z = F.linear(y.permute(0, 2, 3, 1), self.lw)  # (1, 4, 4, 5): 80 * 6 = 480
        z = z.reshape(4, 4, 5)
        a = torch.bmm(z, z.transpose(1, 2))  # (4, 4, 4) * 5 = 320
        b = torch.baddbmm(a, a, a)  # 64 * 4 = 256
        m = torch.mm(z[0], z[1].t())  # (4, 4) * 5 = 80
        n = torch.addmm(m, m, m)  # 16 * 4 = 64
        p = z.matmul(z.transpose(1, 2))  # call_method: 64 * 5 = 320
        e1 = torch.einsum("bij,bjk->bik", z, z.transpose(1, 2))  # b*i*j*k = 4*4*5*4 = 320
        e2 = torch.einsum("...ij,jk", z, self.lw)  # (4) * i4 * j5 * k6 = 480
        e3 = torch.einsum("ij,ij->i", [m, m])  # list form, 16
        q = z.reshape(1, 2, 8, 5)
        s = F.scaled_dot_product_attention(q, q, q)  # (B*H*L) 16 * S 8 * (5 + 5) = 1280
        return t, b, n, p, e1, e2, e3, s


FUNCTIONAL_MACS = {
    "torch.conv2d": ("conv", 1728),
    "torch.conv_transpose2d": ("conv", 768),
    "torch._C._nn.linear": ("linear", 480),
    "torch.bmm": ("matmul", 320),
    "torch.baddbmm": ("matmul", 256),
    "torch.mm": ("matmul", 80),
    "torch.addmm": ("matmul", 64),
    "matmul": ("matmul", 320),
    "torch._C._nn.scaled_dot_product_attention": ("attention", 1280),
}


def test_functional_ops() -> None:
    x = torch.randn(1, 4, 8, 8)
    gm = traced(Functional(), x)
    c = model_cost(gm)
    got = {n.target: (n.kind, n.macs) for n in c.nodes if n.macs}
    einsums = [n.macs for n in c.nodes if n.target == "torch.functional.einsum"]
    assert einsums == [320, 480, 16]
    del got["torch.functional.einsum"]
    assert got == FUNCTIONAL_MACS
    assert c.macs == sum(m for _, m in FUNCTIONAL_MACS.values()) + 816
    assert c.params == 6 * 2 * 9 + 30 + 6 * 2 * 4
    assert c.macs == fcm_macs(Functional(), x)


@pytest.mark.parametrize(
    ("kwargs", "q_shape", "kv_shape", "call"),
    [
        ({}, (5, 2, 8), (5, 2, 8), {}),
        ({"batch_first": True}, (2, 5, 8), (2, 7, 8), {"need_weights": False}),
        ({"kdim": 3, "vdim": 6}, (5, 2, 8), (7, 2, None), {}),
        ({"bias": False, "add_bias_kv": True, "add_zero_attn": True}, (4, 1, 8), (6, 1, 8), {}),
        ({}, (5, 8), (9, 8), {"need_weights": False}),  # unbatched
    ],
)
def test_multihead_attention_leaf(
    kwargs: dict[str, object],
    q_shape: tuple[int, ...],
    kv_shape: tuple[int | None, ...],
    call: dict[str, object],
) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **kwargs).eval()
    q = torch.randn(q_shape)
    k = torch.randn(*kv_shape[:-1], mha.kdim)
    v = torch.randn(*kv_shape[:-1], mha.vdim)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.attn(q, k, v, **call)[0]

    gm = traced(Wrap(), q, k, v)
    assert [n.op for n in gm.graph.nodes if n.target == "attn"] == ["call_module"]  # a leaf
    c = model_cost(gm)
    assert c.by_kind()["attention"] == c.macs == fcm_macs(Wrap(), q, k, v, grad=True)
    assert c.params == sum(p.numel() for p in mha.parameters())


def test_multihead_attention_formula() -> None:
    # N=2, L=5, S=7, E=8, kdim=vdim=E: 2 * (N*L*E*E) + 2 * (N*S*E*E) + 2 * N*L*S*E
    x, kv = torch.randn(5, 2, 8), torch.randn(7, 2, 8)
    mha = nn.MultiheadAttention(8, 2)
    graph = torch.fx.Graph()
    q_node, k_node = graph.placeholder("q"), graph.placeholder("k")
    out = graph.call_module("attn", (q_node, k_node, k_node))
    graph.output(out)
    gm = torch.fx.GraphModule({"attn": mha}, graph)
    q_node.meta["val"], k_node.meta["val"] = x, kv
    assert node_macs(gm, out) == ("attention", 2 * 640 + 2 * 896 + 2 * 560)


class Exportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.tconv = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)
        self.fc = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.randn(6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tconv(self.conv(x)).permute(0, 2, 3, 1)  # (1, 8, 8, 4)
        z = self.fc(y).reshape(64, 6) @ self.w  # (64, 5)
        z = z.reshape(4, 16, 5)
        return torch.bmm(z, z.transpose(1, 2))


EXPORTABLE_MACS = 128 * 2 * 9 + 128 * 2 * 4 + 384 * 4 + 64 * 5 * 6 + 4 * 16 * 16 * 5  # 11904


def test_aten_graphs_from_export() -> None:
    model, x = Exportable().eval(), torch.randn(1, 4, 8, 8)
    ep = torch.export.export(model, (x,))
    pre = model_cost(ep.graph_module)  # aten.conv2d / conv_transpose2d / linear / matmul / bmm
    post = model_cost(ep.run_decompositions().graph_module)  # aten.convolution / mm / bmm
    unlifted = model_cost(ep.module())  # parameters as get_attr nodes
    fx = model_cost(traced(model, x))
    assert pre.macs == post.macs == unlifted.macs == fx.macs == EXPORTABLE_MACS == fcm_macs(model, x)
    assert pre.by_kind()["conv"] == post.by_kind()["conv"] == 128 * 2 * 9 + 128 * 2 * 4
    assert {n.target for n in post.nodes if n.kind == "conv"} == {"aten.convolution.default"}
    assert pre.params == post.params == 0  # lifted parameters are placeholders
    assert unlifted.params == fx.params == sum(p.numel() for p in model.parameters()) == 280


def test_missing_meta_raises() -> None:
    gm = torch.fx.symbolic_trace(Tiny())
    with pytest.raises(ValueError, match="no meta\\['val'\\]"):
        model_cost(gm)
    gm = traced(Tiny(), torch.randn(2, 4, 9, 9))
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    del conv.meta["val"]
    with pytest.raises(ValueError, match="'conv'"):
        model_cost(gm)
    with pytest.raises(ValueError, match="'conv'"):
        node_macs(gm, conv)
    # a node not needed by any MAC formula just contributes 0 activation bytes
    gm = traced(Tiny(), torch.randn(2, 4, 9, 9))
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    del relu.meta["val"]
    assert model_cost(gm).activation_bytes == 3 * 1600 + 80 + 24 + 24 + 16 - 1600


def test_other_ops_have_no_macs() -> None:
    model = nn.Sequential(
        nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Softmax(1)
    )
    c = model_cost(traced(model, torch.randn(2, 3, 8, 8)))
    assert c.macs == 0
    assert {n.kind for n in c.nodes} == {"other"}
    assert c.params == 6  # batch-norm weight + bias; running stats are buffers
