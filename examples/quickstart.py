"""Quickstart: plan, rewrite and check a torchvision model (random weights) with fxrewrite.

Run: .venv/bin/python examples/quickstart.py
"""

import torch
import torchvision

import fxrewrite

torch.manual_seed(0)
model = torchvision.models.resnet18().eval()
x = torch.randn(1, 3, 128, 128)

# 1. Dry run: every convolution site and what each rewrite kind can do there.
plan = fxrewrite.plan(model, (x,))
print(plan)

# 2. Exact mode: the depthwise-separable form at full rank reproduces the original.
exact = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact}")
with torch.no_grad():
    max_diff = (exact.module(x) - model(x)).abs().max().item()
print(f"\nrank=exact: max |difference| at the output = {max_diff:.2e}")

# 3. A cheap rewrite of the 3x3 convs of layer3 and layer4 only: the report gives costs and weight errors.
cheap = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=1}", select=["layer3.*", "layer4.*"])
print()
print(cheap.report)

# The input model is untouched; the result is a new GraphModule with plain Conv2d / Sequential modules.
print("\nstate_dict keys of one rewritten site:",
      [k for k in cheap.module.state_dict() if k.startswith("layer4.1.conv2")])
