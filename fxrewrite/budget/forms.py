"""Budget forms: the candidate generators a budget chooses among (``make_form`` / ``parse_forms`` read them from
strings such as ``"grouped-separable{groups=4|8, max_rank=16}"``; ``DEFAULT_FORMS`` are used when none are given).

>>> [f.name for f in parse_forms("depthwise-separable, tucker2")]
['depthwise-separable', 'tucker2']
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fxrewrite.errors import ConfigError
from fxrewrite.graph.sites import ConvSite, check_groups
from fxrewrite.maths import factorize
from fxrewrite.maths.output_error import (
    SiteStats,
    grouped_output_error,
    separable_output_errors,
    tucker2_output_errors,
)
from fxrewrite.maths.spectra import group_spectra, pareto_mask, tail_errors
from fxrewrite.passes.candidates import Candidate, Form, make_candidate

__all__ = [
    "DEFAULT_FORMS",
    "DepthwiseSeparableForm",
    "GroupedForm",
    "GroupedSeparableForm",
    "Tucker2Form",
    "form_names",
    "make_form",
    "parse_forms",
]

DEFAULT_FORMS = ("depthwise-separable", "grouped-separable", "grouped")


def _pixels(shape: tuple[int, ...] | None, channels: int) -> int:
    """Positions per channel (batch x spatial) of an NCHW shape."""
    if shape is None:
        return 0
    return math.prod(int(d) for d in shape) // max(channels, 1)


def _dims(site: ConvSite) -> tuple[int, int, int, int, int]:
    s = site.spec
    return s.in_channels, s.out_channels, s.kernel_size[0] * s.kernel_size[1], s.groups, (s.out_channels if s.bias
                                                                                          else 0)


def _separable_candidates(form: str, site: ConvSite, weight: Tensor, group_counts: Iterable[int],
                          max_rank: int | None, with_groups: bool, stats: SiteStats | None = None
                          ) -> list[Candidate]:
    i, o, k, big_g, bias = _dims(site)
    group_counts = list(group_counts)
    if not group_counts:
        return []
    pix = _pixels(site.output_shape, o)
    if stats is None:
        total = float(weight.detach().to(torch.float64).square().sum())
        spectra = group_spectra(weight, big_g, group_counts)
    rows, opts = [], []
    for g in group_counts:
        errors = tail_errors(spectra[g], total) if stats is None else separable_output_errors(stats, g)
        full = min(o // big_g, (i // g) * k)
        top = full if max_rank is None else min(full, max_rank)
        r = np.arange(1, top + 1)
        per_pixel = g * r * (i // g) * k + o * (g * r // big_g)
        err = np.where(r >= full, 0.0, errors[np.minimum(r, len(errors) - 1)])
        rows.append(np.stack([pix * per_pixel, per_pixel + bias, err], axis=1).astype(np.float64))
        opts.extend((g, int(x)) for x in r)
    a = np.concatenate(rows)
    out = []
    for j in np.flatnonzero(pareto_mask(a)):
        g, r = opts[j]
        out.append(make_candidate(form, {"groups": g, "rank": r} if with_groups else {"rank": r}, int(a[j, 0]),
                              int(a[j, 1]), float(a[j, 2])))
    return out


@dataclass(frozen=True)
class DepthwiseSeparableForm:
    """``depthwise-separable{rank=T}`` for T = 1 .. the exact rank (or ``max_rank``)."""

    max_rank: int | None = None
    name: str = "depthwise-separable"
    pass_name: str = "depthwise-separable"
    calibrated: ClassVar[bool] = True

    def candidates(self, site: ConvSite, weight: Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("depthwise-separable") is not None:
            return []
        return _separable_candidates(self.pass_name, site, weight, [site.spec.in_channels], self.max_rank, False,
                                     stats)


@dataclass(frozen=True)
class GroupedSeparableForm:
    """``grouped-separable{groups=g, rank=r}`` for every valid g (or those in ``groups``) below in_channels (g =
    in_channels is depthwise-separable) and r = 1 .. the exact rank (or ``max_rank``)."""

    groups: tuple[int, ...] | None = None
    max_rank: int | None = None
    name: str = "grouped-separable"
    pass_name: str = "grouped-separable"
    calibrated: ClassVar[bool] = True

    def candidates(self, site: ConvSite, weight: Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("grouped-separable") is not None:
            return []
        s = site.spec
        options = self.groups if self.groups is not None else range(2, s.in_channels)
        valid = [g for g in options if g != s.groups and g >= 1 and check_groups(site, g, out_divisible=False) is None]
        return _separable_candidates(self.pass_name, site, weight, valid, self.max_rank, True, stats)


@dataclass(frozen=True)
class GroupedForm:
    """``grouped{groups=g}`` for every valid g (or those in ``groups``): block-diagonal truncation."""

    groups: tuple[int, ...] | None = None
    name: str = "grouped"
    pass_name: str = "grouped"
    calibrated: ClassVar[bool] = True

    def candidates(self, site: ConvSite, weight: Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("grouped") is not None:
            return []
        i, o, k, big_g, bias = _dims(site)
        options = self.groups if self.groups is not None else site.spec.valid_groups()
        valid = [g for g in options if g >= 2 and check_groups(site, g, out_divisible=True) is None]
        if not valid:
            return []
        pix = _pixels(site.output_shape, o)
        energy = factorize.dense_weight(weight.detach().to(torch.float64), big_g).square().sum(dim=(2, 3))  # O x I
        total = float(energy.sum())
        out = []
        for g in valid:
            if stats is not None:
                err = grouped_output_error(stats, g)
            else:
                kept = float(torch.diagonal(energy.reshape(g, o // g, g, i // g).sum(dim=(1, 3))).sum())
                err = 0.0 if total <= 0.0 else math.sqrt(max(total - kept, 0.0) / total)
            per_pixel = o * (i // g) * k
            out.append(make_candidate(self.pass_name, {"groups": g}, pix * per_pixel, per_pixel + bias, err))
        return out


@dataclass(frozen=True)
class Tucker2Form:
    """``grouped-bottleneck{groups=1, rank=R}`` (Tucker-2: 1x1 I->R, kxk R->R, 1x1 R->O) for R = 1 .. the exact rank
    (or ``max_rank``). The predicted error is that of the truncated HOSVD (top-R left singular vectors of the mode-O
    and mode-I unfoldings, core = projection); the pass starts from the sequentially truncated HOSVD and refines it
    with HOOI, which in practice ends at or below that (it is not a proven bound). The first 1x1 runs at the input
    resolution (strided convs). With calibration statistics the error is that HOSVD's output error; at grouped
    convs it is not offered then (the dense candidate's output error needs the cross-group input statistics)."""

    max_rank: int | None = None
    name: str = "tucker2"
    pass_name: str = "grouped-bottleneck"
    calibrated: ClassVar[bool] = True

    def candidates(self, site: ConvSite, weight: Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("depthwise-separable") is not None:
            return []
        if stats is not None and site.spec.groups > 1:
            return []
        i, o, k, big_g, bias = _dims(site)
        w = factorize.dense_weight(weight.detach().to(torch.float64), big_g).reshape(o, i, k)
        total = float(w.square().sum())
        mode_o, mode_i = w.reshape(o, i * k), w.transpose(0, 1).reshape(i, o * k)
        u = torch.linalg.eigh(mode_o @ mode_o.mT).eigenvectors.flip(-1)  # descending
        v = torch.linalg.eigh(mode_i @ mode_i.mT).eigenvectors.flip(-1)
        core = torch.einsum("oik,op,iq->pqk", w, u, v).square().sum(dim=-1)  # energy per (mode-O, mode-I) pair
        kept = core.cumsum(0).cumsum(1)  # kept[a, b]: energy of the top a+1 x b+1 core
        full = max(min(o, i * k), min(i, o * k))
        top = full if self.max_rank is None else min(full, self.max_rank)
        pix_out, pix_in = _pixels(site.output_shape, o), _pixels(site.input_shape, i)
        out = []
        calibrated = tucker2_output_errors(stats, u, v, range(1, top + 1)) if stats is not None else None
        for r in range(1, top + 1):
            energy = float(kept[min(r, o) - 1, min(r, i) - 1])
            err = 0.0 if r >= full or total <= 0.0 else math.sqrt(min(max(total - energy, 0.0) / total, 1.0))
            if calibrated is not None:
                err = 0.0 if r >= full else calibrated[r - 1]
            params = i * r + r * r * k + o * r
            macs = pix_in * i * r + pix_out * (r * r * k + o * r)
            out.append(make_candidate(self.pass_name, {"groups": 1, "rank": r}, macs, params + bias, err))
        return out


_FORMS: dict[str, Callable[..., Form]] = {"depthwise-separable": DepthwiseSeparableForm,
                                          "grouped-separable": GroupedSeparableForm, "grouped": GroupedForm,
                                          "tucker2": Tucker2Form}
_FORM_SPEC = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^{}]*)\})?\s*$")


def make_form(spec: str | Form) -> Form:
    """A form from its name, optionally with options: ``"grouped-separable{groups=4|8, max_rank=16}"``
    (``|`` separates several group counts). Form objects pass through.

    >>> make_form("grouped{groups=2|4}")
    GroupedForm(groups=(2, 4), name='grouped', pass_name='grouped')
    """
    if not isinstance(spec, str):
        if isinstance(spec, Form):
            return spec
        raise ConfigError(f"forms must be names ({', '.join(form_names())}) or Form objects, got {spec!r}")
    m = _FORM_SPEC.match(spec)
    if not m or m.group(1) not in _FORMS:
        raise ConfigError(f"unknown budget form {spec!r}; valid: {', '.join(form_names())} (options in braces, e.g. "
                          "grouped-separable{groups=4|8})")
    cls = _FORMS[m.group(1)]
    names = {f.name for f in dataclasses.fields(cls)} - {"name", "pass_name"}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for item in (s for s in (m.group(2) or "").split(",") if s.strip()):
        key, _, value = (p.strip() for p in item.partition("="))
        if key not in names:
            raise ConfigError(f"budget form {m.group(1)!r}: unknown option {key!r}; valid: {', '.join(sorted(names))}")
        try:
            values = tuple(int(v) for v in value.split("|"))
        except ValueError as exc:
            raise ConfigError(f"budget form {m.group(1)!r}: {key}={value!r} must be integers") from exc
        kwargs[key] = values if key == "groups" else values[0]
    return cls(**kwargs)


def form_names() -> tuple[str, ...]:
    """The names ``make_form`` accepts.

    >>> form_names()
    ('depthwise-separable', 'grouped-separable', 'grouped', 'tucker2')
    """
    return tuple(_FORMS)


def parse_forms(text: str) -> list[Form]:
    """Forms from a comma-separated list (commas inside braces belong to the options), e.g. the CLI's ``--forms``.

    >>> [f.name for f in parse_forms("depthwise-separable, grouped-separable{groups=4|8, max_rank=16}")]
    ['depthwise-separable', 'grouped-separable']
    """
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    forms = [make_form(p.strip()) for p in parts if p.strip()]
    if not forms:
        raise ConfigError(f"no budget forms in {text!r}; valid: {', '.join(form_names())}")
    return forms
