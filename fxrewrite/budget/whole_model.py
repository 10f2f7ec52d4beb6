"""Whole-model latency for budgets: the check every target makes and the bound of a latency target.

**The check** (``check_model_latency``, run by ``rewrite`` with any ``Target`` unless ``check_latency=False``):
the original and the rewritten model are timed on the example inputs (``time_models``: ``warmup`` untimed rounds,
then rounds of one call of each, interleaved, until ``max_runs`` rounds or ``max_seconds`` have passed after at least
``min_runs``; the figure is the median in milliseconds) on the target's backend (eager for a MAC / params target;
``inductor``: both compiled with ``torch.compile``, the compilation in the untimed warm-up).
The report gets a ``whole-model latency`` section and ``context["model_latency"]``; a rewritten model slower than
the original by more than ``SLOWER_TOLERANCE`` (2%, above the noise of interleaved medians) also raises a
``UserWarning``, because a MAC saving does not always buy time (a 1x1 conv after a depthwise one reads and writes
one more activation).

**The bound** (``fit_latency``, ``Target(latency=f)``): per-layer timings (``fxrewrite.budget.layer_latency``) give
the candidates and a first plan whose summed site latencies meet ``f``; the plan's architecture (built with
``structure_only``: no factorisation) is then timed as a whole against the original. A measurement that meets
``f`` by less than two standard errors of its ratio (from the interleaved rounds' own ratios, ``ratio_se``) is
repeated and the slower of the two decides: on the trained pitch model at batch 64 one measurement's ratio varies by
about 0.01 between runs on a quiet machine (0.03-0.05 with other work on its two cores), so a plan measured once at
0.69x was 0.70x when measured again. While the measured ratio is
above ``f`` the per-layer budget is lowered by the measured excess (in milliseconds, and at least by the ratio
``f / measured`` and by 0.02) and the plan chosen again from the same measurements (nothing is timed twice per
layer); after ``max_rounds`` plans, or when no plan meets the lowered per-layer budget, ``BudgetInfeasible`` gives
every round's figures. Tightening by the measured excess can overshoot (on the pitch model a per-layer budget
lowered after a plan at 0.80x gave a plan at 0.52x for a 0.7x bound), so when the accepted plan is more than 5%
under the bound, up to ``refine`` (2) more plans are measured by bisecting the per-layer budget between it and the
last plan that was too slow, and the least-error plan that meets the bound is kept. ``f >= 1`` without other bounds
falls back to keeping every conv (the original is never slower than itself). So a plan returned in latency mode was
measured at most ``f`` times the original's time, and never slower than it. The plan's ``model_latency`` says what
was timed, each round and how long it all took.

>>> import torch
>>> a, b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(3, 8, 1)
>>> t = time_models(a, b, (torch.randn(1, 3, 8, 8),), max_runs=3, min_runs=2)
>>> t.runs >= 2 and t.original_ms > 0 and t.ratio == t.rewritten_ms / t.original_ms
True
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import statistics
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from fxrewrite.budget.choose import PreparedBudget
from fxrewrite.budget.plan import BudgetPlan
from fxrewrite.budget.target import BudgetInfeasible, Target
from fxrewrite.errors import ConfigError
from fxrewrite.measure.latency import ort_session, time_round_robin, torch_threads
from fxrewrite.util.runtime import device_of, eval_mode

__all__ = ["SLOWER_TOLERANCE", "ModelTiming", "check_model_latency", "fit_latency", "plan_budget",
           "ratio_standard_error", "time_models"]

SLOWER_TOLERANCE = 0.02
REFINE_SLACK = 0.05  # an accepted plan faster than (1 - this) x the bound is refined towards the bound
MODEL_BACKENDS = ("eager", "channels_last", "onnxruntime", "cuda", "inductor")


@dataclass(frozen=True)
class ModelTiming:
    """Median milliseconds of the original and the rewritten model over ``runs`` interleaved rounds."""

    backend: str
    original_ms: float
    rewritten_ms: float
    runs: int
    warmup: int
    threads: int
    seconds: float
    input_shapes: tuple[tuple[int, ...], ...]
    device: str
    ratio_se: float = 0.0  # standard error of ``ratio`` from the rounds' own ratios (0: exact, e.g. a fake timer)
    ratios: tuple[float, ...] | None = None  # every measurement's ratio when this one was confirmed by another

    @property
    def ratio(self) -> float:
        return self.rewritten_ms / self.original_ms if self.original_ms > 0 else 1.0

    @property
    def slower(self) -> bool:
        """Slower than the original by more than ``SLOWER_TOLERANCE``."""
        return self.ratio > 1.0 + SLOWER_TOLERANCE

    def describe(self) -> str:
        """What was timed, in words."""
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes) or "no tensor inputs"
        return (f"{self.backend} on {self.device}, {self.threads} thread(s), inputs {shapes}, median of {self.runs} "
                f"interleaved runs after {self.warmup} warm-up ({self.seconds:.2f} s)")

    def line(self) -> str:
        verdict = (f"SLOWER than the original ({self.ratio:.3f}x)" if self.slower
                   else f"{self.ratio:.3f}x the original's time")
        return (f"whole model: original {self.original_ms:.3f} ms, rewritten {self.rewritten_ms:.3f} ms: {verdict} "
                f"[{self.describe()}]")

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "original_ms": self.original_ms, "rewritten_ms": self.rewritten_ms,
                "ratio": self.ratio, "slower": self.slower, "tolerance": SLOWER_TOLERANCE, "runs": self.runs,
                "warmup": self.warmup, "threads": self.threads, "seconds": self.seconds,
                "input_shapes": [list(s) for s in self.input_shapes], "device": self.device,
                "ratio_se": self.ratio_se}


ModelTimer = Callable[..., ModelTiming]


def _map(inputs: Sequence[Any], fn: Callable[[torch.Tensor], Any]) -> tuple[Any, ...]:
    return tuple(fn(x) if isinstance(x, torch.Tensor) else x for x in inputs)


def _calls(original: nn.Module, rewritten: nn.Module, inputs: tuple[Any, ...], backend: str, threads: int
           ) -> tuple[list[Callable[[], Any]], Callable[[], None], Any, str]:
    """The two calls to time on ``backend``, the sync, something to keep alive (temporary files) and the device."""
    device = device_of(original) or torch.device("cpu")
    sync: Callable[[], None] = lambda: None  # noqa: E731
    if backend == "cuda" or device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("latency backend 'cuda' needs a GPU (torch.cuda.is_available() is False)")
        device = device if device.type == "cuda" else torch.device("cuda")
        sync = torch.cuda.synchronize
    if backend == "onnxruntime":
        try:
            ort = importlib.import_module("onnxruntime")
        except ImportError as exc:
            raise ConfigError("latency backend 'onnxruntime' needs onnxruntime (pip install onnxruntime)") from exc
        tmp = tempfile.TemporaryDirectory(prefix="fxrewrite-model-latency-")
        feed_inputs = _map(inputs, lambda x: x.detach().cpu())
        calls = []
        for i, m in enumerate((original, rewritten)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session = ort_session(ort, m, feed_inputs, os.path.join(tmp.name, f"m{i}.onnx"), threads)
            feed = {a.name: x.numpy() for a, x in zip(session.get_inputs(), feed_inputs, strict=False)}
            calls.append(lambda s=session, f=feed: s.run(None, f))
        return calls, sync, tmp, "cpu"
    models: list[nn.Module] = [original, rewritten]
    xs = _map(inputs, lambda x: x.contiguous())
    if backend == "cuda" and (device_of(original) or torch.device("cpu")).type != "cuda":
        models = [copy.deepcopy(m).to(device) for m in models]
        xs = _map(xs, lambda x: x.to(device))
    elif backend == "channels_last":
        models = [copy.deepcopy(m).to(memory_format=torch.channels_last) for m in models]
        xs = _map(xs, lambda x: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
    elif backend == "inductor":
        models = [_compiled(m) for m in models]
    return [lambda m=m: m(*xs) for m in models], sync, None, str(device)


_COMPILED: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _compiled(module: nn.Module) -> nn.Module:
    """``torch.compile(module)`` (inductor), once per module object: the original is compiled once however many
    plans are measured against it."""
    if module not in _COMPILED:
        _COMPILED[module] = torch.compile(module, backend="inductor", dynamic=False)
    return _COMPILED[module]


def time_models(original: nn.Module, rewritten: nn.Module, inputs: Sequence[Any], backend: str = "eager", *,
                threads: int | None = None, min_runs: int = 3, max_runs: int = 15, max_seconds: float = 2.0,
                warmup: int = 1) -> ModelTiming:
    """Time both models on ``inputs`` (see the module docstring): at least ``min_runs`` and at most ``max_runs``
    interleaved rounds, stopping once ``max_seconds`` have passed; eval mode, ``torch.no_grad``, ``threads``
    intra-op threads (None: the current setting). ``inductor`` compiles both with ``torch.compile`` (the warm-up
    round includes the compilation, which is not timed)."""
    if backend not in MODEL_BACKENDS:
        raise ConfigError(f"unknown latency backend {backend!r}; valid: {', '.join(MODEL_BACKENDS)}")
    if min_runs < 1 or max_runs < min_runs or warmup < 0:
        raise ConfigError(f"time_models needs 1 <= min_runs <= max_runs and warmup >= 0, got {min_runs}, "
                          f"{max_runs}, {warmup}")
    inputs = tuple(inputs)
    with torch_threads(threads) as used, eval_mode(original, rewritten), torch.no_grad():
        calls, sync, keep_alive, device = _calls(original, rewritten, inputs, backend, used)
        try:
            start = time.perf_counter()
            times = time_round_robin(calls, 1, max(warmup, 1 if backend == "inductor" else 0), sync)
            timed_from = time.perf_counter()
            while len(times[0]) < max_runs and (len(times[0]) < min_runs
                                                or time.perf_counter() - timed_from < max_seconds):
                for out, more in zip(times, time_round_robin(calls, 1, 0, sync), strict=True):
                    out.extend(more)
            seconds = time.perf_counter() - start
        finally:
            if keep_alive is not None:
                keep_alive.cleanup()
    shapes = tuple(tuple(int(d) for d in x.shape) for x in inputs if isinstance(x, torch.Tensor))
    return ModelTiming(backend, statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3, len(times[0]),
                       warmup, used, seconds, shapes, device, ratio_standard_error(times[0], times[1]))


def ratio_standard_error(original: Sequence[float], rewritten: Sequence[float]) -> float:
    """Standard error of a median-of-rounds ratio from the interleaved rounds' own ratios ``b_i / a_i``: 1.2533 x
    the robust sigma (1.4826 x their median absolute deviation) / sqrt(rounds); 0.0 under 3 rounds.

    >>> round(ratio_standard_error([1.0, 1.0, 1.0, 1.0], [0.5, 0.6, 0.7, 0.6]), 4)
    0.0465
    """
    ratios = [b / a for a, b in zip(original, rewritten, strict=True) if a > 0]
    if len(ratios) < 3:
        return 0.0
    mid = statistics.median(ratios)
    mad = statistics.median(abs(r - mid) for r in ratios)
    return 1.2533 * 1.4826 * mad / len(ratios) ** 0.5


def check_model_latency(original: nn.Module, rewritten: nn.Module, inputs: Sequence[Any], plan: BudgetPlan, *,
                        timer: ModelTimer | None = None) -> ModelTiming | None:
    """The whole-model check of a budget's result (None with ``check_latency=False``, or when nothing changed):
    the latency target's final measurement when the plan has one (``fit_latency`` timed exactly this architecture),
    else a fresh ``time_models`` on the target's backend (at most 1 s of timed rounds after 3); warns when the rewritten
    model is slower."""
    target = plan.target
    timing = plan.model_latency.get("timing") if plan.model_latency else None
    if timing is None:
        if not target.check_latency or not plan.changed:
            return None
        device = device_of(original)
        if device is not None and device.type == "meta":
            return None
        try:
            timing = (timer or time_models)(original, rewritten, inputs, target.backend, max_seconds=1.0)
        except (RuntimeError, TypeError, ValueError) as exc:  # the check informs; it never fails a rewrite
            warnings.warn(f"could not time the whole model on {target.backend} for the latency check "
                          f"({type(exc).__name__}: {exc}); Target(..., check_latency=False) skips it",
                          UserWarning, stacklevel=4)
            return None
    if timing.slower:
        warnings.warn(f"the rewritten model is slower than the original: {timing.line()}. Fewer MACs do not always "
                      f"mean less time on this backend; use Target(latency=...) to bound the measured latency, or "
                      f"Target(..., check_latency=False) to skip this check.", UserWarning, stacklevel=4)
    return timing


def _keep_all(prepared: PreparedBudget, target: Target) -> BudgetPlan:
    """The plan that changes nothing (for a latency bound of 1 or more that no rewrite met)."""
    from fxrewrite.budget.plan import SiteChoice
    timed = prepared.timed
    choices = tuple(SiteChoice(s.name, cands[0], s.macs, s.params, float(prepared.weights.get(s.name, 1.0)),
                               len(cands), timed.keep_ms[s.name] if timed else None,
                               timed.pruned[s.name] if timed else 0) for s, cands in prepared.considered)
    lat = sum(timed.keep_ms.values()) if timed else None
    info = MappingProxyType(prepared.timing.describe() | {"configs": timed.configs, "off_grid": timed.off_grid}
                            ) if timed and prepared.timing is not None else MappingProxyType({})
    return BudgetPlan(target, choices, prepared.macs_before, prepared.params_before, prepared.macs_before,
                      prepared.params_before, 0.0, "keep", prepared.forms, excluded=prepared.excluded,
                      error_metric=prepared.error_metric, latency_before_ms=lat, latency_after_ms=lat,
                      latency_info=info)


def fit_latency(prepared: PreparedBudget, original: nn.Module, gm: torch.fx.GraphModule, inputs: Sequence[Any], *,
                timer: ModelTimer | None = None, max_rounds: int = 6, method: str = "auto",
                objective: str = "log-cosine", timer_options: Mapping[str, Any] | None = None,
                confirm: float = 2.0, refine: int = 2) -> BudgetPlan:
    """The plan whose whole model, measured against ``original`` on ``inputs``, is within ``prepared.target``'s
    latency bound (see the module docstring). ``gm`` is the traced original with shapes (copied, not changed);
    ``timer`` replaces ``time_models`` (same signature; tests inject a deterministic one). A measurement that meets
    the bound by less than ``confirm`` standard errors of its ratio (``ModelTiming.ratio_se``) is taken again and
    the slower of the two decides (0 turns this off). When the accepted plan is faster than the bound by more than
    ``REFINE_SLACK`` and a looser per-layer budget measured too slow, up to ``refine`` more plans between the two are
    measured (bisection) and the least-objective plan that meets the bound is returned."""
    target = prepared.target
    if target.latency is None:
        raise ConfigError("fit_latency needs a latency target")
    bound = target.latency
    timer = timer or time_models
    start = time.perf_counter()
    rounds: list[dict[str, Any]] = []
    fraction = bound
    floor = _fastest_fraction(prepared)
    last: BudgetInfeasible | None = None
    accepted: tuple[BudgetPlan, ModelTiming | None] | None = None
    seen: dict[tuple[Any, ...], float] = {}  # the choices of every plan measured -> its measured ratio
    too_slow: list[float] = []  # per-layer budgets whose plans measured above the bound

    def measure(plan: BudgetPlan) -> ModelTiming:
        structure = plan.apply(copy.deepcopy(gm), structure_only=True).graph_module
        timing = timer(original, structure, inputs, target.backend, **dict(timer_options or {}))
        if timing.ratio <= bound < timing.ratio + confirm * timing.ratio_se:  # within its noise of the bound
            again = timer(original, structure, inputs, target.backend, **dict(timer_options or {}))
            slower = max(timing, again, key=lambda t: t.ratio)  # the slower measurement stands
            return dataclasses.replace(slower, ratios=(timing.ratio, again.ratio))
        return timing

    while len(rounds) < max_rounds:
        try:
            plan = prepared.plan(dataclasses.replace(target, latency=fraction), method=method, objective=objective)
        except BudgetInfeasible as exc:
            last = exc
            break
        if not plan.changed:
            if bound >= 1.0:
                accepted = (plan, None)
            break
        predicted = plan.latency_fraction if plan.latency_fraction is not None else fraction
        signature = plan.signature
        if signature not in seen:  # a plan measured before (same choices) is not timed again
            timing = measure(plan)
            seen[signature] = timing.ratio
            rounds.append(_round(plan, fraction, predicted, timing))
            if timing.ratio <= bound:
                accepted = (plan, timing)
                break
            too_slow.append(fraction)
        if fraction <= floor:
            break  # the fastest per-layer plan was measured and is still too slow
        ratio = rounds[-1]["ratio"]
        excess = rounds[-1]["rewritten_ms"] - bound * rounds[-1]["original_ms"]
        base = min(fraction, predicted)  # below the plan just measured, so the next one differs
        steps = [base * bound / ratio, base - 0.02]
        sites_before, sites_after = plan.latency_before_ms or 0.0, plan.latency_after_ms or 0.0
        if sites_before > 0 and sites_after - excess > 0:  # the excess taken off the per-layer sum, in ms
            steps.append((sites_after - excess) / sites_before)
        fraction = max(min(steps), floor)
    if accepted is not None and accepted[1] is not None and too_slow and refine > 0:
        accepted = _refine(prepared, accepted, rounds[-1]["sites_fraction_budget"], min(too_slow), bound, measure,
                           rounds, seen, refine, method, objective)
    seconds = time.perf_counter() - start
    if accepted is None and bound >= 1.0 and target.macs is None and target.params is None:
        accepted = (_keep_all(prepared, dataclasses.replace(target, latency=bound)), None)
    if accepted is None and not rounds and last is not None:
        raise last  # no per-layer plan at all: its own message says why
    if accepted is None:
        shown = "; ".join(f"per-layer budget {r['sites_fraction_budget']:.3f}x -> {r['changed_sites']} site(s) "
                          f"changed, measured {r['rewritten_ms']:.3f} ms vs {r['original_ms']:.3f} ms "
                          f"({r['ratio']:.3f}x)" for r in rounds) or "no plan was measured"
        why = f" The per-layer plan then became infeasible: {last}" if last is not None else ""
        raise BudgetInfeasible(f"target latency <= {bound:g}x of the whole model cannot be met on {target.backend} "
                               f"at inputs {_shapes(inputs)}: {len(rounds)} plan(s) measured in {seconds:.1f} s: "
                               f"{shown}.{why} Use a looser target, more forms, a larger batch (fixed per-call "
                               "costs weigh less), or a MAC target.")
    plan, timing = accepted
    info: dict[str, Any] = {"bound": bound, "rounds": rounds, "seconds": seconds,
                            "timed": "the whole original model vs the plan's architecture (random weights), "
                                     f"interleaved, on {target.backend} at inputs {_shapes(inputs)}",
                            "timing": timing}
    seconds_all = dict(plan.seconds) | {"whole_model": seconds}
    return dataclasses.replace(plan, target=target, model_latency=MappingProxyType(info),
                               seconds=MappingProxyType(seconds_all))


def _round(plan: BudgetPlan, budget: float, predicted: float, timing: ModelTiming, refine: bool = False
           ) -> dict[str, Any]:
    out = {"sites_fraction_budget": budget, "sites_fraction_predicted": predicted,
           "changed_sites": len(plan.changed), "original_ms": timing.original_ms, "rewritten_ms": timing.rewritten_ms,
           "ratio": timing.ratio, "runs": timing.runs, "ratio_se": timing.ratio_se,
           "measurements": list(timing.ratios or (timing.ratio,)), "objective": plan.objective}
    return out | {"refine": True} if refine else out


def _refine(prepared: PreparedBudget, accepted: tuple[BudgetPlan, ModelTiming | None], lo: float, hi: float,
            bound: float, measure: Callable[[BudgetPlan], ModelTiming], rounds: list[dict[str, Any]],
            seen: dict[tuple[Any, ...], float], refine: int, method: str, objective: str
            ) -> tuple[BudgetPlan, ModelTiming | None]:
    """Bisect the per-layer budget between ``lo`` (its plan met the bound) and ``hi`` (its plan did not) for at most
    ``refine`` more measured plans, keeping the least-objective plan that meets the bound: tightening steps by the
    measured excess and can overshoot (a plan at 0.50x for a 0.7x bound cuts more than it must)."""
    target = prepared.target
    for _ in range(4 * refine):  # plans already measured cost nothing; bounded all the same
        timing = accepted[1]
        if refine <= 0 or timing is None or timing.ratio >= bound * (1.0 - REFINE_SLACK) or hi - lo < 0.01:
            break
        mid = (lo + hi) / 2
        try:
            plan = prepared.plan(dataclasses.replace(target, latency=mid), method=method, objective=objective)
        except BudgetInfeasible:
            break
        signature = plan.signature
        if signature in seen:  # the same choices as a plan measured before: move the bracket without timing
            lo, hi = (mid, hi) if seen[signature] <= bound else (lo, mid)
            continue
        refine -= 1
        measured = measure(plan)
        seen[signature] = measured.ratio
        predicted = plan.latency_fraction if plan.latency_fraction is not None else mid
        rounds.append(_round(plan, mid, predicted, measured, refine=True))
        if measured.ratio <= bound:
            lo = mid
            if plan.objective < accepted[0].objective:
                accepted = (plan, measured)
        else:
            hi = mid
    return accepted


def _fastest_fraction(prepared: PreparedBudget) -> float:
    """The smallest per-layer latency fraction any plan reaches (every site on its fastest candidate)."""
    timed = prepared.timed
    if timed is None:
        return 0.0
    before = sum(timed.keep_ms.values())
    saving = sum(timed.keep_ms[s.name] - min(c.latency_ms or 0.0 for c in cands) for s, cands in prepared.considered)
    return (before - saving) / before * (1 + 1e-9) if before > 0 else 0.0


def _shapes(inputs: Sequence[Any]) -> str:
    return ", ".join("x".join(map(str, x.shape)) for x in inputs if isinstance(x, torch.Tensor)) or "none"


def plan_budget(original: nn.Module, gm: torch.fx.GraphModule, inputs: Sequence[Any], target: Target,
                forms: Any, *, timer: ModelTimer | None = None, **options: Any) -> BudgetPlan:
    """What ``rewrite(..., target=...)`` plans: ``choose_plan`` (``options`` are its keywords), and with a latency
    target ``fit_latency`` on top, so the bound holds on the whole model measured against ``original``. With
    ``calibration`` and no latency bound, ``fit_end_to_end`` (``fxrewrite.budget.end_to_end``): the plan is measured
    on the whole model and re-planned while worse than predicted, and never worse than a uniform plan
    (``end_to_end={...}``: its keywords)."""
    from fxrewrite.budget.choose import choose_plan, prepare_budget
    if target.latency is None and options.get("calibration") is not None:
        from fxrewrite.budget.end_to_end import fit_end_to_end
        plan_options = {k: options.pop(k) for k in ("method", "objective", "buckets") if k in options}
        e2e_options = options.pop("end_to_end", None) or {}
        return fit_end_to_end(prepare_budget(gm, target, forms, **options), gm, options["calibration"],
                              input_fn=options.get("input_fn"), **plan_options, **e2e_options)
    if target.latency is None:
        return choose_plan(gm, target, forms, **options)
    keys = ("method", "objective")
    plan_options = {k: options.pop(k) for k in keys if k in options}
    options.pop("buckets", None)
    return fit_latency(prepare_budget(gm, target, forms, **options), original, gm, inputs, timer=timer,
                       **plan_options)
