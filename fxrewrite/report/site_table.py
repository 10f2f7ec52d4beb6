"""The per-site eligibility table that ``fxrewrite plan`` prints when no pass is given. Its verdict columns are
given by the caller: ``(header, verdict)`` pairs, a verdict mapping a site to None (eligible) or a ``Reason``; the
front end passes one per registered pass that declares a column (``fxrewrite.passes.registry.eligibility_columns``).

>>> import torch
>>> from fxrewrite.graph.capture import trace
>>> from fxrewrite.graph.shapes import propagate_shapes
>>> from fxrewrite.graph.sites import find_sites
>>> gm = trace(torch.nn.Conv2d(4, 8, 3))
>>> propagate_shapes(gm, (torch.randn(1, 4, 8, 8),))
>>> lines = sites_table(find_sites(gm), columns=[("1x1?", lambda s: None)]).splitlines()
>>> lines[0].split(), lines[2].split()
(['site', 'conv', 'output', 'MACs', '1x1?'], ['conv', '4->8', 'k3x3', '1x8x6x6', '10.37K', 'yes'])
>>> print(lines[-1])
1 convolution site(s); MACs: 1 MAC = one multiply-add, bias not counted; FLOPs = 2 x MACs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tabulate import tabulate

from fxrewrite.graph.sites import ConvSite, Reason
from fxrewrite.util.formatting import fmt_int

#: a verdict column: its header and, per site, None (eligible) or why not
Column = tuple[str, Callable[[ConvSite], Reason | None]]


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


def sites_table(sites: Sequence[ConvSite], tablefmt: str = "simple", columns: Sequence[Column] = ()) -> str:
    """One row per site: name, spec, output shape, MACs and, per column, 'yes' or the reason code."""
    rows = []
    for site in sites:
        shape = "x".join(map(str, site.output_shape)) if site.output_shape else "?"
        reasons = [verdict(site) for _, verdict in columns]
        verdicts = ["yes" if reason is None else reason.code for reason in reasons]
        rows.append([site.name, _spec_text(site), shape, fmt_int(site.macs), *verdicts])
    headers = ["site", "conv", "output", "MACs", *(header for header, _ in columns)]
    footer = (f"{len(sites)} convolution site(s); MACs: 1 MAC = one multiply-add, bias not counted; "
              "FLOPs = 2 x MACs.")
    return f"{tabulate(rows, headers=headers, tablefmt=tablefmt)}\n{footer}"
