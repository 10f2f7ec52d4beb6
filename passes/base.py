"""Pass infrastructure: ``Pass``, ``PassResult``, the convolution-rewrite template, ``PassManager``, pipelines.

A pass is a frozen dataclass whose fields are its typed options and whose ``name`` is its CLI name. Calling a pass
on a GraphModule returns a ``PassResult(graph_module, modified, records)``, which torch's own
``torch.fx.passes.infra.pass_manager.PassManager`` accepts (it reads ``graph_module`` and ``modified``). Pipelines
parse from strings such as ``"grouped{groups=4},channel-shuffle"``.

>>> from fxrewrite.passes import parse_pipeline
>>> [type(p).__name__ for p in parse_pipeline("depthwise-separable{rank=2},grouped{groups=4}")]
['DepthwiseSeparable', 'Grouped']
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from fxrewrite.errors import ConfigError, FxRewriteError, PassFailure
from fxrewrite.graph.patterns import attr_of
from fxrewrite.graph.rewriter import PROVENANCE_KEY, caller_recompiles, finalize, portable, replace_conv
from fxrewrite.graph.select import Rule, Selection, resolve
from fxrewrite.graph.shapes import step_output_shape
from fxrewrite.graph.sites import CONV_FUNCTIONS, ConvSite, Reason, dropping_hooks, find_sites
from fxrewrite.measure.cost import conv_macs
from fxrewrite.report.report import SiteRecord

#: Reason codes that mean "this group count cannot be used at this site": an error, not a skip, for a site that a
#: rule names exactly (the user asked for that layer and that count).
GROUP_COUNT_CODES = frozenset({"channels-not-divisible", "groups-incompatible"})


@dataclass(frozen=True)
class PassResult:
    """What a pass returns; duck-compatible with ``torch.fx.passes.infra.pass_base.PassResult``."""

    graph_module: torch.fx.GraphModule
    modified: bool
    records: tuple[SiteRecord, ...] = ()


@dataclass(frozen=True)
class Pass:
    """Base of all passes. Subclasses set ``name`` and ``description`` and declare options as fields."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: the candidate generators this pass offers budgets, by form name (``Target(...)``'s ``forms=``): each maps a
    #: form's options to an object with ``candidates(site, weight, stats=None)`` (see ``fxrewrite.budget``)
    budget_forms: ClassVar[Mapping[str, Callable[..., Any]]] = MappingProxyType({})

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        return self.run(gm)

    def run(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> PassResult:
        raise NotImplementedError

    def plan(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> list[SiteRecord]:
        """The per-site decisions ``run`` would take, without changing anything."""
        raise NotImplementedError

    def validate(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> None:
        """Raise ``ConfigError`` for what ``run`` would refuse as misconfigured (here: rules that match no site),
        without building or changing anything."""
        if rules:
            resolve(rules, find_sites(gm))

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The pipeline-string form of this pass: ``name{k=v, ...}``."""
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}{{{opts}}}" if opts else self.name

    @staticmethod
    def _require(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)


@dataclass(frozen=True)
class Built:
    """A replacement for one convolution and what it costs / loses (weight-space error from the factorisation)."""

    module: nn.Module
    rel_error: float | None  # None when the new weights are a fresh initialisation (init=random)
    exact: bool
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)


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
              bias: bool, weight: torch.Tensor | None) -> nn.Conv2d:
    """A plain Conv2d on ``like``'s device and dtype; ``spatial`` keeps its kernel/stride/padding/dilation/mode.

    A pointwise (non-spatial) conv is 1x1, stride 1, no padding, padding_mode zeros. With ``weight`` given, a bias
    (``bias=True``) copies ``like``'s (zeros when ``like`` has none); with ``weight=None`` weight and bias keep
    torch's default initialisation (a fresh init, for training from scratch). requires_grad, the channels_last
    layout and the train/eval flag follow ``like``. Given weights draw nothing from the random generator.

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
        new_weight = torch.empty(conv.weight.shape, dtype=w.dtype, device=w.device)
        new_bias = torch.empty(out_channels, dtype=w.dtype, device=w.device) if bias else None
        with torch.no_grad():
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


@contextlib.contextmanager
def wrap_site_error(pass_name: str, site: str) -> Iterator[None]:
    """Re-raise anything but an ``FxRewriteError`` as ``PassFailure`` naming the pass and the site (cause chained).

    >>> with wrap_site_error("grouped", "layer1.conv"):  # doctest: +ELLIPSIS
    ...     raise ValueError("boom")
    Traceback (most recent call last):
    fxrewrite.errors.PassFailure: pass 'grouped' failed at site 'layer1.conv': ValueError: boom; ...
    """
    try:
        yield
    except FxRewriteError:
        raise
    except Exception as exc:
        raise PassFailure(f"pass {pass_name!r} failed at site {site!r}: {type(exc).__name__}: {exc}; exclude the "
                          f"site with a selection rule (select=[Rule({site!r}, skip=True)]) or report this as a "
                          "bug") from exc


def conv_module(gm: torch.fx.GraphModule, site: ConvSite) -> nn.Conv2d:
    """The site's Conv2d; for a functional ``F.conv2d`` site, an equivalent module holding its constant weights."""
    if site.kind == "module":
        module = gm.get_submodule(site.name)
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


def _meta_weight(gm: torch.fx.GraphModule, site: ConvSite) -> bool:
    if site.kind == "module":
        return bool(gm.get_submodule(site.name).weight.is_meta)
    return bool(attr_of(_function_args(gm, site)["weight"], gm).is_meta)


def sequential(*convs: nn.Conv2d, like: nn.Module) -> nn.Sequential:
    seq = nn.Sequential(*convs)
    seq.train(like.training)
    return seq


@dataclass(frozen=True)
class ConvRewritePass(Pass):
    """Template for passes that replace a Conv2d site by cheaper convolutions.

    Subclasses set ``kind`` (a rewrite kind from ``fxrewrite.graph.sites.REWRITE_KINDS``) and implement ``check`` (the
    option-specific eligibility) and ``build`` (the replacement, from the trained weight).
    """

    kind: ClassVar[str] = ""

    def check(self, site: ConvSite) -> Reason | None:
        return None

    def build(self, site: ConvSite, conv: nn.Conv2d) -> Built:
        raise NotImplementedError

    def _decide(self, site: ConvSite, selection: Selection) -> tuple[Pass, Reason | None]:
        if not selection.selected:
            return self, Reason("not-selected", "no selection rule includes this site" if selection.rule is None
                                else f"excluded by rule {selection.rule.describe()!r}")
        effective: Pass = self
        if selection.options:
            unknown = sorted(set(selection.options) - set(self.options()))
            if unknown:
                raise ConfigError(f"rule {selection.rule.describe() if selection.rule else ''!r} sets options "
                                  f"{unknown} that pass {self.name!r} does not have; valid: {sorted(self.options())}")
            effective = dataclasses.replace(self, **selection.options)
        reason = site.blocker or site.reason_for(self.kind)
        if reason is None or reason.code == "channels-not-divisible":
            # the kind-level check used default options; the pass re-checks with its actual ones
            reason = effective.check(site)  # type: ignore[attr-defined]
        return effective, reason

    def _sites(self, gm: torch.fx.GraphModule, rules: Sequence[Rule]) -> list[tuple[ConvSite, Pass, Reason | None,
                                                                                   Selection]]:
        """Each site with its effective pass (rule overrides applied), skip reason and selection. Configuration
        errors (unknown options in a rule, a group count that a layer named exactly by a rule cannot use) are raised
        together in one ``ConfigError``."""
        sites = find_sites(gm)
        selections = resolve(rules, sites) if rules else {s.name: Selection(s.name, True, None) for s in sites}
        out = []
        errors: list[str] = []
        bad_groups: list[str] = []
        for site in sites:
            selection = selections[site.name]
            try:
                effective, reason = self._decide(site, selection)
            except ConfigError as exc:
                errors.append(str(exc))
                continue
            if reason is not None and reason.code in GROUP_COUNT_CODES and _names_site(selection):
                bad_groups.append(f"{site.name}: {reason.code}: {reason.text.removeprefix(f'{site.name}: ')}")
            if reason is None and getattr(effective, "init", "random") != "random" and _meta_weight(gm, site):
                reason = Reason("meta-weight", f"{site.name}: the weight is on the meta device, so there are no "
                                "values to factorise; load real weights first, or use init=random.")
            out.append((site, effective, reason, selection))
        if bad_groups:
            errors.append(f"pass {self.name!r}: a rule names these layers, but their group count cannot be used "
                          f"there: {' '.join(bad_groups)} Give each rule a valid group count, or select the layers "
                          "with a pattern to skip the ones it does not fit")
        if errors:
            raise ConfigError("; ".join(dict.fromkeys(errors)))
        return out

    def validate(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> None:
        self._sites(gm, rules)

    def _record(self, site: ConvSite, effective: Pass, reason: Reason | None, selection: Selection,
                status: str, built: Built | None = None) -> SiteRecord:
        rule = selection.rule.describe() if selection.rule is not None else None
        common = {"site": site.name, "pass_name": self.name, "options": effective.options(), "rule": rule,
                  "params_before": site.params, "macs_before": site.macs if site.output_shape else None}
        if reason is not None:
            return SiteRecord(status="skipped", code=reason.code, reason=reason.text, params_after=site.params,
                              macs_after=common["macs_before"], **common)
        if built is None:
            return SiteRecord(status=status, **common)
        params_after, macs_after = replacement_cost(built.module, site)
        details = {**built.details, "dropped_hooks": site.hooks} if site.hooks else built.details
        return SiteRecord(status=status, params_after=params_after, macs_after=macs_after,
                          rel_error=built.rel_error, exact=built.exact, details=details, **common)

    def plan(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> list[SiteRecord]:
        records = []
        for site, effective, reason, selection in self._sites(gm, rules):
            built = None
            if reason is None:
                built = self._build(effective, site, gm)
            records.append(self._record(site, effective, reason, selection, "planned", built))
        return records

    def _build(self, effective: Pass, site: ConvSite, gm: torch.fx.GraphModule) -> Built:
        assert isinstance(effective, ConvRewritePass)
        with wrap_site_error(self.name, site.name):
            return effective.build(site, conv_module(gm, site))

    def run(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> PassResult:
        records = []
        nodes = {n.name: n for n in gm.graph.nodes}
        modified = False
        for site, effective, reason, selection in self._sites(gm, rules):
            if reason is not None:
                records.append(self._record(site, effective, reason, selection, "skipped"))
                continue
            built = self._build(effective, site, gm)
            provenance = {"pass": self.name, "site": site.name, "options": effective.options()}
            with wrap_site_error(self.name, site.name):
                replace_conv(gm, nodes[site.node], built.module, provenance)
            records.append(self._record(site, effective, None, selection, "rewritten", built))
            modified = True
        if modified:
            finalize(gm)
        return PassResult(gm, modified, tuple(records))


def _names_site(selection: Selection) -> bool:
    """Whether the site was selected by a rule that names it exactly (not a pattern, type or global rule)."""
    return selection.selected and selection.rule is not None and selection.rule.form == "exact"


def provenance(node: torch.fx.Node) -> Mapping[str, Any] | None:
    """Which pass and site produced ``node`` (None for original nodes)."""
    return node.meta.get(PROVENANCE_KEY)


class PassManager:
    """Runs a pipeline of passes; lints and recompiles after each; wraps errors with the pass that raised.

    ``drop_hooks=True`` lets the passes rewrite convs that have hooks (the new modules have none; each record counts
    them in ``details["dropped_hooks"]``); by default such convs are skipped as ``module-hooks``.

    >>> import torch
    >>> from fxrewrite.graph.capture import trace
    >>> from fxrewrite.passes import parse_pipeline
    >>> gm = trace(torch.nn.Conv2d(4, 8, 3))
    >>> result = PassManager(parse_pipeline("grouped{groups=2}"))(gm)
    >>> result.modified, result.graph_module.conv.groups
    (True, 2)

    Each pass's code is generated once (the pass's own ``finalize`` leaves it to the manager):

    >>> from unittest import mock
    >>> compile_code = torch.fx.GraphModule.recompile
    >>> manager = PassManager(parse_pipeline("depthwise-separable,grouped{groups=2}"))
    >>> gm = trace(torch.nn.Conv2d(4, 8, 3))
    >>> with mock.patch.object(torch.fx.GraphModule, "recompile", autospec=True, side_effect=compile_code) as spy:
    ...     result = manager(gm)
    >>> spy.call_count, [(r.site, r.status) for r in result.records]
    (2, [('conv', 'rewritten'), ('conv.0', 'skipped'), ('conv.1', 'rewritten')])
    """

    def __init__(self, passes: Iterable[Pass], rules: Sequence[Rule] = (), *, drop_hooks: bool = False) -> None:
        self.passes = list(passes)
        self.rules = list(rules)
        self.drop_hooks = drop_hooks

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        with dropping_hooks(gm, self.drop_hooks):
            return self._run(gm)

    def _run(self, gm: torch.fx.GraphModule) -> PassResult:
        records: list[SiteRecord] = []
        modified = False
        for p in self.passes:
            try:
                with caller_recompiles():  # the pass's finalize leaves lint and recompile to the next lines
                    result = p.run(gm, self.rules)
                gm = result.graph_module
                gm.graph.lint()
                gm.recompile()
            except ConfigError:
                raise
            except PassFailure:
                raise
            except Exception as exc:
                raise PassFailure(f"pass {p.name!r} failed: {exc}") from exc
            records.extend(result.records)
            modified |= result.modified
        return PassResult(portable(gm), modified, tuple(records))

    def plan(self, gm: torch.fx.GraphModule) -> list[SiteRecord]:
        """Plan every pass against the unchanged graph (a dry run changes nothing, so later passes see the input)."""
        records: list[SiteRecord] = []
        with dropping_hooks(gm, self.drop_hooks):
            for p in self.passes:
                records.extend(p.plan(gm, self.rules))
        return records


_SPEC = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^{}]*)\})?\s*$")


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            raise ConfigError(f"unbalanced '}}' at position {i} in pipeline {text!r}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"unbalanced '{{' in pipeline {text!r}")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def parse_value(text: str) -> Any:
    """Pipeline option literal: int, float, true/false, or a bare string."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t.strip("'\"")


def parse_pipeline(text: str, registry: Mapping[str, type[Pass]]) -> list[Pass]:
    """Parse ``"name{k=v, ...},name2"`` into pass objects; every problem is reported together."""
    passes: list[Pass] = []
    errors: list[str] = []
    for chunk in _split_top(text):
        m = _SPEC.match(chunk)
        if not m:
            errors.append(f"cannot parse {chunk!r}: expected name or name{{key=value, ...}}")
            continue
        name, body = m.group(1), m.group(2) or ""
        cls = registry.get(name)
        if cls is None:
            errors.append(f"unknown pass {name!r}; valid passes: {', '.join(sorted(registry))}")
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for item in (s for s in body.split(",") if s.strip()):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq:
                errors.append(f"{name}: option {item.strip()!r} needs a value (key=value)")
            elif key not in fields:
                valid = ", ".join(f"{k}={_default(f)}" for k, f in fields.items()) or "none"
                errors.append(f"{name}: unknown option {key!r}; valid options: {valid}")
            elif key in kwargs:
                errors.append(f"{name}: option {key!r} is given more than once ({key}={kwargs[key]}, "
                              f"{key}={parse_value(value)}); give it once")
            else:
                kwargs[key] = parse_value(value)
        try:
            passes.append(cls(**kwargs))
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("invalid pipeline: " + "; ".join(errors))
    if not passes:
        raise ConfigError(f"empty pipeline {text!r}; valid passes: {', '.join(sorted(registry))}")
    return passes


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default if f.default is not dataclasses.MISSING else "(required)"
