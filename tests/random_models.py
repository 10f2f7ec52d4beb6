"""A seeded generator of small random CNNs and pass pipelines for the property sweep (tests/test_property_sweep.py).

Models are built from Conv2d (odd and even kernels, strides, dilation, padding modes, groups, with and without bias),
BatchNorm, ReLU, residual add, concat of two branches, max / average pooling; every one traces with torch.fx. The
pipelines mix valid options, exact modes and bad values (a group count that does not divide, rank 0).

>>> case = make_case(3)
>>> out = case.model(case.inputs[0])
>>> out.dim(), case.seed
(4, 3)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn


class Block(nn.Module):
    """One step of a random model: ``kind`` says what ``forward`` does with the submodules it holds."""

    def __init__(self, kind: str, *modules: nn.Module) -> None:
        super().__init__()
        self.kind = kind
        self.ops = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "seq":
            for op in self.ops:
                x = op(x)
            return x
        if self.kind == "add":  # a residual: x + f(x)
            y = x
            for op in self.ops:
                y = op(y)
            return x + y
        # concat of two branches
        return torch.cat([self.ops[0](x), self.ops[1](x)], dim=1)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv(rng: random.Random, cin: int, cout: int, keep_size: bool) -> nn.Conv2d:
    kh, kw = rng.choice([(1, 1), (3, 3), (3, 3), (5, 5), (2, 2), (3, 1), (1, 3), (4, 4)])
    groups = rng.choice([g for g in _divisors(cin) if cout % g == 0 and (g == 1 or rng.random() < 0.4)] or [1])
    dilation = 2 if rng.random() < 0.15 and kh > 1 else 1
    if keep_size and kh % 2 == 1 and kw % 2 == 1:
        padding: int | tuple[int, int] | str = (dilation * (kh // 2), dilation * (kw // 2))
        stride = 1
    elif keep_size:
        padding, stride = "same", 1
    else:
        padding = rng.choice([0, 1])
        stride = rng.choice([1, 1, 2])
    mode = rng.choice(["zeros", "zeros", "zeros", "reflect", "circular"]) if padding not in (0, "valid") else "zeros"
    return nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=rng.random() < 0.5, padding_mode=mode)


@dataclass
class Case:
    """A random model (eval mode), its example inputs and the seed that made it."""

    seed: int
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    channels: int


def make_model(rng: random.Random) -> tuple[nn.Module, int, int]:
    """(model, input channels, input size) for one draw."""
    cin = rng.choice([1, 2, 3, 4, 6, 8])
    c = cin
    blocks: list[nn.Module] = []
    size = rng.choice([12, 16, 17])
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["seq", "seq", "add", "cat", "pool"])
        if kind == "seq":
            cout = rng.choice([2, 4, 6, 8, 12, 16])
            ops: list[nn.Module] = [_conv(rng, c, cout, keep_size=True)]
            if rng.random() < 0.6:
                ops.append(nn.BatchNorm2d(cout))
            ops.append(nn.ReLU())
            blocks.append(Block("seq", *ops))
            c = cout
        elif kind == "add":
            ops = [_conv(rng, c, c, keep_size=True), nn.ReLU(), _conv(rng, c, c, keep_size=True)]
            if rng.random() < 0.5:
                ops.append(nn.BatchNorm2d(c))
            blocks.append(Block("add", *ops))
        elif kind == "cat":
            a, b = rng.choice([2, 4, 6]), rng.choice([2, 4, 8])
            blocks.append(Block("cat", _conv(rng, c, a, keep_size=True), _conv(rng, c, b, keep_size=True)))
            c = a + b
        elif size >= 8:
            blocks.append(Block("seq", rng.choice([nn.MaxPool2d(2), nn.AvgPool2d(2)])))
            size //= 2
    blocks.append(Block("seq", _conv(rng, c, rng.choice([4, 8, 10]), keep_size=False)))
    return nn.Sequential(*blocks), cin, size


def _bn_stats(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial batch-norm statistics and affine parameters, so BN changes the numbers."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def make_case(seed: int) -> Case:
    """The random model and inputs of ``seed`` (the same for the same seed); draws that do not run (a kernel larger
    than its padded input) are drawn again from the same generator."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    while True:
        with torch.random.fork_rng():
            torch.manual_seed(rng.randrange(2**31))
            model, cin, size = make_model(rng)
        _bn_stats(model, gen)
        model.eval()
        x = torch.randn(rng.choice([1, 2]), cin, size, size, generator=gen)
        try:
            with torch.no_grad():
                model(x)
        except RuntimeError:
            continue
        return Case(seed, model, (x,), cin)


def cli_model(seed: int) -> nn.Module:
    """The model of ``seed``, as a CLI model spec: ``random_models:cli_model --model-kwargs '{"seed": 3}'``."""
    return make_case(seed).model


EXACT = ("depthwise-separable{rank=exact}", "grouped-separable{groups=2, rank=exact}",
         "depthwise-bottleneck{rank=exact}", "grouped-bottleneck{groups=1, rank=exact}")
LOSSY = ("depthwise-separable{rank=1}", "depthwise-separable{rank=2}", "grouped{groups=2}", "grouped{groups=4}",
         "grouped-separable{groups=2, rank=1}", "grouped{groups=2},channel-shuffle", "depthwise-bottleneck{rank=2}",
         "grouped{groups=2, permute=true}",
         "grouped{groups=3}", "grouped-separable{groups=5, rank=1}")  # the last two fit few sites: skipped, reasons
BAD = ("grouped{groups=0}", "depthwise-separable{rank=0}", "no-such-pass", "grouped{groupz=2}",
       "depthwise-separable{rank=-1}", "grouped{groups=2")


def pipeline_for(seed: int) -> tuple[str, str]:
    """(pipeline, kind) of ``seed``: kind is 'exact', 'lossy', 'bad' (options or names that are wrong), 'target'
    (a MAC budget instead of a pipeline: the pipeline is the fraction), 'calibrated' (a MAC budget with calibration
    data) or 'nan' (a lossy pipeline on a model with one NaN weight)."""
    rng = random.Random(seed * 7919 + 1)
    kind = rng.choices(["exact", "lossy", "bad", "target", "calibrated", "nan"], weights=[8, 8, 2, 2, 1, 1])[0]
    if kind in ("target", "calibrated"):
        return f"{rng.choice([0.3, 0.5, 0.7, 0.9])}", kind
    return rng.choice({"exact": EXACT, "lossy": LOSSY, "bad": BAD, "nan": LOSSY + EXACT}[kind]), kind
