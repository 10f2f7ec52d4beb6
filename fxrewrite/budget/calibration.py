"""Calibration statistics for budgets: run the graph on calibration batches and sum, per conv site, the Gram matrix of
its unfolded input patches and its output energy (``collect_site_stats``; no activation is kept). The closed-form
output errors of every candidate come from these (``fxrewrite.maths.output_error``).

>>> import torch
>>> from fxrewrite.graph.capture import trace
>>> from fxrewrite.graph.sites import find_sites
>>> gm = trace(torch.nn.Conv2d(4, 8, 3))
>>> batches = [torch.randn(2, 4, 6, 6), torch.randn(1, 4, 6, 6)]
>>> [(site.name, tuple(stats.gram.shape), stats.columns)
...  for site, stats in collect_site_stats(gm, find_sites(gm), batches)]  # 3 images x 4 x 4 output positions
[('conv', (1, 36, 36), 48)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.recorder import node_values
from fxrewrite.graph.sites import ConvSite
from fxrewrite.maths.im2col import im2col
from fxrewrite.maths.output_error import SiteStats
from fxrewrite.passes.building import conv_module
from fxrewrite.util.distributed import all_reduce
from fxrewrite.util.inputs import calibration_inputs, check_reiterable, to_device
from fxrewrite.util.runtime import device_of, eval_mode

__all__ = ["collect_site_stats"]


class _GramSum:
    """Running sums for one site: Gram and column sums of the im2col columns (float32 per chunk, float64 sums)."""

    def __init__(self, conv: nn.Conv2d, device: torch.device | None) -> None:
        g = conv.groups
        d = conv.in_channels // g * conv.kernel_size[0] * conv.kernel_size[1]
        self.conv = conv
        self.gram = torch.zeros(g, d, d, dtype=torch.float64, device=device)
        self.sums = torch.zeros(g, d, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: Tensor) -> None:
        n = x.shape[0]
        per_sample = max(1, math.prod(int(v) for v in x.shape[1:]) * self.conv.kernel_size[0]
                         * self.conv.kernel_size[1])
        step = max(1, _GRAM_CHUNK // per_sample)
        for i in range(0, n, step):
            cols = im2col(self.conv, x[i:i + step].detach())
            cols = cols if cols.dtype in (torch.float32, torch.float64) else cols.float()
            self.gram += (cols @ cols.mT).to(torch.float64)
            self.sums += cols.sum(dim=-1).to(torch.float64)
            self.count += cols.shape[-1]

    def stats(self) -> SiteStats:
        all_reduce(self.gram, self.sums, self.count)
        conv = self.conv
        g, m = conv.groups, conv.out_channels // conv.groups
        w = conv.weight.detach().to(torch.float64).reshape(g, m, -1).to(self.gram.device)
        energy = float(((w @ self.gram) * w).sum())
        if conv.bias is not None:
            b = conv.bias.detach().to(torch.float64).reshape(g, m).to(self.gram.device)
            energy += float(2 * (b * (w @ self.sums[..., None])[..., 0]).sum() + self.count * b.square().sum())
        return SiteStats(self.gram.cpu(), w.cpu(), energy, int(self.count))


_GRAM_CHUNK = 1 << 24  # float32 im2col elements per chunk (64 MiB): bounds the transient memory of a batch


def _conv_input(node: torch.fx.Node) -> torch.fx.Node:
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, torch.fx.Node):
        raise ConfigError(f"conv node {node.name!r} has no tensor input node; calibration cannot observe it")
    return x


def collect_site_stats(gm: torch.fx.GraphModule, sites: Sequence[ConvSite], data: Iterable[Any], *,
                       input_fn: Callable[[Any], Sequence[Any]] | None = None,
                       max_bytes: int = 1 << 30) -> Iterator[tuple[ConvSite, SiteStats]]:
    """``(site, SiteStats)`` for every site, in graph order, from running ``gm`` (eval mode, no grad) on ``data``
    (input tuples or tensors; ``input_fn`` maps items to inputs). Sites are taken in chunks whose Gram matrices
    fit ``max_bytes`` together (one pass over the data per chunk, stopping at the chunk's last input), and each
    chunk's statistics are yielded before the next is collected, so memory stays bounded."""
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    todo = sorted(sites, key=lambda s: order[nodes[s.node]])
    chunks: list[list[ConvSite]] = []
    size = 0
    for s in todo:
        d = s.spec.in_channels // s.spec.groups * s.spec.kernel_size[0] * s.spec.kernel_size[1]
        need = s.spec.groups * d * d * 8
        if not chunks or size + need > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(s)
        size += need
    if len(chunks) > 1:
        check_reiterable(data)
    device = device_of(gm)
    for chunk in chunks:
        sums = {s.name: _GramSum(conv_module(gm, s), device) for s in chunk}
        inputs_of: dict[torch.fx.Node, list[str]] = {}
        for s in chunk:
            inputs_of.setdefault(_conv_input(nodes[s.node]), []).append(s.name)
        stop = max(inputs_of, key=order.__getitem__)
        batches = 0
        with torch.no_grad(), eval_mode(gm):
            for item in data:
                inputs = to_device(calibration_inputs(item, input_fn), device)
                for node, value in node_values(gm, inputs, inputs_of, stop=stop):
                    if not isinstance(value, Tensor) or value.dim() != 4:
                        raise ConfigError(f"calibration: the input of conv site(s) {inputs_of[node]} is not a 4-D "
                                          "tensor")
                    for name in inputs_of[node]:
                        sums[name].add(value)
                batches += 1
        if batches == 0:
            raise ConfigError("calibration data is empty: give at least one batch of inputs")
        for s in chunk:
            yield s, sums.pop(s.name).stats()
