"""Every built-in conv rewrite declares its cost once (``ConvRewritePass.cost``, from the shapes alone): it must equal
the independent count, ``replacement_cost`` of the module the pass actually builds, over a spread of shapes (odd and
non-square kernels, strides, dilation, 'valid' padding, one input channel, grouped and depthwise source convs, with
and without bias) and options (ranks including ``exact``, group counts, lowerings); and an array of ranks gives the
costs of each rank at once (what budgets use)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.graph.sites import ConvSite, find_sites
from fxrewrite.passes import REGISTRY, ConvRewritePass
from fxrewrite.passes.building import conv_module, replacement_cost
from fxrewrite.passes.costs import Cost

#: (conv, input shape) pairs
CONVS: list[tuple[nn.Conv2d, tuple[int, ...]]] = [
    (nn.Conv2d(8, 16, 3, padding=1), (2, 8, 9, 9)),
    (nn.Conv2d(6, 12, (3, 5), stride=2, padding=(1, 2)), (1, 6, 11, 13)),  # odd, non-square kernel, strided
    (nn.Conv2d(1, 8, 3), (1, 1, 7, 7)),  # one input channel, 'valid'
    (nn.Conv2d(8, 16, 3, padding=1, groups=2, bias=False), (1, 8, 8, 8)),  # grouped source
    (nn.Conv2d(12, 12, (5, 3), stride=(2, 1), padding=2, dilation=2, groups=3), (1, 12, 15, 10)),
    (nn.Conv2d(4, 6, 1, stride=2), (3, 4, 8, 8)),  # strided 1x1
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 6, 6)),  # depthwise source
    (nn.Conv2d(16, 24, 7, stride=3, bias=False), (1, 16, 23, 20)),
]

#: per built-in pass: the option sets to try (those a site refuses with a reason are skipped there)
OPTIONS: dict[str, list[dict[str, Any]]] = {
    "depthwise-separable": [{"rank": r, "lowering": lo} for r, lo in
                            itertools.product((1, 2, 5, "exact"), ("direct", "tile", "repeat"))],
    "grouped-separable": [{"groups": g, "rank": r} for g, r in itertools.product((1, 2, 3, 4, 6, 12),
                                                                                  (1, 3, "exact"))],
    "grouped": [{"groups": g} for g in (2, 3, 4, 6, 8, 12)],
    "depthwise-bottleneck": [{"rank": r} for r in (1, 3, 8, "exact")],
    "grouped-bottleneck": [{"groups": g, "rank": r} for g, r in ((1, 1), (1, 5), (2, 4), (4, 8), (1, "exact"),
                                                                 (2, "exact"))],
}


def _site(conv: nn.Conv2d, shape: tuple[int, ...]) -> tuple[torch.fx.GraphModule, ConvSite]:
    gm = trace(conv)
    propagate_shapes(gm, (torch.randn(shape),))
    (site,) = find_sites(gm)
    return gm, site


def _builtin_conv_passes() -> list[type[ConvRewritePass]]:
    return [cls for cls in REGISTRY.values()
            if issubclass(cls, ConvRewritePass) and cls.__module__.startswith("fxrewrite.passes.")]


def test_every_builtin_conv_pass_is_covered() -> None:
    assert {cls.name for cls in _builtin_conv_passes()} == set(OPTIONS)


def _cases(cls: type[ConvRewritePass]) -> Iterator[tuple[str, torch.fx.GraphModule, ConvSite, ConvRewritePass]]:
    for (conv, shape), options in itertools.product(CONVS, OPTIONS[cls.name]):
        gm, site = _site(conv, shape)
        p = cls(**options, init="random")  # type: ignore[call-arg]
        if p.check(site) is None:
            yield f"{site.spec} {options}", gm, site, p


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_declared_cost_equals_the_built_module(name: str) -> None:
    cls = REGISTRY[name]
    assert issubclass(cls, ConvRewritePass)
    checked = 0
    for label, gm, site, p in _cases(cls):
        built = p.build(site, conv_module(gm, site))
        params, macs = replacement_cost(built.module, site)
        declared = cls.cost(site.spec, site.input_shape, site.output_shape, **p.options())
        assert (declared.macs, declared.params) == (macs, params), label
        checked += 1
    assert checked >= 10, f"{name}: only {checked} shape/option combinations apply"


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_passes_records_use_the_same_numbers(name: str) -> None:
    """What a run reports per site (``macs_after`` / ``params_after``) is what the pass declares."""
    cls = REGISTRY[name]
    assert issubclass(cls, ConvRewritePass)
    _, gm, site, p = next(_cases(cls))  # the first conv, and the first option set it takes
    (record,) = p.run(gm).records
    declared = cls.cost(site.spec, site.input_shape, site.output_shape, **p.options())
    assert record.status == "rewritten" and (record.macs_after, record.params_after) == (declared.macs,
                                                                                       declared.params)


@pytest.mark.parametrize(("name", "options"), [("depthwise-separable", {}), ("grouped-separable", {"groups": 4}),
                                               ("depthwise-bottleneck", {}), ("grouped-bottleneck", {"groups": 2})])
def test_an_array_of_ranks_gives_every_rank_at_once(name: str, options: dict[str, Any]) -> None:
    cls = REGISTRY[name]
    _, site = _site(*CONVS[0])
    ranks = np.arange(2, 17, 2)
    together = cls.cost(site.spec, site.input_shape, site.output_shape, rank=ranks, **options)  # type: ignore
    one_by_one = [cls.cost(site.spec, site.input_shape, site.output_shape, rank=int(r), **options)  # type: ignore
                  for r in ranks]
    assert together.macs.tolist() == [c.macs for c in one_by_one]
    assert together.params.tolist() == [c.params for c in one_by_one]


def test_cost_defaults_and_unknown_options() -> None:
    grouped = REGISTRY["grouped"]
    _, site = _site(*CONVS[0])
    default = grouped.cost(site.spec, site.input_shape, site.output_shape)  # type: ignore[attr-defined]
    assert default == grouped.cost(site.spec, site.input_shape, site.output_shape, groups=4)  # type: ignore
    assert isinstance(default, Cost) and default + default == Cost(2 * default.macs, 2 * default.params)
    with pytest.raises(ConfigError, match="unknown option"):
        grouped.cost(site.spec, site.input_shape, site.output_shape, rank=2)  # type: ignore[attr-defined]
    with pytest.raises(NotImplementedError, match="declares no analytic cost"):
        ConvRewritePass.cost(site.spec, site.input_shape, site.output_shape)
