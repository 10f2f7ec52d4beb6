"""A tiny model zoo for the tests: each model is a few layers that exercise one situation in capture or site finding.

Every model takes one ``(N, C, H, W)`` input with ``C = model.in_channels`` (``example_input()`` builds one) and is
deterministic given ``torch.manual_seed``. ``EXPECTED`` lists, per model, the convolution sites fxrewrite should find
(qualified name and blocker reason code, in graph order); models that cannot be traced as they stand are in
``UNTRACEABLE`` with the capture option that fixes them. ``marker_line`` finds the line of a ``# MARKER`` comment.
Other test files import these models: keep them small, and add new situations as new classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations


def example_input(model: nn.Module, size: int = 16, batch: int = 2) -> torch.Tensor:
    """A random ``(batch, model.in_channels, size, size)`` input for ``model``."""
    return torch.randn(batch, int(getattr(model, "in_channels", 3)), size, size)


class Plain(nn.Module):
    """conv -> bn -> relu -> conv(stride 2) -> relu -> depthwise conv -> 1x1 conv: a plain chain."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding="same", groups=32)
        self.pw = nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.pw(self.dw(x))


class Residual(nn.Module):
    """A residual block (two 3x3 convs and a 1x1 projection shortcut) followed by a grouped conv."""

    in_channels = 8

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(8, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))
        self.shortcut = nn.Conv2d(16, 32, 1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.grouped(torch.relu(self.body(x) + self.shortcut(x)))


class GroupedConvs(nn.Module):
    """Single-input-channel, grouped and depthwise (multiplier 2) convs: each has a different grouped verdict."""

    in_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.single = nn.Conv2d(1, 8, 3, padding=1)  # one input channel: nothing to separate or group
        self.g4 = nn.Conv2d(8, 12, 3, padding=1, groups=4)  # no larger group count divides 8 and 12
        self.dw2 = nn.Conv2d(12, 24, 3, padding=1, groups=12)  # depthwise, multiplier 2
        self.g4_wide = nn.Conv2d(24, 24, 3, padding=1, groups=4)  # 8, 12 and 24 groups remain possible

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g4_wide(self.dw2(self.g4(self.single(x))))


class SharedConv(nn.Module):
    """One conv module called twice (tied weights across two call sites), plus tied weights between two modules."""

    in_channels = 8

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight  # two modules, one Parameter
        self.free = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(torch.relu(self.shared(x)))
        return self.free(self.b(self.a(x)))


class OddChannels(nn.Module):
    """Prime channel counts: no group count divides them (grouped is ineligible, separable is fine)."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 7, 3, padding=1)
        self.conv2 = nn.Conv2d(7, 11, 3, padding=(1, 2), dilation=(1, 2), padding_mode="reflect")
        self.conv3 = nn.Conv2d(11, 5, (1, 3), padding="valid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class FunctionalConv(nn.Module):
    """``F.conv2d`` with a constant weight (a site), ``torch.conv2d`` with a constant weight (a site) and
    ``F.conv2d`` whose weight is computed in the graph (a site with reason ``computed-weight``)."""

    in_channels = 4

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.1)
        self.bias = nn.Parameter(torch.zeros(8))
        self.weight2 = nn.Parameter(torch.randn(8, 8, 1, 1) * 0.1)
        self.scale = nn.Parameter(torch.ones(8, 1, 1, 1))
        self.weight3 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, stride=1, padding=1)
        x = torch.conv2d(x, self.weight2)
        return F.conv2d(x, self.weight3 * self.scale, padding="same")


class SameConv(nn.Conv2d):
    """A Conv2d subclass with its own forward, like timm's ``Conv2dSame``: TF-style dynamic 'same' padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((-(ih // -sh) - 1) * sh + kh - ih, 0)
        pad_w = max((-(iw // -sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Conv2dSubclass(nn.Module):
    """A plain conv followed by a ``SameConv`` (a Conv2d subclass): the subclass is a site with ``conv-subclass``."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.same = SameConv(8, 16, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.same(torch.relu(self.conv(x)))


class ParametrizedConv(nn.Module):
    """Convs with parametrized weights (weight_norm, spectral_norm) next to a plain one."""

    in_channels = 4

    def __init__(self) -> None:
        super().__init__()
        self.wn = parametrizations.weight_norm(nn.Conv2d(4, 8, 3, padding=1))
        self.sn = parametrizations.spectral_norm(nn.Conv2d(8, 8, 3, padding=1))
        self.plain = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain(self.sn(self.wn(x)))


class HookedConv(nn.Module):
    """A conv with a forward hook (reason ``module-hooks``) next to a plain one."""

    in_channels = 4

    def __init__(self) -> None:
        super().__init__()
        self.hooked = nn.Conv2d(4, 8, 3, padding=1)
        self.hooked.register_forward_hook(_identity_hook)
        self.plain = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain(self.hooked(x))


def _identity_hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output


class NotConv2d(nn.Module):
    """1-D, 3-D and transposed 2-D convolutions around one real Conv2d: only the Conv2d is a site."""

    in_channels = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(4, 4, 3, padding=1)
        self.conv3d = nn.Conv3d(1, 1, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.w1d = nn.Parameter(torch.randn(4, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = self.conv1d(x.flatten(2)).view(n, c, h, w)
        x = F.conv1d(x.flatten(2), self.w1d).view(n, c, h, w)
        x = self.conv3d(x.unsqueeze(1)).squeeze(1)
        return self.conv(self.up(x))


class FlagForward(nn.Module):
    """``forward(x, use_second=True)``: a Python flag that decides the path, so it needs ``concrete_args``."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.second = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, use_second: bool = True) -> torch.Tensor:
        x = self.first(x)
        if use_second:  # FLAG-BRANCH
            x = self.second(x)
        return x


class DataDependent(nn.Module):
    """An ``if`` on a tensor's value in the model's own forward: not traceable."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.mean() > 0:  # DATA-DEPENDENT-IF
            x = -x
        return x


class Gate(nn.Module):
    """A submodule with data-dependent control flow and a conv inside (only traceable as a leaf)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.amax() > 0:  # GATE-IF
            return self.conv(x)
        return x


class SubmoduleDataDependent(nn.Module):
    """``stem -> block (a Gate) -> head``: tracing fails inside ``block`` unless it is a leaf module."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Gate(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def halve_channels(x: torch.Tensor) -> torch.Tensor:
    """Keep the first half of the channels; calls ``len()`` on the tensor (needs autowrap when traced)."""
    return x[:, : len(x[0]) // 2]


class UsesLen(nn.Module):
    """Calls ``len()`` on a traced tensor inside a helper: traceable with ``autowrap_functions=(halve_channels,)``."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(halve_channels(self.conv(x)))


ZOO: dict[str, type[nn.Module]] = {
    "plain": Plain, "residual": Residual, "grouped": GroupedConvs, "shared": SharedConv, "odd": OddChannels,
    "functional": FunctionalConv, "subclass": Conv2dSubclass, "parametrized": ParametrizedConv, "hooked": HookedConv,
    "not-conv2d": NotConv2d, "flag": FlagForward, "data-dependent": DataDependent,
    "submodule-data-dependent": SubmoduleDataDependent, "uses-len": UsesLen,
}

# Per traceable model, in graph order: (site name, reason code that blocks every rewrite there, or None). Derived
# from the model definitions above, not from fxrewrite's output. Functional sites are named by their fx node; a
# module called twice is two sites. FlagForward is traced with CAPTURE's concrete_args.
EXPECTED: dict[str, tuple[tuple[str, str | None], ...]] = {
    "plain": (("conv1", None), ("conv2", None), ("dw", None), ("pw", None)),
    "residual": (("stem", None), ("body.0", None), ("body.2", None), ("shortcut", None), ("grouped", None)),
    "grouped": (("single", None), ("g4", None), ("dw2", None), ("g4_wide", None)),
    "shared": (("shared", "shared-module"), ("shared", "shared-module"), ("a", "tied-weight"), ("b", "tied-weight"),
               ("free", None)),
    "odd": (("conv1", None), ("conv2", None), ("conv3", None)),
    "functional": (("conv2d", None), ("conv2d_1", None), ("conv2d_2", "computed-weight")),
    "subclass": (("conv", None), ("same", "conv-subclass")),
    "parametrized": (("wn", "parametrized-weight"), ("sn", "parametrized-weight"), ("plain", None)),
    "hooked": (("hooked", "module-hooks"), ("plain", None)),
    "not-conv2d": (("conv", None),),
    "flag": (("first", None), ("second", None)),
}

# Capture options a model in EXPECTED needs (pass them to fxrewrite.trace / plan).
CAPTURE: dict[str, dict[str, object]] = {"flag": {"concrete_args": {"use_second": True}}}

# Models whose forward cannot be traced as it stands, with the capture option that fixes each.
UNTRACEABLE: dict[str, dict[str, object]] = {
    "data-dependent": {},
    "submodule-data-dependent": {"leaf_modules": ["block"]},
    "uses-len": {"autowrap_functions": [halve_channels]},
}


def marker_line(marker: str) -> int:
    """The 1-based line of this file that carries ``# MARKER`` (e.g. ``DATA-DEPENDENT-IF``)."""
    with open(__file__, encoding="utf-8") as f:
        lines = [i for i, text in enumerate(f, start=1) if text.rstrip().endswith(f"# {marker}")]
    assert len(lines) == 1, f"marker {marker} must appear exactly once, found {lines}"
    return lines[0]


class Three(nn.Module):
    """Three convs of different shapes (so no two sites share a configuration)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
