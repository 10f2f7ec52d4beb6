"""The per-site eligibility table that ``fxrewrite plan`` prints when no pass is given.

>>> import torch
>>> from fxrewrite.graph.capture import trace
>>> from fxrewrite.graph.shapes import propagate_shapes
>>> from fxrewrite.graph.sites import find_sites
>>> gm = trace(torch.nn.Conv2d(4, 8, 3))
>>> propagate_shapes(gm, (torch.randn(1, 4, 8, 8),))
>>> print(sites_table(find_sites(gm)).splitlines()[-1])
1 convolution site(s); MACs: 1 MAC = one multiply-add, bias not counted; FLOPs = 2 x MACs.
"""

from __future__ import annotations

from collections.abc import Sequence

from tabulate import tabulate

from fxrewrite.graph.sites import REWRITE_KINDS, ConvSite
from fxrewrite.util.formatting import fmt_int

SHORT = {"depthwise-separable": "dw-sep", "grouped-separable": "grouped-sep", "grouped": "grouped"}


def _spec_text(site: ConvSite) -> str:
    s = site.spec
    parts = [f"{s.in_channels}->{s.out_channels}", f"k{s.kernel_size[0]}x{s.kernel_size[1]}"]
    if s.stride != (1, 1):
        parts.append(f"s{s.stride[0]}" if s.stride[0] == s.stride[1] else f"s{s.stride}")
    if s.dilation != (1, 1):
        parts.append(f"d{s.dilation[0]}")
    if s.groups != 1:
        parts.append(f"g{s.groups}")
    if s.padding_mode != "zeros":
        parts.append(s.padding_mode)
    return " ".join(parts)


def sites_table(sites: Sequence[ConvSite], tablefmt: str = "simple") -> str:
    """One row per site: name, spec, output shape, MACs and, per rewrite kind, 'yes' or the reason code."""
    rows = []
    for site in sites:
        shape = "x".join(map(str, site.output_shape)) if site.output_shape else "?"
        verdicts = [("yes" if site.reason_for(k) is None else site.reason_for(k).code) for k in REWRITE_KINDS]
        rows.append([site.name, _spec_text(site), shape, fmt_int(site.macs), *verdicts])
    headers = ["site", "conv", "output", "MACs", *(SHORT[k] for k in REWRITE_KINDS)]
    footer = (f"{len(sites)} convolution site(s); MACs: 1 MAC = one multiply-add, bias not counted; "
              "FLOPs = 2 x MACs.")
    return f"{tabulate(rows, headers=headers, tablefmt=tablefmt)}\n{footer}"
