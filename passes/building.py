"""Building replacements: plain ``Conv2d`` modules from a site's conv (``make_conv``), chains of them
(``sequential``), the site's conv as a module (``conv_module``) and the cost of a replacement (``replacement_cost``).

>>> from torch import nn
>>> like = nn.Conv2d(4, 8, 3)
>>> pointwise = make_conv(like, 4, 8, groups=1, spatial=False, bias=True, weight=None)
>>> pointwise.kernel_size, [c.kernel_size for c in convs_of(sequential(like, pointwise, like=like))]
((1, 1), [(3, 3), (1, 1)])
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import FxRewriteError
from fxrewrite.graph.patterns import attr_of
from fxrewrite.graph.shapes import step_output_shape
from fxrewrite.graph.sites import CONV_FUNCTIONS, ConvSite
from fxrewrite.measure.cost import conv_macs
from fxrewrite.util.runtime import submodule


def convs_of(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _chain(module: nn.Module) -> Iterator[nn.Module]:
    """The steps of a replacement in order: its Conv2d modules and, between them, the conv-free modules."""
    if isinstance(module, nn.Conv2d) or not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        yield module
        return
    for child in module.children():
        yield from _chain(child)


def replacement_cost(module: nn.Module, site: ConvSite) -> tuple[int, int | None]:
    """(params, MACs) of a replacement: its convs form a chain (as every rewrite builds them), and each one is
    counted at the spatial size it computes, from the site's input shape on: the 1x1 in front of a strided kxk conv
    (a bottleneck's first conv) runs at the input resolution, the rest at the output resolution.

    >>> from fxrewrite.graph.sites import find_sites
    >>> from fxrewrite.graph.capture import trace
    >>> from fxrewrite.graph.shapes import propagate_shapes
    >>> gm = trace(nn.Conv2d(8, 16, 3, stride=2, padding=1))
    >>> propagate_shapes(gm, (torch.randn(1, 8, 16, 16),))
    >>> first_1x1_then_strided = nn.Sequential(nn.Conv2d(8, 4, 1), nn.Conv2d(4, 16, 3, stride=2, padding=1))
    >>> replacement_cost(first_1x1_then_strided, find_sites(gm)[0])[1] == 16 * 16 * 4 * 8 + 8 * 8 * 16 * 4 * 9
    True
    """
    params = sum(p.numel() for p in module.parameters())
    if site.input_shape is None or site.output_shape is None:
        return params, None
    shape, macs = site.input_shape, 0
    for step in _chain(module):
        if isinstance(step, nn.Conv2d) and shape[-3] != step.in_channels:
            raise FxRewriteError(f"{site.name}: the replacement's convolutions are not a chain ({step.in_channels} "
                                 f"input channels after {shape[-3]} output channels); its MACs cannot be counted")
        shape = step_output_shape(shape, step)
        if isinstance(step, nn.Conv2d):  # a shape-only step (e.g. a channel repeat) has 0 MACs
            macs += conv_macs(shape, step.in_channels, step.groups, step.kernel_size)
    if shape != site.output_shape:
        raise FxRewriteError(f"{site.name}: the replacement computes shape {shape}, the site {site.output_shape}")
    return params, macs


class _UninitialisedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose constructor skips the default initialisation; :func:`make_conv` builds one on the meta
    device, gives it its real parameters and turns it into a plain ``nn.Conv2d`` (``__class__``) at once."""

    def reset_parameters(self) -> None:
        pass


def make_conv(like: nn.Conv2d, in_channels: int, out_channels: int, *, groups: int, spatial: bool,
              bias: bool, weight: torch.Tensor | None, fresh: bool = False) -> nn.Conv2d:
    """A plain Conv2d on ``like``'s device and dtype; ``spatial`` keeps its kernel/stride/padding/dilation/mode.

    A pointwise (non-spatial) conv is 1x1, stride 1, no padding, padding_mode zeros. With ``weight`` given, a bias
    (``bias=True``) copies ``like``'s (zeros when ``like`` has none); with ``weight=None`` weight and bias keep
    torch's default initialisation (a fresh init, for training from scratch). requires_grad, the channels_last
    layout and the train/eval flag follow ``like``. Given weights draw nothing from the random generator.
    ``fresh=True`` says that ``weight`` was made for this conv alone and nothing else holds it (a factorisation's
    output): it becomes the parameter's storage without a copy where its dtype, device, shape and layout fit.

    >>> like = nn.Conv2d(4, 8, 3, padding=1).requires_grad_(False).eval()
    >>> rng = torch.random.get_rng_state()
    >>> conv = make_conv(like, 4, 8, groups=1, spatial=True, bias=True, weight=like.weight)
    >>> type(conv) is nn.Conv2d, conv.padding, conv.training, conv.weight.requires_grad, conv.bias.requires_grad
    (True, (1, 1), False, False, False)
    >>> torch.equal(conv.weight, like.weight), torch.equal(conv.bias, like.bias)
    (True, True)
    >>> torch.equal(torch.random.get_rng_state(), rng)
    True
    """
    w = like.weight
    kwargs: dict[str, Any] = {"device": w.device, "dtype": w.dtype, "bias": bias, "groups": groups}
    if spatial:
        kwargs |= {"kernel_size": like.kernel_size, "stride": like.stride, "padding": like.padding,
                   "dilation": like.dilation, "padding_mode": like.padding_mode}
    else:
        kwargs |= {"kernel_size": 1}
    channels_last = w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    if weight is None:
        conv = nn.Conv2d(in_channels, out_channels, **kwargs)
        if channels_last:
            conv.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last))
        conv.weight.requires_grad_(w.requires_grad)
        if conv.bias is not None and like.bias is not None:
            conv.bias.requires_grad_(like.bias.requires_grad)
    else:  # built on meta without the default init (it would only be overwritten), then given real parameters
        conv = _UninitialisedConv2d(in_channels, out_channels, **(kwargs | {"device": "meta"}))
        conv.__class__ = nn.Conv2d
        adopt = (fresh and weight.shape == conv.weight.shape and weight.dtype == w.dtype and weight.device == w.device
                 and weight.is_contiguous() and not channels_last)
        new_weight = weight.detach() if adopt else torch.empty(conv.weight.shape, dtype=w.dtype, device=w.device)
        new_bias = torch.empty(out_channels, dtype=w.dtype, device=w.device) if bias else None
        with torch.no_grad():
            if not adopt:
                new_weight.copy_(weight)
            if new_bias is not None:
                new_bias.copy_(like.bias) if like.bias is not None else new_bias.zero_()
        if channels_last:  # converted as in the fresh-init branch: the same strides, also on size-1 dimensions
            new_weight = new_weight.contiguous(memory_format=torch.channels_last)
        conv.weight = nn.Parameter(new_weight, requires_grad=w.requires_grad)
        if new_bias is not None:
            conv.bias = nn.Parameter(new_bias, requires_grad=like.bias is None or like.bias.requires_grad)
    conv.training = like.training  # a leaf module: what train(like.training) sets
    return conv


def conv_module(gm: torch.fx.GraphModule, site: ConvSite) -> nn.Conv2d:
    """The site's Conv2d; for a functional ``F.conv2d`` site, an equivalent module holding its constant weights."""
    if site.kind == "module":
        module = submodule(gm, site.name)
        assert isinstance(module, nn.Conv2d)
        return module
    bound = _function_args(gm, site)
    weight = attr_of(bound["weight"], gm)
    s = site.spec
    conv = nn.Conv2d(s.in_channels, s.out_channels, s.kernel_size, s.stride, s.padding, s.dilation, s.groups,
                     s.bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if s.bias:
            conv.bias.copy_(attr_of(bound["bias"], gm))
    conv.weight.requires_grad_(weight.requires_grad)
    conv.train(gm.training)
    return conv


def _function_args(gm: torch.fx.GraphModule, site: ConvSite) -> dict[str, Any]:
    """input / weight / bias arguments of a functional conv site (found through the graph's op/target index)."""
    node = next(n for t in CONV_FUNCTIONS for n in gm.graph.find_nodes(op="call_function", target=t)
                if n.name == site.node)
    names = ("input", "weight", "bias")
    return dict(zip(names, node.args, strict=False)) | {k: v for k, v in node.kwargs.items() if k in names}


def meta_weight(gm: torch.fx.GraphModule, site: ConvSite) -> bool:
    """Whether the site's weight is on the meta device (no values to factorise)."""
    if site.kind == "module":
        return bool(submodule(gm, site.name).weight.is_meta)
    return bool(attr_of(_function_args(gm, site)["weight"], gm).is_meta)


def sequential(*convs: nn.Conv2d, like: nn.Module) -> nn.Sequential:
    seq = nn.Sequential(*convs)
    seq.train(like.training)
    return seq
