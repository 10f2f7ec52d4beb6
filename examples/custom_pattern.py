"""A user-written pattern: rewrite only the convolutions that feed a BatchNorm + ReLU, with wide inputs.

fxrewrite.Pattern describes a subgraph (node predicates plus data edges); matching is pure, so the pattern can
drive selection without touching the graph. Run: .venv/bin/python examples/custom_pattern.py
"""

import torch
import torchvision
from torch import nn

import fxrewrite
from fxrewrite import NodePattern, Pattern


def wide_input(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """A predicate: the convolution has at least 128 input channels."""
    return gm.get_submodule(str(node.target)).in_channels >= 128


conv_bn_relu = Pattern(
    nodes=(
        NodePattern("conv", op="call_module", module_type=nn.Conv2d, where=wide_input),
        NodePattern("bn", op="call_module", module_type=nn.BatchNorm2d),
        NodePattern("act", op="call_module", module_type=nn.ReLU),
    ),
    edges=(("conv", "bn"), ("bn", "act")),
)

model = torchvision.models.resnet18().eval()
x = torch.randn(1, 3, 96, 96)
gm = fxrewrite.trace(model)
before = gm.code
matches = conv_bn_relu.match(gm)
assert gm.code == before, "matching must never edit the graph"
names = [str(m["conv"].target) for m in matches]
print(f"{len(names)} conv -> bn -> relu chains with >= 128 input channels:", names)

# Why a given conv does not match: match_node returns a MatchFailure with the reason.
first_conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv1")
print("conv1:", conv_bn_relu.match_node(gm, first_conv))

result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=2}", select=names)
print(result.report)
