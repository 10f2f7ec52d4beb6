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
from fxrewrite.maths.column_sketch import DEFAULT_MEMORY_CAP, ColumnSketch, sketch_width
from fxrewrite.maths.im2col import im2col
from fxrewrite.maths.output_error import SiteStats
from fxrewrite.passes.building import conv_module
from fxrewrite.util.distributed import all_reduce, is_distributed
from fxrewrite.util.inputs import batch_size_of, calibration_inputs, check_reiterable, to_device
from fxrewrite.util.runtime import device_of, eval_mode

__all__ = ["DEFAULT_MEMORY_CAP", "collect_site_stats", "site_memory"]


class _GramSum:
    """Running sums for one site: Gram and column sums of the im2col columns (float32 per chunk, float64 sums), or,
    with ``width``, a column sketch (``fxrewrite.maths.column_sketch``) and the exact output energy instead.

    A dense site first keeps the columns themselves while there are at most ``d`` of them (one process): the
    statistics are then the exact factor ``F = X`` (``method == "columns"``, at most the Gram's memory) and every
    error formula costs ``O(m d n)`` per group count instead of ``O(d^2 k)``, with no Gram product at all (resnet's
    deep layers on a few calibration images: 392 columns of d = 4,608). More columns fold into the Gram."""

    def __init__(self, conv: nn.Conv2d, device: torch.device | None, cap: int, width: int | None = None) -> None:
        g = conv.groups
        d = conv.in_channels // g * conv.kernel_size[0] * conv.kernel_size[1]
        self.conv = conv
        self.cap = cap
        # im2col elements per chunk: float32 + float64 copies within cap / 8 (64 MiB float32 at the default cap)
        self.chunk = min(_GRAM_CHUNK, max(1, cap // 64 if width is None else cap // 160))
        self.sketch = None if width is None else ColumnSketch(g, d, width, device=device)
        dense = self.sketch is None
        self.columns: list[Tensor] | None = [] if dense and not is_distributed() else None
        self.limit = d  # columns kept while there are at most this many
        self.seen = 0
        self.shape, self.device = (g, d), device
        self.gram: Tensor | None = None  # allocated by the first columns folded in (a columns site never needs it)
        self.sums: Tensor | None = None
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.energy = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: Tensor) -> None:
        n = x.shape[0]
        per_sample = max(1, math.prod(int(v) for v in x.shape[1:]) * self.conv.kernel_size[0]
                         * self.conv.kernel_size[1])
        # a large sample alone: im2col's columns are then a view of the unfolded input (the (G, d, N*L) layout of
        # several samples is a copy: 0.2 s of the statistics of resnet18 at 224 on 8 images)
        step = 1 if per_sample >= _ONE_SAMPLE_FROM else max(1, self.chunk // per_sample)
        for i in range(0, n, step):
            cols = im2col(self.conv, x[i:i + step].detach())
            cols = cols if cols.dtype in (torch.float32, torch.float64) else cols.float()
            self.count += cols.shape[-1]
            if self.sketch is not None:
                self.sketch.add(cols)
                self.energy += self._output(cols).square().sum()
                continue
            self.seen += cols.shape[-1]
            if self.columns is not None:
                shared = cols.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                self.columns.append(cols.clone() if shared else cols)  # an activation may be changed in place later
                if self.seen <= self.limit:
                    continue
                kept, self.columns = self.columns, None  # too many columns: the Gram is cheaper from now on
                for c in kept:
                    self._accumulate(c)
                continue
            self._accumulate(cols)

    def _accumulate(self, cols: Tensor) -> None:
        if self.gram is None or self.sums is None:
            g, d = self.shape
            self.gram = torch.zeros(g, d, d, dtype=torch.float64, device=self.device)
            self.sums = torch.zeros(g, d, dtype=torch.float64, device=self.device)
        _add_gram(self.gram, cols)
        self.sums += cols.sum(dim=-1).to(torch.float64)

    def _output(self, cols: Tensor) -> Tensor:
        """The conv's output on ``cols`` (G, m, n), computed in ``cols``' dtype, returned in float64."""
        conv = self.conv
        g, m = conv.groups, conv.out_channels // conv.groups
        y = conv.weight.detach().reshape(g, m, -1).to(cols.dtype) @ cols
        y = y.to(torch.float64)
        return y if conv.bias is None else y + conv.bias.detach().to(torch.float64).reshape(g, m, 1).to(cols.device)

    def stats(self) -> SiteStats:
        conv = self.conv
        g, m = conv.groups, conv.out_channels // conv.groups
        w = conv.weight.detach().to(torch.float64).reshape(g, m, -1).cpu()  # the statistics are read on the CPU
        if self.columns is not None:
            kept = torch.cat(self.columns, dim=-1)
            self.columns = None
            energy = float(self._output(kept).square().sum())  # in the columns' dtype, as the sketch's
            factor = kept.to(torch.float64)
            return SiteStats(None, w, energy, int(self.count), factor=factor.cpu(), method="columns",
                             memory_cap=self.cap, taps=conv.kernel_size[0] * conv.kernel_size[1])
        if self.sketch is not None:
            all_reduce(self.sketch.factor, self.count, self.energy)
            return SiteStats(None, w, float(self.energy), int(self.count), factor=self.sketch.columns().cpu(),
                             method=self.sketch.method, memory_cap=self.cap,
                             taps=conv.kernel_size[0] * conv.kernel_size[1])
        assert self.gram is not None and self.sums is not None
        all_reduce(self.gram, self.sums, self.count)
        bias = None if conv.bias is None else conv.bias.detach().to(torch.float64).reshape(g, m).cpu()
        return SiteStats.from_gram(self.gram.cpu(), w, bias, self.sums.cpu(), int(self.count), memory_cap=self.cap)


def _add_gram(gram: Tensor, cols: Tensor) -> None:
    """``gram += cols @ cols^T`` (float64 sums of products in ``cols``' dtype) from the blocks on and above the
    diagonal only, mirrored: with ``b`` row blocks of at least 72 rows (at most 8), ``(b + 1) / 2b`` of the full
    product (9/16 at b = 8), the symmetric rank-k update a BLAS ``syrk`` would do. (One thread, float32 columns:
    d = 576 and 12,544 columns 72 ms with 2 blocks of 288 rows, 58 ms with 8 of 72; d = 147, 50,176 columns 29 ms
    in one block, 24 ms in 2.)"""
    d = cols.shape[-2]
    b = max(1, min(8, d // 72))
    if b == 1:
        gram += (cols @ cols.mT).to(torch.float64)
        return
    edges = [d * i // b for i in range(b + 1)]
    for i in range(b):
        rows = cols[..., edges[i]:edges[i + 1], :]
        block = (rows @ cols[..., edges[i]:, :].mT).to(torch.float64)  # (g, rows, d - lo): this block row, upward
        gram[..., edges[i]:edges[i + 1], edges[i]:] += block
        if i + 1 < b:
            gram[..., edges[i + 1]:, edges[i]:edges[i + 1]] += block[..., edges[i + 1] - edges[i]:].mT


_GRAM_CHUNK = 1 << 24  # float32 im2col elements per chunk (64 MiB): bounds the transient memory of a batch
_ONE_SAMPLE_FROM = 1 << 18  # im2col elements per sample from which samples are unfolded one at a time


def site_memory(spec: Any, cap: int, columns: int | None = None) -> tuple[int, int, int | None]:
    """``(kept, working, width)`` for a conv ``spec`` under ``cap`` bytes: the bytes its statistics keep, the bytes
    the formulas and the accumulation need on top while it is in use, and the sketch width (None: the dense Gram).
    The dense ``G x d x d`` float64 Gram is used when it and its working set (a float32 and a float64 copy while
    accumulating, the float32 matrices of the error formulas) take at most ``cap``: 3x the Gram; otherwise a
    column sketch of ``sketch_width(cap, G, d)`` columns (a quarter of the cap) and a working set of half the cap.
    ``columns``: the unfolded columns the data will give, when known; at most ``d`` of them are kept themselves
    (``G x d x columns`` float64, working set twice that) instead of the Gram.

    >>> spec = torch.nn.Conv2d(512, 512, 3, device="meta")  # resnet's largest 3x3 conv: a 170 MB Gram
    >>> [b >> 20 for b in site_memory(spec, 1 << 30)[:2]], [b >> 20 for b in site_memory(spec, 1 << 30, 392)[:2]]
    ([162, 324], [13, 27])
    """
    g = spec.groups
    d = spec.in_channels // g * spec.kernel_size[0] * spec.kernel_size[1]
    gram = g * d * d * 8
    if 3 * gram <= cap:
        if columns is not None and columns <= d and not is_distributed():
            return g * d * columns * 8, 2 * g * d * columns * 8, None
        return gram, 2 * gram, None
    width = sketch_width(cap, g, d)
    return g * d * width * 8, cap // 2, width


def _samples(gm: torch.fx.GraphModule, data: Iterable[Any], input_fn: Callable[[Any], Sequence[Any]] | None
             ) -> int | None:
    """The number of samples in ``data`` when it is a sequence of input tuples (or tensors, no ``input_fn``) shaped,
    beyond the batch dimension, like the inputs ``gm``'s shapes were propagated from (so that every site's output
    positions per sample are known); None otherwise."""
    if input_fn is not None or not isinstance(data, Sequence):
        return None
    recorded = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    total = 0
    for item in data:
        if not isinstance(item, Tensor | tuple | list):
            return None
        inputs = calibration_inputs(item)
        if len(inputs) > len(recorded):
            return None
        for x, val in zip(inputs, recorded, strict=False):
            if isinstance(x, Tensor) != isinstance(val, Tensor):
                return None
            if isinstance(x, Tensor) and (x.dim() == 0 or tuple(x.shape[1:]) != tuple(val.shape[1:])):
                return None
        total += batch_size_of(inputs)
    return total


def _conv_input(node: torch.fx.Node) -> torch.fx.Node:
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, torch.fx.Node):
        raise ConfigError(f"conv node {node.name!r} has no tensor input node; calibration cannot observe it")
    return x


def collect_site_stats(gm: torch.fx.GraphModule, sites: Sequence[ConvSite], data: Iterable[Any], *,
                       input_fn: Callable[[Any], Sequence[Any]] | None = None,
                       max_bytes: int = DEFAULT_MEMORY_CAP) -> Iterator[tuple[ConvSite, SiteStats]]:
    """``(site, SiteStats)`` for every site, in graph order, from running ``gm`` (eval mode, no grad) on ``data``
    (input tuples or tensors; ``input_fn`` maps items to inputs).

    ``max_bytes`` is the **memory cap** of the statistics and of the error formulas that read them (default 1 GiB;
    ``choose_plan(max_gram_bytes=...)``). A site whose dense Gram with its working set fits (``site_memory``: 3x
    the Gram) keeps the ``G x d x d`` Gram (``SiteStats.method == "gram"``, unchanged); a larger one keeps a column
    sketch of ``d x l`` numbers instead (``"columns"``: exact, the unfolded columns themselves, while the data has
    at most ``l`` of them; ``"sketch"``: an unbiased count sketch beyond, output errors within a few percent, see
    ``fxrewrite.maths.column_sketch``), and its output energy exactly. Sites are taken in chunks whose kept
    statistics plus the largest working set fit the cap (one pass over the data per chunk, stopping at the
    chunk's last input), and each chunk's statistics are yielded before the next is collected."""
    cap = int(max_bytes)
    if cap < 1 << 20:
        raise ConfigError(f"the calibration memory cap must be at least 1 MiB, got {max_bytes!r} bytes")
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    todo = sorted(sites, key=lambda s: order[nodes[s.node]])
    chunks: list[list[ConvSite]] = []
    widths: dict[str, int | None] = {}
    size = work = 0
    samples = _samples(gm, data, input_fn)
    for s in todo:
        positions = math.prod(s.output_shape[2:]) if samples is not None and s.output_shape is not None else None
        kept, working, widths[s.name] = site_memory(s.spec, cap, None if positions is None else samples * positions)
        if not chunks or size + kept + max(work, working) > cap:
            chunks.append([])
            size = work = 0
        chunks[-1].append(s)
        size, work = size + kept, max(work, working)
    if len(chunks) > 1:
        check_reiterable(data)
    device = device_of(gm)
    for chunk in chunks:
        sums = {s.name: _GramSum(conv_module(gm, s), device, cap, widths[s.name]) for s in chunk}
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
