"""Every torchvision classification model through each rewrite kind, with the numbers each one must give.

On every model (random weights, float32) but the four wide copies in ``SAME_STRUCTURE`` (see below):

- ``depthwise-separable{rank=exact}`` reproduces the model (and, on one model per family, ``rank=1`` runs, keeps
  shapes and cuts MACs).
- ``grouped-separable{groups=4, rank=exact}`` reproduces the model.
- ``grouped{groups=4}`` (``init=block``) reproduces a block-diagonal copy of the model: the off-block-diagonal weights
  of every eligible conv are zeroed first, so keeping the block diagonal loses nothing; MACs drop 4x per site.

"Reproduces" is float level: relative L2 error at the output within ``FLOAT32_EXACT`` (float64 depthwise convs take
a slow reference path on the CPU; ``test_depthwise_separable_exact_in_float64`` keeps the float64 check with
``torch.testing.assert_close`` defaults on one model per family). For each kind, the sites rewritten must be exactly
those the documented rules predict from the module attributes (``eligible``), and every other site is skipped with
one of the listed reason codes. Sites a kind cannot take (1x1 kernels for the separable kinds, depthwise convs,
channel counts not divisible by 4, convs already grouped with a count that 4 is not a multiple of) are skipped, which
is fine: ViT and Swin (whose one conv is the 3-channel patch projection) have no grouped or grouped-separable site.

On one model per family (``FAMILIES``: the larger members repeat its structure, and on the widest grouped models
the shuffle check alone takes 20-40 s each):

- ``channel-shuffle{rule=all}`` (folding on) after that grouped rewrite: every shuffle the report keeps as an op must
  be in the graph in front of its site, every one it calls ``folded`` must be absent with the site's weight unchanged,
  and the model must compute exactly what the report implies - the block-diagonal model with each op site's weight
  replaced by its documented compensation (the block diagonal of the shuffled weight), whose weight-space error the
  record states. On models whose own grouped convs feed dense convs (``FOLDING``), the shuffles all fold and the
  model computes the original.
- Lossy modes (``grouped-separable{rank=1}``, ``grouped`` on the unmodified weights) run, keep shapes, cut MACs and
  report their weight-space error (for ``grouped``, the off-block-diagonal energy computed here).

Eval mode, ``torch.no_grad``; inputs are the smallest the model accepts cheaply. Each model is built once (the
``zoo`` fixture is module-scoped, so pytest runs a model's tests together). Two models are excluded from the numeric
checks, each with its reason in ``EXCLUDED`` (too large), and four wider copies of checked structures in
``SAME_STRUCTURE`` (for CI time); all six are still rewritten with every kind on the meta device (no weights in
memory) with ``init=random``, their rewritten sites predicted from the module attributes.
``benchmarks/zoo_sweep_table.py`` still runs every model numerically.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import fxrewrite

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MODELS = torchvision.models.list_models(module=torchvision.models)

EXCLUDED = {
    "regnet_y_128gf": "644M parameters: 2.6 GB per float32 copy, and the grouped check holds four (model, "
                      "block-diagonal copy, traced copy, rewritten weights) - over the memory of a shared CI box; its "
                      "RegNetY blocks are covered by the six smaller regnet_y_* models",
    "vit_h_14": "632M parameters: 2.5 GB per float32 copy; its only conv site (conv_proj, 14x14 stride 14) is the "
                "same kind as those of the four other vit_* models",
}
#: wider copies of a structure a smaller member already checks numerically: rewritten on the meta device like the
#: EXCLUDED models (every kind, sites predicted from the module attributes), numerics left to the smaller member, to
#: keep `make test-zoo` inside CI's budget (these four took 235 s of the file's 1150 s on a loaded 2-core machine)
SAME_STRUCTURE = {
    "wide_resnet50_2": "resnet50's blocks with twice the bottleneck width (resnet50 is checked numerically)",
    "wide_resnet101_2": "resnet101's blocks with twice the bottleneck width (resnet101 is checked numerically)",
    "vit_l_16": "vit_b_16's structure, larger; its one conv site (conv_proj) is vit_b_16's kind",
    "vit_l_32": "vit_b_32's structure, larger; its one conv site (conv_proj) is vit_b_32's kind",
}
NUMERIC = [m for m in MODELS if m not in EXCLUDED and m not in SAME_STRUCTURE]

# input side per model: 48 unless listed - the smallest that still gives the last stage of a stride-32 network 2x2
# feature maps, so that 3x3 convs there use more than their centre tap
INPUT_SIZE = {
    "alexnet": 64,  # its three max-pools need at least 63
    "inception_v3": 75,  # the smallest input its stem and reduction blocks accept
    "maxvit_t": 224,  # partitions need the side divisible by 7 * 32
    "vit_b_16": 224, "vit_b_32": 224, "vit_h_14": 224,  # the default image_size=224 build
    "vit_l_16": 32, "vit_l_32": 32,  # built for 32x32 inputs, see BUILD_KWARGS
}
# constructor arguments: ViT-L is built for 32x32 inputs (only the length of the position embedding changes; the
# conv_proj site and every other weight shape are those of the 224 model, and every tap of the patch conv is still
# used); explicit init flags avoid torchvision's warning
BUILD_KWARGS: dict[str, dict[str, Any]] = {
    "vit_l_16": {"image_size": 32}, "vit_l_32": {"image_size": 32},
    "googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True},
}

#: models whose activations fade with depth under torchvision's default BatchNorm statistics (mean 0, variance 1):
#: their output is the classifier's bias whatever the convs compute (relative spread of the output over 4 random
#: inputs: 0 for googlenet, <= 9e-5 for shufflenet_v2, >= 1e-2 for every other model here), so an exact check on them
#: could not fail. Their BatchNorm statistics are set from random images first (``normalise_batch_norms``).
FADING = ("googlenet", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0")
GROUPS = 4  # divides the channel counts of almost every torchvision conv (2 would take about as many sites)
DW_SEP_EXACT = "depthwise-separable{rank=exact}"
GS_EXACT = f"grouped-separable{{groups={GROUPS}, rank=exact}}"
GROUPED = f"grouped{{groups={GROUPS}}}"
SHUFFLE = "channel-shuffle{rule=all, fold=true}"
# the reason codes each kind may give for a site it does not rewrite (all of them structural)
ALLOWED_SKIPS = {
    "depthwise-separable": {"pointwise-kernel", "already-depthwise"},
    "grouped-separable": {"pointwise-kernel", "already-depthwise", "channels-not-divisible", "groups-incompatible",
                          "already-grouped", "no-saving"},
    "grouped": {"already-depthwise", "channels-not-divisible", "groups-incompatible", "already-grouped"},
    "channel-shuffle": {"depthwise-consumer", "folded", "channels-mismatch"},
}
# relative L2 error at the output that an exact float32 rewrite stays within: float32 rounding in these deep nets
# gave at most 3.8e-6 over the zoo (swin_v2_s, depthwise-separable); a lost rank or weight gives 1e-2 or more
FLOAT32_EXACT = 2e-5
# one model per architecture family, the cheapest (wide_resnet is resnet50's structure)
FAMILIES = ("alexnet", "vgg11", "resnet18", "resnet50", "resnext50_32x4d", "densenet121", "googlenet", "inception_v3",
            "squeezenet1_1", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5",
            "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "maxvit_t",
            "swin_t", "vit_b_16")
# the families with grouped sites (ViT and Swin have none)
GROUPED_FAMILIES = tuple(m for m in FAMILIES if m not in ("swin_t", "vit_b_16"))
# models whose own grouped convs feed dense convs through channel-wise ops: shuffle sites before any rewrite
FOLDING = ("resnext50_32x4d", "regnet_x_400mf")


def test_the_zoo_is_complete() -> None:
    assert len(MODELS) == 80
    assert set(EXCLUDED) | set(SAME_STRUCTURE) <= set(MODELS)
    assert set(INPUT_SIZE) <= set(MODELS) and set(BUILD_KWARGS) <= set(MODELS)
    assert set(FAMILIES) <= set(NUMERIC) and set(FOLDING) <= set(FAMILIES)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build a model whose parameters and buffers live on the meta device: no memory, no init cost.

    (``with torch.device("meta")`` is not enough: RegNet computes its widths with torch ops and ``.tolist()``.)
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(self, name, tensor.to("meta") if tensor is not None else None, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = (  # type: ignore[method-assign]
            register_parameter, register_buffer)


def _build(name: str, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    with _parameters_on_meta() if device == "meta" else contextlib.nullcontext():
        model = torchvision.models.get_model(name, weights=None, **BUILD_KWARGS.get(name, {}))
    model.to(device).eval()
    if device != "meta":
        with torch.no_grad():  # zero-initialised heads (ViT) would make every output 0 whatever the rewrite does
            for p in model.parameters():
                if p.dim() >= 2 and not p.any():
                    p.normal_(0.0, p[0].numel() ** -0.5)
    return model


def normalise_batch_norms(model: nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of its input on ``x`` (a cumulative average; only the
    BatchNorms run in train mode, so dropout and auxiliary heads stay off)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        m.eval()


def _input(name: str, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    size = INPUT_SIZE.get(name, 48)
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)


def _run_with_conv_hooks(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, nn.Conv2d]]:
    """``model(x)`` and the ``nn.Conv2d`` modules that forward calls, by qualified name (forward hooks: an
    independent count; torchvision's auxiliary classifiers are not called in eval mode)."""
    called: dict[str, nn.Conv2d] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            called[name] = module  # type: ignore[assignment]
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    return y, called


@dataclass(frozen=True)
class Zoo:
    """One built model (float32, eval; shared by the model's tests, which copy it before changing it), its input,
    its output and the convs its forward calls."""

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    convs: Mapping[str, nn.Conv2d]


@pytest.fixture(scope="module", params=NUMERIC)
def zoo(request: pytest.FixtureRequest) -> Iterator[Zoo]:
    name = request.param
    model = _build(name)
    x = _input(name, torch.float32)
    if name in FADING:
        normalise_batch_norms(model, torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(5)))
    y, convs = _run_with_conv_hooks(model, x)
    with torch.no_grad():  # the output depends on the input (so on the convs): the comparisons below can fail
        other = model(torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
    assert _rel_l2(other, y) > 1e-3
    yield Zoo(name, model, x, y, convs)
    del model, convs
    gc.collect()  # models of several GB each: do not let cycles keep the last one alive during the next


def eligible(convs: Mapping[str, nn.Conv2d], kind: str, groups: int = GROUPS, rank: int | None = None) -> set[str]:
    """The sites a pass of ``kind`` must rewrite, by the documented rules (README "Passes"), from module attributes.

    Eligibility is by cost (issue 14): a separable kind is refused only for a depthwise conv, or where the conv is a
    1x1 or has one input channel per group and even the cheapest split (rank 1; grouped-separable keeping the conv's
    own G groups) costs no fewer MACs per position: ``G*I*K + g*O >= O*I*K`` with g = I (depthwise-separable) or
    g = G. Grouped-separable needs ``groups`` to divide the input channels and to be a multiple of G (G itself is a
    plain rank-r split); grouped needs it to divide the output channels too and to be larger than G. With a
    ``rank`` (not exact), a grouped-separable split of such a 1x1 / one-channel conv must itself save:
    ``G*I*r*K + groups*r*O < O*I*K``.
    """
    out = set()
    for name, c in convs.items():
        i, o, g, k = c.in_channels, c.out_channels, c.groups, c.kernel_size[0] * c.kernel_size[1]
        depthwise = g == i and i > 1
        structural = depthwise or k == 1 or i // g == 1

        def saves(split: int, i: int = i, o: int = o, g: int = g, k: int = k) -> bool:
            return g * i * k + split * o < o * i * k

        multiple = groups % g == 0 and i % groups == 0
        ok = {"depthwise-separable": not depthwise and (not structural or saves(i)),
              "grouped-separable": not depthwise and (not structural or saves(g)) and multiple and (
                  rank is None or not structural or g * i * rank * k + groups * rank * o < o * i * k),
              "grouped": multiple and groups != g and o % groups == 0}[kind]
        if ok:
            out.add(name)
    return out


def _check_records(result: fxrewrite.RewriteResult, kind: str,
                   expected: set[str] | None = None) -> list[fxrewrite.SiteRecord]:
    """The rewritten records; every skip has an allowed code; the rewritten sites are ``expected`` (when given)."""
    records = result.report.records
    rewritten = [r for r in records if r.status == "rewritten"]
    unexpected = [(r.site, r.code) for r in records if r.status == "skipped" and r.code not in ALLOWED_SKIPS[kind]]
    assert unexpected == []
    if expected is not None:
        assert {r.site for r in rewritten} == expected
    return rewritten


def _check_mac_totals(result: fxrewrite.RewriteResult, rewritten: list[fxrewrite.SiteRecord]) -> None:
    """The model's MACs fall, by the sum of the per-site reductions."""
    assert all(r.macs_after is not None and r.macs_before is not None and r.macs_after < r.macs_before
               for r in rewritten)
    context = result.report.context
    assert context["model_macs_after"] < context["model_macs_before"]
    assert context["model_macs_before"] - context["model_macs_after"] == sum(
        r.macs_before - r.macs_after for r in rewritten)  # type: ignore[operator]


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _assert_float32_exact(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = _rel_l2(out, ref)
    assert err <= FLOAT32_EXACT, f"{what}: relative L2 error {err:.2e} at the output > {FLOAT32_EXACT:.0e}"


# --------------------------------------------------------------------------------- depthwise-separable


def test_depthwise_separable_exact_reproduces_the_model(zoo: Zoo) -> None:
    expected = eligible(zoo.convs, "depthwise-separable")
    assert expected, "every torchvision classifier has at least one kxk conv that is not depthwise"
    with torch.no_grad():
        result = fxrewrite.rewrite(zoo.model, (zoo.x,), passes=DW_SEP_EXACT, verify=False)
        out = result.module(zoo.x)
    rewritten = _check_records(result, "depthwise-separable", expected)
    assert all(r.exact is True and r.rel_error == pytest.approx(0.0, abs=1e-6) for r in rewritten)
    _assert_float32_exact(out, zoo.y, f"{zoo.name} {DW_SEP_EXACT}")


@pytest.mark.parametrize("zoo", FAMILIES, indirect=True)
def test_depthwise_separable_rank1_keeps_shapes_and_cuts_macs(zoo: Zoo) -> None:
    expected = eligible(zoo.convs, "depthwise-separable")
    with torch.no_grad():
        low = fxrewrite.rewrite(zoo.model, (zoo.x,), passes="depthwise-separable{rank=1}", verify=False)
        out_low = low.module(zoo.x)
    rewritten = _check_records(low, "depthwise-separable", expected)  # rank 1 is below every exact rank
    assert out_low.shape == zoo.y.shape and out_low.dtype == torch.float32 and bool(out_low.isfinite().all())
    assert all(r.params_after < r.params_before for r in rewritten)
    _check_mac_totals(low, rewritten)


@pytest.mark.parametrize("zoo", FAMILIES, indirect=True)
def test_depthwise_separable_exact_in_float64(zoo: Zoo) -> None:
    model = copy.deepcopy(zoo.model).double()
    x = zoo.x.double()
    with torch.no_grad():
        y = model(x)
        result = fxrewrite.rewrite(model, (x,), passes=DW_SEP_EXACT, verify=False)
        out = result.module(x)
    rewritten = _check_records(result, "depthwise-separable", eligible(zoo.convs, "depthwise-separable"))
    assert all(r.exact is True and r.rel_error == pytest.approx(0.0, abs=1e-9) for r in rewritten)
    torch.testing.assert_close(out, y)


# ----------------------------------------------------------------------------------- grouped-separable


def test_grouped_separable_exact_reproduces_the_model(zoo: Zoo) -> None:
    with torch.no_grad():
        result = fxrewrite.rewrite(zoo.model, (zoo.x,), passes=GS_EXACT, verify=False)
        out = result.module(zoo.x)
    rewritten = _check_records(result, "grouped-separable", eligible(zoo.convs, "grouped-separable"))
    for r in rewritten:
        assert r.exact is True and r.rel_error == pytest.approx(0.0, abs=1e-6), r.site
        assert r.details["rank"] == r.details["exact_rank"] and r.details["groups"] == GROUPS, r.site
    _assert_float32_exact(out, zoo.y, f"{zoo.name} {GS_EXACT}")


# --------------------------------------------------------------------------------------------- grouped


def _input_channels(conv: nn.Conv2d) -> torch.Tensor:
    """(O, I / conv.groups): the input channel that each column of the conv's weight reads."""
    o, g = conv.out_channels, conv.groups
    per_group = conv.in_channels // g
    return (torch.arange(o) // (o // g) * per_group)[:, None] + torch.arange(per_group)[None, :]


def _block_mask(conv: nn.Conv2d, groups: int, in_channels: torch.Tensor | None = None) -> torch.Tensor:
    """True where a weight entry of ``conv`` joins an output and an input channel of the same of ``groups`` blocks,
    in the coordinates of its weight (of a dense weight when ``in_channels`` is ``arange(conv.in_channels)``)."""
    in_channels = _input_channels(conv) if in_channels is None else in_channels
    block_out = torch.arange(conv.out_channels) // (conv.out_channels // groups)
    return (block_out[:, None] == in_channels // (conv.in_channels // groups))[:, :, None, None]


def _block_diagonal_model(zoo: Zoo) -> tuple[nn.Module, set[str]]:
    """A copy of the model whose grouped-eligible convs keep only their block diagonal (in ``GROUPS`` blocks), and
    those convs' names. The kept weights are scaled by sqrt(GROUPS / conv.groups) so that activations keep their
    scale through deep nets."""
    names = eligible(zoo.convs, "grouped")
    if not names:
        return zoo.model, names  # nothing to zero: no copy
    model = copy.deepcopy(zoo.model)
    for name in names:
        conv = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        with torch.no_grad():
            conv.weight.mul_(_block_mask(conv, GROUPS) * math.sqrt(GROUPS / conv.groups))
    return model, names


def _grouped(zoo: Zoo) -> tuple[nn.Module, torch.Tensor, fxrewrite.RewriteResult]:
    """The block-diagonal model, its output and its ``grouped`` rewrite, whose records and output are checked."""
    block, expected = _block_diagonal_model(zoo)
    with torch.no_grad():
        y = block(zoo.x) if block is not zoo.model else zoo.y
        result = fxrewrite.rewrite(block, (zoo.x,), passes=GROUPED, verify=False)
        out = result.module(zoo.x)
    rewritten = _check_records(result, "grouped", expected)
    for r in rewritten:
        assert r.exact is True and r.rel_error == pytest.approx(0.0, abs=1e-6), r.site
        assert r.details["kept_energy"] == pytest.approx(1.0), r.site
        # each output channel now sees in_channels / 4 inputs instead of in_channels / groups
        assert r.macs_after * GROUPS == r.macs_before * zoo.convs[r.site].groups, r.site  # type: ignore[operator]
    if rewritten:
        _check_mac_totals(result, rewritten)
    _assert_float32_exact(out, y, f"{zoo.name} {GROUPED} on block-diagonal weights")
    return block, y, result


def test_grouped_is_exact_on_block_diagonal_weights(zoo: Zoo) -> None:
    _grouped(zoo)


# ------------------------------------------------------------------------------------- channel shuffle


def _shuffle_permutation(channels: int, groups: int) -> torch.Tensor:
    """``perm`` with ``shuffle(x)[:, k] == x[:, perm[k]]``, from the definition
    ``x.view(N, g, C // g, H, W).transpose(1, 2).reshape(N, C, H, W)`` applied to the channel indices."""
    return torch.arange(channels).view(1, groups, channels // groups).transpose(1, 2).reshape(-1)


def _dense(conv: nn.Conv2d) -> torch.Tensor:
    """The conv's weight as a dense (O, I, kh, kw) tensor (zeros off its own group blocks)."""
    w = conv.weight.detach()
    index = _input_channels(conv)[:, :, None, None].expand_as(w)
    return w.new_zeros(conv.out_channels, conv.in_channels, *conv.kernel_size).scatter_(1, index, w)


def _dense_conv_like(conv: nn.Conv2d, dense: torch.Tensor) -> nn.Conv2d:
    """A groups=1 copy of ``conv`` (same kernel, stride, padding, dilation, mode, bias) with weight ``dense``."""
    new = nn.utils.skip_init(nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                             conv.padding, conv.dilation, 1, conv.bias is not None, conv.padding_mode,
                             dtype=conv.weight.dtype).eval()
    with torch.no_grad():
        new.weight.copy_(dense)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _shuffled_inputs(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Conv modules whose input is a channel shuffle ``x.unflatten(1, (g, C // g)).transpose(1, 2).flatten(1, 2)``
    in the graph, with its ``g``."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Conv2d):
            continue
        flat = node.args[0]
        if not (isinstance(flat, torch.fx.Node) and flat.op == "call_method" and flat.target == "flatten"):
            continue
        swap = flat.args[0]
        assert swap.op == "call_method" and swap.target == "transpose" and tuple(swap.args[1:]) == (1, 2)
        split = swap.args[0]
        assert split.op == "call_method" and split.target == "unflatten" and split.args[1] == 1
        assert tuple(flat.args[1:]) == (1, 2)
        out[str(node.target)] = int(split.args[2][0])
    return out


def _check_shuffle(before: nn.Module, y: torch.Tensor, x: torch.Tensor, shuffled: fxrewrite.RewriteResult,
                   what: str) -> tuple[int, int]:
    """Check a channel-shuffle rewrite of ``before`` (output ``y`` on ``x``) against what its report says;
    returns the numbers of (folded, kept as op) shuffles."""
    records = shuffled.report.records
    _check_records(shuffled, "channel-shuffle")
    ops = {r.site: r for r in records if r.status == "rewritten"}
    folded = {r.site: r for r in records if r.code == "folded"}
    assert all(r.details["shuffle"] == "op" for r in ops.values())
    assert all(r.details["shuffle"] == "folded" and r.exact is True and r.rel_error == 0.0 for r in folded.values())
    # the report's counts: one table row per shuffle, its status saying which
    assert str(shuffled.report).count("skipped: folded") == len(folded)
    assert shuffled.report.totals()["changed"] == len(ops)
    gm = shuffled.module
    assert _shuffled_inputs(gm) == {site: r.details["shuffle_groups"] for site, r in ops.items()}
    for r in (*ops.values(), *folded.values()):
        producer = gm.get_submodule(r.details["producer"])
        assert isinstance(producer, nn.Conv2d) and producer.groups == r.details["shuffle_groups"], r.site
        assert 1 < producer.groups < producer.in_channels, r.site
    for site in folded:  # folded: no op, and the dense consumer keeps its weight
        consumer = gm.get_submodule(site)
        assert consumer.groups == 1 and torch.equal(consumer.weight, before.get_submodule(site).weight), site

    # what the report implies: each op site computes conv(shuffle(x), W') with W' the block diagonal (in the site's
    # own groups) of its shuffled weight, i.e. conv(x, W' with its columns unshuffled); everything else is unchanged
    reference = copy.deepcopy(before) if ops else before
    for site, r in ops.items():
        original = before.get_submodule(site)
        assert isinstance(original, nn.Conv2d)
        perm = _shuffle_permutation(original.in_channels, r.details["shuffle_groups"])
        shuffled_weight = _dense(original)[:, perm]
        consumer = gm.get_submodule(site)
        kept = shuffled_weight * _block_mask(consumer, consumer.groups, torch.arange(original.in_channels))
        dropped = torch.linalg.vector_norm(shuffled_weight - kept, dtype=torch.float64)
        assert r.rel_error == pytest.approx(
            float(dropped / torch.linalg.vector_norm(shuffled_weight, dtype=torch.float64)), rel=1e-5, abs=1e-9), site
        assert r.exact is (r.rel_error == 0.0), site
        parent, _, leaf = site.rpartition(".")
        setattr(reference.get_submodule(parent), leaf, _dense_conv_like(original, kept[:, torch.argsort(perm)]))
    with torch.no_grad():
        out = gm(x)
        expected = reference(x) if ops else y  # every shuffle folded: the output of ``before``
    _assert_float32_exact(out, expected, what)
    return len(folded), len(ops)


@pytest.mark.parametrize("zoo", GROUPED_FAMILIES, indirect=True)
def test_channel_shuffle_after_grouped_computes_what_the_report_says(zoo: Zoo) -> None:
    block, y, grouped = _grouped(zoo)
    with torch.no_grad():
        shuffled = fxrewrite.rewrite(grouped.module, (zoo.x,), passes=SHUFFLE, verify=False)
    _, ops = _check_shuffle(block, y, zoo.x, shuffled, f"{zoo.name} {GROUPED},{SHUFFLE}")
    # grouped convs feeding grouped convs: shuffles kept as ops, with their error reported. ConvNeXt has none: its
    # grouped (downsampling) convs read a LayerNorm2d, which is not channel-wise, and feed only depthwise convs
    assert (ops > 0) is (zoo.name != "convnext_tiny")


@pytest.mark.parametrize("zoo", FOLDING, indirect=True)
def test_channel_shuffles_fold_exactly_into_dense_consumers(zoo: Zoo) -> None:
    with torch.no_grad():
        shuffled = fxrewrite.rewrite(zoo.model, (zoo.x,), passes=SHUFFLE, verify=False)
    folded, ops = _check_shuffle(zoo.model, zoo.y, zoo.x, shuffled, f"{zoo.name} {SHUFFLE}")
    assert folded > 0 and ops == 0  # the model computes the original (checked above)
    assert all(p.shape == q.shape for p, q in zip(shuffled.module.parameters(), zoo.model.parameters(), strict=True))


# -------------------------------------------------------------------------------------------- lossy


@pytest.mark.parametrize("zoo", GROUPED_FAMILIES, indirect=True)
def test_lossy_grouped_and_grouped_separable_run_keep_shapes_and_cut_macs(zoo: Zoo) -> None:
    for kind, passes in (("grouped-separable", f"grouped-separable{{groups={GROUPS}, rank=1}}"),
                         ("grouped", GROUPED)):
        with torch.no_grad():
            result = fxrewrite.rewrite(zoo.model, (zoo.x,), passes=passes, verify=False)
            out = result.module(zoo.x)
        rewritten = _check_records(result, kind, eligible(zoo.convs, kind, rank=1 if kind == "grouped-separable"
                                                          else None))
        assert rewritten or kind == "grouped-separable"  # some families have no grouped-separable site
        assert out.shape == zoo.y.shape and out.dtype == torch.float32 and bool(out.isfinite().all())
        if rewritten:
            _check_mac_totals(result, rewritten)
        for r in rewritten:
            assert r.exact is False and r.rel_error is not None and 0.0 < r.rel_error < 1.0, (kind, r.site)
            if kind == "grouped":  # the energy outside the block diagonal, computed here
                conv = zoo.convs[r.site]
                w = conv.weight.detach().double()
                off = w * ~_block_mask(conv, GROUPS)
                assert r.rel_error == pytest.approx(float(off.norm() / w.norm()), rel=1e-5), r.site
                assert r.details["kept_energy"] == pytest.approx(1.0 - r.rel_error**2, rel=1e-5), r.site


# ------------------------------------------------------------------------------------- meta device


@pytest.mark.parametrize("name", sorted({**EXCLUDED, **SAME_STRUCTURE}))
def test_excluded_models_still_rewrite_on_the_meta_device(name: str) -> None:
    model = _build(name, device="meta")
    x = _input(name, torch.float32, device="meta")
    y, convs = _run_with_conv_hooks(model, x)
    for kind, passes in (("depthwise-separable", "depthwise-separable{rank=1, init=random}"),
                         ("grouped-separable", f"grouped-separable{{groups={GROUPS}, rank=1, init=random}}"),
                         ("grouped", f"grouped{{groups={GROUPS}, init=random}}")):
        result = fxrewrite.rewrite(model, (x,), passes=passes, verify=False)
        rewritten = _check_records(result, kind, eligible(convs, kind))
        assert all(r.macs_after < r.macs_before for r in rewritten)  # type: ignore[operator]
        out = result.module(x)
        assert out.shape == y.shape and out.device.type == "meta"
        assert all(p.device.type == "meta" for p in result.module.parameters())
