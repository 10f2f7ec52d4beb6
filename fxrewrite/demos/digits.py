"""A real demonstration: a small CNN trained on scikit-learn's handwritten digits, rewritten, repaired, distilled.

``run_demo`` trains a seeded 4-conv CNN on ``sklearn.datasets.load_digits`` (8x8 images, 1347 train / 450 test,
stratified split with ``random_state=0``; seconds on a CPU), then for each form (depthwise-separable,
grouped-separable with 4 groups, grouped, and the bottlenecks: depthwise (CP), Tucker-2, grouped with 4 groups) and
each MAC target (2x and 4x fewer) rewrites every conv but the stem
(1 input channel) with per-site options chosen from the conv shapes, and measures test accuracy of the original, the
data-free rewrite, the repaired rewrite (``fxrewrite.repair`` on a few unlabelled training batches) and the repaired
rewrite after a short distillation (``fxrewrite.tuning.distill``, no labels either). The achieved MAC ratio is what the
rewritten convs' shapes give, never rounded up to the target.

Run it with ``python -m fxrewrite.demos.digits`` (``--quick`` for a shorter run, ``--json`` for the rows as JSON).

>>> spec = ConvShape(in_channels=32, out_channels=64, kernel=(3, 3), groups=1, pixels=64)
>>> conv_macs(spec), conv_macs(spec, "grouped", {"groups": 2}), conv_macs(spec, "depthwise-separable", {"rank": 1})
(1179648, 589824, 149504)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from fxrewrite.demos.training import accuracy, fit_classifier

FORMS = ("depthwise-separable", "grouped-separable", "grouped", "depthwise-bottleneck", "tucker2",
         "grouped-bottleneck")
#: the pass that applies a form, where its name differs (Tucker-2 is the grouped bottleneck with one group)
PIPELINES = {"tucker2": "grouped-bottleneck"}
#: opt-in forms (``--forms``): name -> (the form whose costs and options it shares, the pipeline that applies it)
EXTRA_FORMS = {"grouped-permuted": ("grouped", "grouped{permute=true}")}
TARGETS = (2.0, 4.0)
SEPARABLE_GROUPS = 4  # the group count of the grouped-separable and grouped-bottleneck forms; ranks chosen per site


def pipeline(form: str) -> str:
    """The pipeline that applies ``form`` (per-site options come from ``choose_options``).

    >>> pipeline("tucker2"), pipeline("grouped-permuted"), pipeline("grouped")
    ('grouped-bottleneck', 'grouped{permute=true}', 'grouped')
    """
    return EXTRA_FORMS[form][1] if form in EXTRA_FORMS else PIPELINES.get(form, form)


class DigitsCNN(nn.Module):
    """stem 1->w (3x3) -> conv2 w->2w -> max-pool -> conv3 2w->2w -> conv4 2w->4w -> global average -> linear; every
    conv is 3x3 with padding 1, no bias, then BatchNorm and ReLU."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem, self.bn1 = nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        self.conv3, self.bn3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        self.conv4, self.bn4 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w)
        self.head = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.head(x.mean(dim=(2, 3)))


@dataclass(frozen=True)
class DigitsData:
    """Normalised (N, 1, 8, 8) float32 images and int64 labels; the split is stratified with random_state=0."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(test_size: float = 0.25) -> DigitsData:
    """The digits, split deterministically; pixels scaled to mean 0, std 1 with the training set's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=test_size, random_state=0,
                                           stratify=digits.target)
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return DigitsData((x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test])


def train_cnn(data: DigitsData, *, epochs: int = 15, batch_size: int = 64, lr: float = 3e-3, width: int = 32,
              seed: int = 0) -> DigitsCNN:
    """Train a DigitsCNN with Adam and a cosine schedule, seeded; returned in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    return fit_classifier(model, data.x_train, data.y_train, epochs=epochs, batch_size=batch_size, lr=lr,
                          seed=seed)


@torch.no_grad()
def output_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    """||model(x) - reference(x)|| / ||reference(x)|| (both in eval mode)."""
    a, b = model.eval()(x), reference.eval()(x)
    return float((a - b).norm() / b.norm())


def training_batches(data: DigitsData, batch_size: int, seed: int) -> list[tuple[torch.Tensor]]:
    """The unlabelled training images in a seeded order (``seed + 1``), as 1-tuples of batches: the demo's first
    ``calib_batches`` are its calibration data, all of them its distillation data."""
    order = torch.randperm(data.x_train.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    return [(data.x_train[order[i:i + batch_size]],) for i in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------------------- options from shapes


@dataclass(frozen=True)
class ConvShape:
    """What a conv's MACs depend on: channels, kernel, groups, and output pixels per image."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    groups: int
    pixels: int


def conv_macs(s: ConvShape, form: str | None = None, options: Mapping[str, int] | None = None) -> int:
    """MACs per image of the conv (``form=None``) or of its rewrite in ``form`` with ``options``, as the pass that
    applies the form declares them (``ConvRewritePass.cost``), with every conv of a rewrite at the site's output
    resolution (for the bottleneck forms, whose first 1x1 runs at the input resolution, that holds for stride-1
    'same' convs such as the digits model's)."""
    from fxrewrite.graph.sites import ConvSpec
    from fxrewrite.passes import pass_class
    from fxrewrite.passes.costs import conv_cost

    if form is None:
        return int(conv_cost(s.pixels, s.in_channels, s.out_channels, groups=s.groups,
                             kernel=s.kernel[0] * s.kernel[1]).macs)
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; forms: {FORMS}")
    spec = ConvSpec(s.in_channels, s.out_channels, s.kernel, (1, 1), "same", (1, 1), s.groups, False)
    shape_in, shape_out = (1, s.in_channels, s.pixels, 1), (1, s.out_channels, s.pixels, 1)
    cost = pass_class(PIPELINES.get(form, form)).cost(spec, shape_in, shape_out, **dict(options or {}))
    return int(cost.macs)


def candidate_options(s: ConvShape, form: str) -> list[dict[str, int]]:
    """Every valid option set of ``form`` at a conv (ranks up to the exact rank; group counts that divide both
    channel counts and are multiples of the conv's groups)."""
    k = s.kernel[0] * s.kernel[1]
    if form == "depthwise-separable":
        return [{"rank": t} for t in range(1, min(s.out_channels // s.groups, k) + 1)]
    if form == "grouped-separable":
        g = SEPARABLE_GROUPS
        if s.in_channels % g or g % s.groups:
            return []
        return [{"groups": g, "rank": r} for r in range(1, min(s.out_channels // s.groups, s.in_channels // g * k) + 1)]
    if form == "grouped":
        return [{"groups": g} for g in range(2, s.in_channels + 1)
                if s.in_channels % g == 0 and s.out_channels % g == 0 and g % s.groups == 0 and g > s.groups]
    if form in ("depthwise-bottleneck", "tucker2", "grouped-bottleneck"):
        from fxrewrite.maths.bottleneck_fit import exact_rank

        groups = {"depthwise-bottleneck": None, "tucker2": 1, "grouped-bottleneck": SEPARABLE_GROUPS}[form]
        weight_shape = (s.out_channels, s.in_channels // s.groups, *s.kernel)
        full = exact_rank(weight_shape, groups, source_groups=s.groups)
        step = groups or 1
        extra = {} if groups is None else {"groups": groups}
        return [{**extra, "rank": r} for r in range(step, full + 1, step)]
    raise ValueError(f"unknown form {form!r}; forms: {FORMS}")


@dataclass(frozen=True)
class Choice:
    """Per-site options for one form and MAC target, and the MACs (per image) of the rewritten convs."""

    form: str
    target: float
    options: Mapping[str, Mapping[str, int]]
    macs_before: int
    macs_after: int

    @property
    def ratio(self) -> float:
        return self.macs_before / self.macs_after

    def describe(self) -> str:
        parts = [f"{site}: " + ",".join(f"{k}={v}" for k, v in opts.items()) for site, opts in self.options.items()]
        return "; ".join(parts)


def choose_options(shapes: Mapping[str, ConvShape], form: str, target: float) -> Choice:
    """Options per site with total MACs of the rewritten convs at most 1/target of the original, as close to it as
    the options allow: start from the cheapest-that-meets-the-target at every site, then greedily move sites to
    their next costlier option while the total still meets the target."""
    before = sum(conv_macs(s) for s in shapes.values())
    ladders: dict[str, list[tuple[int, dict[str, int]]]] = {}
    for name, s in shapes.items():
        ladder = sorted(((conv_macs(s, form, o), o) for o in candidate_options(s, form)), key=lambda t: t[0])
        if not ladder:
            raise ValueError(f"{name}: no {form} option fits its shape {s}")
        ladders[name] = ladder
    # per site: the costliest option that alone meets the target (or the cheapest one if none does)
    pick = {}
    for name, ladder in ladders.items():
        ok = [j for j, (m, _) in enumerate(ladder) if m * target <= conv_macs(shapes[name])]
        pick[name] = ok[-1] if ok else 0
    total = sum(ladders[n][pick[n]][0] for n in shapes)
    changed = True
    while changed:
        changed = False
        for name, ladder in ladders.items():
            j = pick[name]
            if j + 1 < len(ladder):
                new_total = total - ladder[j][0] + ladder[j + 1][0]
                if new_total * target <= before:
                    pick[name], total, changed = j + 1, new_total, True
    options = {n: dict(ladders[n][pick[n]][1]) for n in shapes}
    return Choice(form, target, options, before, total)


def conv_shapes(model: nn.Module, example: torch.Tensor, *, skip_stem: bool = True) -> dict[str, ConvShape]:
    """The rewritable convs of ``model`` (per fxrewrite's site finder) with output pixels for one image."""
    from fxrewrite.frontends.api import plan

    shapes = {}
    for site in plan(model, (example[:1],)).sites:
        s = site.spec
        if site.blocker is not None or site.output_shape is None or (skip_stem and s.in_channels == 1):
            continue
        pixels = site.output_shape[-1] * site.output_shape[-2]
        shapes[site.name] = ConvShape(s.in_channels, s.out_channels, tuple(s.kernel_size), s.groups, pixels)
    return shapes


# ------------------------------------------------------------------------------------------------------- demo


@dataclass(frozen=True)
class DemoRow:
    """One form at one MAC target. MACs are per image, for the rewritten convs; errors are relative L2."""

    form: str
    target: float
    options: str
    conv_macs_before: int
    conv_macs_after: int
    ratio: float
    model_macs_before: int
    model_macs_after: int
    params_before: int
    params_after: int
    weight_rel_error: float  # ||W - W'|| / ||W|| over all rewritten weights (data-free factorisation)
    output_error_data_free: float  # logits on the test set vs the original
    output_error_repaired: float
    output_error_distilled: float
    acc_original: float
    acc_data_free: float
    acc_repaired: float
    acc_distilled: float
    repair_seconds: float
    distill_seconds: float


@dataclass(frozen=True)
class DemoResult:
    """The rows, the original's accuracy, timings and settings; ``model`` is the trained original (not in
    ``to_dict``)."""

    rows: tuple[DemoRow, ...]
    acc_original: float
    train_seconds: float
    seconds: float
    settings: Mapping[str, Any]
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def cost_table(self, tablefmt: str = "simple") -> str:
        head = ["form", "target", "per-site options", "conv MACs before", "conv MACs after", "achieved",
                "model MACs before", "model MACs after", "params before", "params after"]
        rows = [[r.form, f"{r.target:g}x", r.options, f"{r.conv_macs_before:,}", f"{r.conv_macs_after:,}",
                 f"{r.ratio:.2f}x", f"{r.model_macs_before:,}", f"{r.model_macs_after:,}", f"{r.params_before:,}",
                 f"{r.params_after:,}"] for r in self.rows]
        return tabulate(rows, headers=head, tablefmt=tablefmt, disable_numparse=True)

    def accuracy_table(self, tablefmt: str = "simple") -> str:
        head = ["form", "conv MACs", "weight err", "output err data-free", "repaired", "+distill",
                "acc original", "acc data-free", "acc repaired", "acc repaired+distill"]
        rows = [[r.form, f"{r.ratio:.2f}x fewer", f"{r.weight_rel_error:.3f}", f"{r.output_error_data_free:.3f}",
                 f"{r.output_error_repaired:.3f}", f"{r.output_error_distilled:.3f}", f"{r.acc_original:.2f}",
                 f"{r.acc_data_free:.2f}", f"{r.acc_repaired:.2f}", f"{r.acc_distilled:.2f}"] for r in self.rows]
        return tabulate(rows, headers=head, tablefmt=tablefmt, disable_numparse=True)

    def __str__(self) -> str:
        s = self.settings
        return "\n".join([
            f"digits demo: DigitsCNN(width={s['width']}) trained {s['epochs']} epochs in {self.train_seconds:.1f} s, "
            f"test accuracy {self.acc_original:.2f}% ({s['test']} test / {s['train']} train images; torch "
            f"{s['torch']}, {s['threads']} thread(s))",
            f"repair: {s['calib_batches']} unlabelled training batches of {s['batch_size']}; distill: "
            f"{s['distill_steps']} steps, lr {s['distill_lr']:g}; every conv but the stem is rewritten",
            "", "Cost (MACs per image; 1 MAC = one multiply-add; conv MACs = the rewritten convs only)",
            self.cost_table(), "", "Accuracy (% top-1 on the test set; errors: relative L2, test-set logits)",
            self.accuracy_table(), "", f"total {self.seconds:.1f} s"])

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "acc_original": self.acc_original,
                "train_seconds": self.train_seconds, "seconds": self.seconds, "settings": dict(self.settings)}


def _weight_error(model: nn.Module, records: Iterable[Any]) -> float:
    err2 = ref2 = 0.0
    for rec in records:
        if rec.status != "rewritten" or rec.rel_error is None:
            continue
        w2 = float(model.get_submodule(rec.site).weight.detach().double().square().sum())
        err2 += rec.rel_error ** 2 * w2
        ref2 += w2
    return math.sqrt(err2 / ref2) if ref2 else math.nan


def run_demo(*, forms: Sequence[str] = FORMS, targets: Sequence[float] = TARGETS, epochs: int = 15,
             width: int = 32, calib_batches: int = 8, batch_size: int = 64, distill_steps: int = 150,
             distill_lr: float = 1e-3, seed: int = 0, progress: bool = False, threads: int | None = 1) -> DemoResult:
    """Train, rewrite each form at each target, repair, distill (``distill_steps=0``: no distillation, its columns
    are NaN); returns the rows (see ``DemoRow``).

    ``threads`` sets torch's intra-op threads for the run (restored after): these convolutions are tiny, so one
    thread is fastest (more only spin-wait on a busy machine) and fixes the summation order, hence the figures, for
    a given torch build. None leaves torch's setting alone.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(forms, targets, epochs, width, calib_batches, batch_size, distill_steps, distill_lr, seed,
                         progress)
    finally:
        torch.set_num_threads(before)


def _run_demo(forms: Sequence[str], targets: Sequence[float], epochs: int, width: int, calib_batches: int,
              batch_size: int, distill_steps: int, distill_lr: float, seed: int, progress: bool) -> DemoResult:
    from fxrewrite.frontends.api import rewrite
    from fxrewrite.graph.select import Rule
    from fxrewrite.tuning.distill import distill
    from fxrewrite.tuning.repair import repair

    start = time.perf_counter()
    data = load_data()
    t0 = time.perf_counter()
    model = train_cnn(data, epochs=epochs, width=width, seed=seed, batch_size=batch_size)
    train_seconds = time.perf_counter() - t0
    acc_original = accuracy(model, data.x_test, data.y_test)
    train_batches = training_batches(data, batch_size, seed)
    calib = train_batches[:calib_batches]
    example = data.x_test[:1]
    shapes = conv_shapes(model, example)
    rows = []
    for form in forms:
        for target in targets:
            family = EXTRA_FORMS[form][0] if form in EXTRA_FORMS else form
            choice = choose_options(shapes, family, target)
            rules = [Rule(site, options=opts) for site, opts in choice.options.items()]
            result = rewrite(model, (example,), passes=pipeline(form), select=rules, verify=False)
            context = result.report.context
            t1 = time.perf_counter()
            repaired = repair(model, result.module, calib, progress=progress)
            t2 = time.perf_counter()
            final: nn.Module = repaired.module
            if distill_steps:
                final = distill(model, repaired.module, train_batches, steps=distill_steps, lr=distill_lr,
                                progress=progress).module
            t3 = time.perf_counter()
            x, y = data.x_test, data.y_test
            rows.append(DemoRow(
                form, float(target), choice.describe(), choice.macs_before, choice.macs_after, choice.ratio,
                int(context["model_macs_before"]), int(context["model_macs_after"]),
                int(context["model_params_before"]), int(context["model_params_after"]),
                _weight_error(model, result.report.records),
                output_error(result.module, model, x), output_error(repaired.module, model, x),
                output_error(final, model, x) if distill_steps else math.nan, acc_original,
                accuracy(result.module, x, y), accuracy(repaired.module, x, y),
                accuracy(final, x, y) if distill_steps else math.nan, t2 - t1, t3 - t2))
    settings = {"epochs": epochs, "width": width, "calib_batches": len(calib), "batch_size": batch_size,
                "distill_steps": distill_steps, "distill_lr": distill_lr, "seed": seed,
                "train": int(data.x_train.shape[0]), "test": int(data.x_test.shape[0]),
                "threads": torch.get_num_threads(), "torch": torch.__version__}
    return DemoResult(tuple(rows), acc_original, train_seconds, time.perf_counter() - start, settings, model)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fxrewrite.demos.digits``: print the cost table and the accuracy table (or ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m fxrewrite.demos.digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and distillation steps")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--distill-steps", type=int, default=None)
    parser.add_argument("--forms", default=",".join(FORMS),
                        help=f"comma-separated forms ({', '.join((*FORMS, *EXTRA_FORMS))})")
    parser.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS), help="comma-separated MAC ratios")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: fastest here)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (8 if args.quick else 15)
    steps = args.distill_steps if args.distill_steps is not None else (50 if args.quick else 150)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    bad = [f for f in forms if f not in FORMS and f not in EXTRA_FORMS]
    if bad:
        parser.error(f"unknown form(s) {bad}; forms: {', '.join((*FORMS, *EXTRA_FORMS))}")
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    result = run_demo(forms=forms, targets=targets, epochs=epochs, distill_steps=steps, seed=args.seed,
                      progress=sys.stderr.isatty(), threads=args.threads)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
