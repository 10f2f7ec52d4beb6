"""Convolution sites: every 2-D convolution in a GraphModule, with its spec, shapes and eligibility.

A site is a ``call_module`` node whose module is an ``nn.Conv2d`` (exact type: subclasses are listed but never
treated as plain), or a ``call_function`` of ``F.conv2d`` / ``torch.conv2d``. Finding sites is pure: the graph is
never edited. Each site says, for each rewrite kind, whether it is eligible, and if not a reason code and a sentence.
1-D, 3-D and transposed convolutions are not sites.

>>> import torch
>>> from fxrewrite.graph.capture import trace
>>> from fxrewrite.graph.shapes import propagate_shapes
>>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=8)))
>>> propagate_shapes(gm, (torch.randn(1, 3, 16, 16),))
>>> [(s.name, getattr(s.reason_for("depthwise-separable"), "code", None)) for s in find_sites(gm)]
[('0', None), ('1', 'already-depthwise')]
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import operator
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fxrewrite.graph.patterns import CONV2D_FUNCTION, CONV2D_MODULE, Pattern
from fxrewrite.graph.shapes import shape_of

CONV_FUNCTIONS = (F.conv2d, torch.conv2d)
_MODULE_PATTERN = Pattern((CONV2D_MODULE,))
_FUNCTION_PATTERN = Pattern((CONV2D_FUNCTION,))
#: the structural rewrite kinds whose site-level checks ``ConvSite.eligibility`` carries (``reason_for``); a pass opts
#: into one with ``ConvRewritePass.kind``. Which passes exist, and the dry-run table's columns, come from the pass
#: registry (``fxrewrite.passes``), not from here.
REWRITE_KINDS = ("depthwise-separable", "grouped-separable", "grouped")
#: ``gm.meta`` key set by ``dropping_hooks``: convs with hooks are then sites like any other (see there).
DROP_HOOKS_KEY = "fxrewrite_drop_hooks"


@dataclass(frozen=True)
class Reason:
    """Why a site is not rewritten: a stable machine-readable ``code`` and a sentence for people."""

    code: str
    text: str

    def __str__(self) -> str:
        return f"{self.code}: {self.text}"


@dataclass(frozen=True)
class ConvSpec:
    """The hyper-parameters of a 2-D convolution (padding is a pair of ints or 'same' / 'valid')."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    bias: bool
    padding_mode: str = "zeros"

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels and self.in_channels > 1

    @property
    def is_grouped(self) -> bool:
        return 1 < self.groups < self.in_channels

    def valid_groups(self) -> list[int]:
        """Group counts g > current groups that a grouped conv of this shape could use (g | I, g | O, groups | g):
        the divisors of gcd(I, O) that are multiples of ``groups``, ascending (found up to the square root).

        >>> ConvSpec(12, 18, (3, 3), (1, 1), (1, 1), (1, 1), 2, False).valid_groups()
        [6]
        """
        common = math.gcd(self.in_channels, self.out_channels)
        small = [d for d in range(1, math.isqrt(common) + 1) if common % d == 0]
        divisors = sorted({*small, *(common // d for d in small)})
        return [g for g in divisors if g > self.groups and g % self.groups == 0]


@dataclass(frozen=True)
class ConvSite:
    """One convolution call in the graph.

    ``name`` is the module's qualified name (the node name for a functional conv); ``blocker`` is a reason that
    stops every rewrite (None when the site is rewritable in principle); ``eligibility`` gives, per rewrite kind,
    None (eligible with default options) or the reason it is not. ``hooks`` counts the module's own hooks, which a
    rewrite drops (only under ``dropping_hooks``; otherwise they block it).
    """

    name: str
    node: str
    kind: str  # "module" or "function"
    module_type: str
    spec: ConvSpec
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    dtype: str
    blocker: Reason | None
    eligibility: tuple[tuple[str, Reason | None], ...]
    hooks: int = 0

    def reason_for(self, kind: str) -> Reason | None:
        return dict(self.eligibility)[kind]

    @property
    def macs(self) -> int:
        """MACs of this convolution (1 MAC = one multiply-add, bias not counted); 0 without shapes."""
        if self.output_shape is None:
            return 0
        s = self.spec
        return _numel(self.output_shape) * (s.in_channels // s.groups) * s.kernel_size[0] * s.kernel_size[1]

    @property
    def params(self) -> int:
        s = self.spec
        weights = s.out_channels * (s.in_channels // s.groups) * s.kernel_size[0] * s.kernel_size[1]
        return weights + (s.out_channels if s.bias else 0)


def _numel(shape: Iterable[int]) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


def _pair(value: int | Iterable[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = tuple(value)
    return (int(a), int(b))


def spec_of_module(conv: nn.Conv2d) -> ConvSpec:
    padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
    return ConvSpec(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), _pair(conv.stride), padding,
                    _pair(conv.dilation), conv.groups, conv.bias is not None, conv.padding_mode)


def _module_blocker(conv: nn.Module, call_count: int, tied: bool, drop_hooks: bool) -> Reason | None:
    if parametrize.is_parametrized(conv) or hasattr(conv, "weight_g") or hasattr(conv, "weight_orig"):
        return Reason("parametrized-weight", "the weight is parametrized (weight_norm / spectral_norm / "
                      "parametrize); remove the parametrization first (e.g. parametrize.remove_parametrizations).")
    if type(conv) is not nn.Conv2d:
        cls = type(conv)
        own = cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward
        how = "with its own forward" if own else "(not exactly nn.Conv2d)"
        return Reason("conv-subclass", f"{cls.__name__} subclasses nn.Conv2d {how}; it is not treated as a plain "
                      "convolution. Replace it by nn.Conv2d (or rewrite it with a pass that knows it) first.")
    hooks = hook_counts(conv)
    if hooks and not drop_hooks:
        listed = ", ".join(f"{n} {kind} hook{'s' if n > 1 else ''}" for kind, n in hooks.items())
        return Reason("module-hooks", f"the module has {listed}; a rewrite would drop them, so it is left alone. "
                      "Remove the hooks first (handle.remove()), or pass drop_hooks=True, to rewrite it.")
    if call_count > 1:
        return Reason("shared-module", f"the module is called from {call_count} places; rewriting one call would "
                      "untie the weights.")
    if tied:
        return Reason("tied-weight", "the weight is shared with another module; rewriting would untie it.")
    return None


def hook_counts(module: nn.Module) -> dict[str, int]:
    """The module's own hooks by kind (forward, forward-pre, backward, backward-pre), only kinds it has.

    >>> conv = nn.Conv2d(1, 1, 1)
    >>> _ = conv.register_forward_hook(lambda m, a, o: o)
    >>> hook_counts(conv)
    {'forward': 1}
    """
    counts = {"forward": len(module._forward_hooks), "forward-pre": len(module._forward_pre_hooks),
              "backward": len(module._backward_hooks), "backward-pre": len(module._backward_pre_hooks)}
    return {kind: n for kind, n in counts.items() if n}


@contextlib.contextmanager
def dropping_hooks(gm: torch.fx.GraphModule, enabled: bool = True) -> Iterator[None]:
    """Within the block, ``find_sites(gm)`` does not block convs that have hooks: a rewrite replaces the module and
    so drops its hooks (``ConvSite.hooks`` counts them for the report). The user asks for this with
    ``drop_hooks=True``; ``gm`` is fxrewrite's own copy, so the input model keeps its hooks.
    """
    if not enabled:
        yield
        return
    gm.meta[DROP_HOOKS_KEY] = True
    try:
        yield
    finally:
        gm.meta.pop(DROP_HOOKS_KEY, None)


def separable_saves(spec: ConvSpec, groups: int) -> bool:
    """Whether a (grouped-)separable split with ``groups`` groups (a multiple of ``spec.groups`` dividing
    in_channels) at rank 1, the cheapest rank, costs fewer MACs than the conv. Both convs of the split run at the
    output resolution, so per output position: ``I*K + groups*O/G`` (kxk conv I -> groups, 1x1 conv groups -> O in
    the conv's G groups) against ``O*(I/G)*K``; multiplied by G: ``G*I*K + groups*O < O*I*K``. With one input
    channel (an audio stem ``Conv2d(1, C, (K, 1))``) this is ``K + C < C*K``: a rank-r split is a rank-r
    factorisation of the C x K filter bank, costing r*(K + C) instead of K*C.

    >>> separable_saves(ConvSpec(1, 128, (512, 1), (4, 1), (0, 0), (1, 1), 1, True), 1)
    True
    >>> separable_saves(ConvSpec(8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8, False), 8)  # depthwise, multiplier 1
    False
    """
    i, o, g_src = spec.in_channels, spec.out_channels, spec.groups
    k = spec.kernel_size[0] * spec.kernel_size[1]
    return g_src * i * k + groups * o < o * i * k


def _kind_reasons(spec: ConvSpec) -> tuple[tuple[str, Reason | None], ...]:
    """Per rewrite kind: None (eligible with its default options) or why not. A separable kind is refused only where
    its cheapest option (rank 1; for grouped-separable the fewest groups, the conv's own) costs no fewer MACs than
    the conv, and only for the shapes where that is structural (already depthwise, a 1x1 kernel, one input channel
    per group); whatever the channel counts, a split that saves MACs is a candidate. Any other conv stays eligible,
    as a user may ask for an exact split that costs more."""
    i, o, g_src = spec.in_channels, spec.out_channels, spec.groups
    k = spec.kernel_size[0] * spec.kernel_size[1]
    structural = spec.is_depthwise or k == 1 or i // g_src == 1
    out: dict[str, Reason | None] = {}
    if spec.is_depthwise:
        saves = (f"a per-channel split would cost I*K + O={i * k + o} MACs per position at rank 1 against the conv's "
                 f"O*K={o * k}, so it {'could' if separable_saves(spec, i) else 'would not'} save MACs, but it is "
                 "not offered") if o > i else (f"a depthwise kxk + 1x1 split costs at least I*K + O={i * k + o} MACs "
                                               f"per position (rank 1) against the conv's O*K={o * k}")
        out["depthwise-separable"] = Reason(
            "already-depthwise", f"groups={g_src} equals in_channels: already depthwise (the separable forms' own "
            f"kxk conv); {saves}.")
    elif separable_saves(spec, i) or not structural:
        out["depthwise-separable"] = None
    elif k == 1:
        out["depthwise-separable"] = Reason(
            "pointwise-kernel", f"1x1 kernel: a depthwise 1x1 (multiplier r) + 1x1 split costs r*I*(1 + O/G) MACs per "
            f"position, more than the conv's I*O/G={i * o // g_src} at every r (grouped-separable with few groups "
            "can still save).")
    else:
        out["depthwise-separable"] = Reason(
            "no-saving", f"a depthwise kxk + 1x1 split costs at least I*K + I*O/G={i * k + i * o // g_src} MACs per "
            f"position (rank 1), no fewer than the conv's O*(I/G)*K={o * (i // g_src) * k}.")
    if spec.is_depthwise:
        out["grouped-separable"] = out["depthwise-separable"]
    elif separable_saves(spec, g_src) or not structural:
        out["grouped-separable"] = None
    else:
        out["grouped-separable"] = Reason(
            "no-saving", f"a grouped kxk + 1x1 split costs at least I*K + O={i * k + o} MACs per position (rank 1, "
            f"{g_src} group(s)), no fewer than the conv's O*(I/G)*K={o * (i // g_src) * k}.")
    valid = spec.valid_groups()
    if spec.is_depthwise:
        out["grouped"] = Reason("already-depthwise", f"groups={g_src} equals in_channels: already depthwise, no "
                                "larger group count exists.")
    elif not valid and spec.is_grouped:
        out["grouped"] = Reason("already-grouped", f"already grouped (groups={spec.groups}) and no larger group count "
                                f"(a multiple of {spec.groups}) divides in_channels={spec.in_channels} and "
                                f"out_channels={spec.out_channels}: {spec.groups} is the only valid group count.")
    elif not valid:
        out["grouped"] = Reason("channels-not-divisible", f"no group count g > {spec.groups} divides "
                                f"in_channels={spec.in_channels} and out_channels={spec.out_channels}.")
    else:
        out["grouped"] = None
    return tuple((k, out[k]) for k in REWRITE_KINDS)


def _const_tensor(gm: torch.fx.GraphModule, arg: object) -> torch.Tensor | None:
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        value = operator.attrgetter(str(arg.target))(gm)
        if isinstance(value, torch.Tensor):
            return value
    return None


def _function_site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> ConvSite | None:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    weight_arg = bound.get("weight")
    weight = _const_tensor(gm, weight_arg)
    val = weight_arg.meta.get("val") if isinstance(weight_arg, torch.fx.Node) else None
    w_shape = tuple(weight.shape) if weight is not None else (tuple(val.shape) if val is not None else None)
    if w_shape is None or len(w_shape) != 4:
        return None  # not a 2-D conv we can describe (1-D/3-D through F.conv2d is impossible; unknown shape)
    for key, default in defaults.items():
        bound.setdefault(key, default)
    padding = bound["padding"]
    groups = int(bound["groups"]) if isinstance(bound["groups"], int) else 1
    spec = ConvSpec(int(w_shape[1]) * groups, int(w_shape[0]), (int(w_shape[2]), int(w_shape[3])),
                    _pair(bound["stride"]), padding if isinstance(padding, str) else _pair(padding),
                    _pair(bound["dilation"]), groups, bound["bias"] is not None)
    blocker = None
    bias_arg = bound["bias"]
    if weight is None or (bias_arg is not None and _const_tensor(gm, bias_arg) is None):
        blocker = Reason("computed-weight", "the weight or bias is computed in the graph, not a constant attribute.")
    elif not all(isinstance(bound[k], int | tuple | list | str) for k in ("stride", "padding", "dilation", "groups")):
        blocker = Reason("computed-weight", "stride/padding/dilation/groups are computed in the graph.")
    return _make_site(node.name, node, "function", getattr(node.target, "__name__", str(node.target)), spec, blocker)


def _make_site(name: str, node: torch.fx.Node, kind: str, module_type: str, spec: ConvSpec,
               blocker: Reason | None, hooks: int = 0) -> ConvSite:
    input_node = node.args[0] if node.args else node.kwargs.get("input")
    input_shape = shape_of(input_node) if isinstance(input_node, torch.fx.Node) else None
    val = node.meta.get("val")
    dtype = str(val.dtype).removeprefix("torch.") if isinstance(val, torch.Tensor) else "unknown"
    eligibility = tuple((k, blocker) for k in REWRITE_KINDS) if blocker else _kind_reasons(spec)
    return ConvSite(name, node.name, kind, module_type, spec, input_shape, shape_of(node), dtype, blocker,
                    eligibility, hooks)


_REMEMBERED: contextvars.ContextVar[dict[int, tuple[tuple[Any, ...], list[ConvSite]]] | None] = \
    contextvars.ContextVar("fxrewrite_remembered_sites", default=None)


@contextlib.contextmanager
def sites_remembered() -> Iterator[None]:
    """Within the block ``find_sites(gm)`` gives its last answer again while ``gm``'s graph holds the same node
    objects in the same order (and the same ``dropping_hooks`` state): for a caller whose every change to the
    modules goes through new nodes (fxrewrite's rewriter does: a replaced conv is a new node), so that the capture,
    the passes' validation and the first pass find the sites once instead of three times.

    >>> from fxrewrite.graph.capture import trace
    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3)))
    >>> with sites_remembered():
    ...     find_sites(gm)[0] is find_sites(gm)[0]
    True
    """
    token = _REMEMBERED.set({})
    try:
        yield
    finally:
        _REMEMBERED.reset(token)


def find_sites(gm: torch.fx.GraphModule) -> list[ConvSite]:
    """All 2-D convolution sites of ``gm`` in graph order (shapes are filled when ``propagate_shapes`` ran).

    Conv nodes are found with the ``CONV2D_MODULE`` / ``CONV2D_FUNCTION`` patterns of ``fxrewrite.graph.patterns``.
    Convs with hooks are blocked (``module-hooks``) unless inside ``dropping_hooks(gm)``.
    """
    remembered = _REMEMBERED.get()
    if remembered is None:
        return _find_sites(gm)
    # the nodes themselves (held, so no id of a dropped node can be reused), the hooks flag and the graph
    key = (gm.graph, bool(getattr(gm, "meta", {}).get(DROP_HOOKS_KEY)), *gm.graph.nodes)
    known = remembered.get(id(gm))
    if known is not None and len(known[0]) == len(key) and all(a is b for a, b in zip(known[0], key, strict=True)):
        return list(known[1])
    sites = _find_sites(gm)
    remembered[id(gm)] = (key, sites)
    return list(sites)


def _find_sites(gm: torch.fx.GraphModule) -> list[ConvSite]:
    drop_hooks = bool(getattr(gm, "meta", {}).get(DROP_HOOKS_KEY))
    modules = dict(gm.named_modules(remove_duplicate=False))
    conv_nodes = {m["conv"] for m in _MODULE_PATTERN.match(gm)}
    calls = Counter(str(n.target) for n in conv_nodes)
    # _parameters, not .weight: reading a parametrized weight would run the parametrization (spectral_norm's power
    # iteration updates buffers in training mode), and finding sites must not change anything.
    weight_owners = Counter(id(w) for _, m in gm.named_modules() if isinstance(m, nn.Conv2d)
                            and (w := m._parameters.get("weight")) is not None)
    functional = {m["conv"] for m in _FUNCTION_PATTERN.match(gm)}
    sites: list[ConvSite] = []
    for node in gm.graph.nodes:
        if node in conv_nodes:
            conv = modules[str(node.target)]
            own_weight = conv._parameters.get("weight")
            tied = own_weight is not None and weight_owners[id(own_weight)] > 1
            blocker = _module_blocker(conv, calls[str(node.target)], tied, drop_hooks)
            sites.append(_make_site(str(node.target), node, "module", type(conv).__name__, spec_of_module(conv),
                                    blocker, sum(hook_counts(conv).values())))
        elif node in functional:
            site = _function_site(gm, node)
            if site is not None:
                sites.append(site)
    return sites


@dataclass(frozen=True)
class HiddenConv:
    """A convolution of the module that is not a site: a ``Conv2d`` no node of the graph calls (``not-visible``),
    or a convolution of another kind (``not-conv2d``: 1-d, 3-d, transposed), which fxrewrite does not rewrite."""

    name: str
    container: str | None  # the leaf module whose call hides it (None when nothing in the graph calls it)
    reason: Reason


def hidden_convs(gm: torch.fx.GraphModule, original: nn.Module | None = None) -> list[HiddenConv]:
    """Every ``nn.Conv2d`` in ``gm`` that the graph does not call: inside a leaf module (``leaf_modules``, a
    subclass with its own forward, any module called as a whole), or never called by the traced forward.

    A traced GraphModule keeps only the submodules its graph uses, so a conv that the traced forward never calls
    (a branch not taken under ``concrete_args``) is not in ``gm`` at all: pass the ``original`` model to list those
    too (after the ones in ``gm``, with ``container=None``). Convolutions that are not 2-d (``nn.Conv1d``,
    ``nn.Conv3d``, transposed convs) come last, with the code ``not-conv2d``.

    >>> from fxrewrite.graph.capture import trace
    >>> block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 3, 1), block), leaf_modules=["1"])
    >>> [(h.name, h.container, h.reason.code) for h in hidden_convs(gm)]
    [('1.0', '1', 'not-visible')]
    """
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    out = []
    for name, module in gm.named_modules():
        if not isinstance(module, nn.Conv2d) or name in called:
            continue
        parts = name.split(".")
        container = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                          if ".".join(parts[:i]) in called), None)
        if container is not None:
            why = (f"inside {container!r}, which the graph calls as one opaque module (a leaf module): its "
                   "convolutions are not visible. Drop it from leaf_modules (if tracing allows) to rewrite them.")
        else:
            why = "no node of the traced graph calls it (unused, or only used under a branch the trace did not take)."
        out.append(HiddenConv(name, container, Reason("not-visible", why)))
    if original is not None:
        present = {name for name, _ in gm.named_modules()}
        why = ("no node of the traced graph calls it (unused, or only used under a branch the trace did not take), "
               "so the traced module does not hold it.")
        out += [HiddenConv(name, None, Reason("not-visible", why)) for name, module in original.named_modules()
                if isinstance(module, nn.Conv2d) and name not in present]
    for name, module in (original or gm).named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.Conv2d):
            out.append(HiddenConv(name, None, Reason(
                "not-conv2d", f"a {type(module).__name__}: fxrewrite rewrites 2-d convolutions (nn.Conv2d, F.conv2d) "
                              "only, so it is left as it is.")))
    return out


def check_groups(site: ConvSite, groups: int, *, out_divisible: bool) -> Reason | None:
    """Why ``groups`` cannot be used at ``site`` (None when it can).

    A grouped conv needs g | in_channels and g | out_channels (``out_divisible``) and g > 1; a grouped-separable
    split needs only g | in_channels (g = the conv's own groups, e.g. 1, is a plain rank-r split). Either way g must
    be a multiple of the site's current groups (its weight is block-diagonal).
    """
    s = site.spec
    first = max(2, s.groups) if out_divisible else s.groups  # a separable split may keep the conv's groups
    valid = [g for g in range(first, s.in_channels + 1)
             if s.in_channels % g == 0 and g % s.groups == 0 and (not out_divisible or s.out_channels % g == 0)]
    if groups < 1:
        return Reason("invalid-option", f"groups={groups} must be >= 1.")
    if groups == s.groups and out_divisible:
        larger = [g for g in valid if g > s.groups]
        return Reason("already-grouped", f"{site.name}: already has groups={groups}; valid larger group counts: "
                      f"{larger or 'none'}.")
    if groups % s.groups:
        return Reason("groups-incompatible", f"{site.name}: groups={groups} is not a multiple of the existing "
                      f"groups={s.groups} (in_channels={s.in_channels}, out_channels={s.out_channels}); valid: "
                      f"{valid}.")
    if s.in_channels % groups or (out_divisible and s.out_channels % groups):
        channels = f"in_channels={s.in_channels}" + (f", out_channels={s.out_channels}" if out_divisible else "")
        return Reason("channels-not-divisible", f"{site.name}: {channels} not divisible by groups={groups}; "
                      f"valid group counts: {valid}.")
    return None
