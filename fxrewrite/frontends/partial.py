"""Partial mode: rewrite inside the largest submodules that trace, and leave the rest of the model eager.

Some models do not trace as a whole: torchvision's detection models take a list of images and have data-dependent
control flow (anchors, NMS, per-image loops). ``rewrite_partial`` first tries the whole model; when it does not
trace, or when its inputs are not all tensors, it runs a copy of the model once on the example inputs with forward
pre-hooks that record each submodule's first call, then walks the module tree from the top:

- a submodule is a *unit* when its recorded positional inputs are tensors (plain Python constants - flags - are
  fixed with ``concrete_args``) and it traces; it is rewritten as a whole with ``fxrewrite.rewrite`` on its recorded
  inputs (verified against the original submodule on those inputs) and replaces the submodule in a deep copy;
- otherwise it stays eager, is listed in ``left_alone`` with the reason, and its children are tried instead.

Only submodules that contain an ``nn.Conv2d`` are considered (there is nothing to rewrite elsewhere). Submodules
kept opaque with ``leaf_modules`` are never entered; a submodule reachable under two names, or one whose parameters
are shared with modules outside it, is not rewritten on its own (a copy would untie it). A submodule called several
times is rewritten once from its first call's inputs; the replacement serves every call.

Selection rules are resolved once, over the sites of every unit, with qualified names from the root
(``backbone.body.layer1.0.conv1``): a rule that matches nothing is an error before anything is rewritten, and the
report's records carry the qualified names. The input model is never mutated.

>>> import torch
>>> from torch import nn
>>> class Detector(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
...     def forward(self, images):  # a list of images: not traceable as a whole
...         return [self.body(image.unsqueeze(0)) for image in images]
>>> model = Detector().eval()
>>> images = [torch.randn(3, 16, 16), torch.randn(3, 12, 12)]
>>> new, report, left_alone = rewrite_partial(model, (images,), "depthwise-separable{rank=exact}")
>>> [r.site for r in report.records if r.status == "rewritten"]
['body.0', 'body.2']
>>> left_alone  # doctest: +ELLIPSIS
[LeftAlone(qualname='', reason='takes a list argument ...')]
>>> torch.testing.assert_close(new(images)[1], model(images)[1])
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxrewrite.errors import ConfigError, FxRewriteError, TraceFailure
from fxrewrite.frontends.pipeline import as_passes, plan_graph, rewrite_graph
from fxrewrite.graph.capture import LeafSpec, check_traceable_type, trace
from fxrewrite.graph.select import Rule, Selection, parse_rules, resolve
from fxrewrite.graph.sites import ConvSite, find_sites
from fxrewrite.report.report import Report, SiteRecord
from fxrewrite.util.inputs import example_inputs_tuple

_CONSTANTS = (bool, int, float, str, type(None))


class LeftAlone(NamedTuple):
    """A submodule whose own forward stays eager, and why (``qualname`` is ``''`` for the model itself)."""

    qualname: str
    reason: str


@dataclass(frozen=True)
class _PinnedRule(Rule):
    """An exact-name rule for one site of a unit, carrying the decision a user's rule took for it globally."""

    origin: str = ""

    def describe(self) -> str:
        return self.origin or super().describe()


@dataclass(frozen=True)
class _Unit:
    """A traceable submodule: its qualified name, the original module, its recorded inputs and its trace."""

    qualname: str
    module: nn.Module
    inputs: tuple[Any, ...]
    concrete_args: Mapping[str, Any] | None
    gm: torch.fx.GraphModule

    @property
    def is_conv(self) -> bool:
        """A unit that is one Conv2d: ``trace`` wraps it as the child ``conv`` of a GraphModule."""
        return isinstance(self.module, nn.Conv2d)

    def qualify(self, local: str) -> str:
        """The qualified name, from the root, of a name inside the unit's trace (a site, or a node of a site)."""
        if self.is_conv and (local == "conv" or local.startswith("conv.")):
            return self.qualname + local[len("conv"):]
        return _join(self.qualname, local)

    def replacement(self, gm: torch.nn.Module) -> nn.Module:
        """What replaces the submodule: the rewritten GraphModule, or for a one-conv unit the new conv itself (so
        the state_dict keys are those of a whole-model rewrite: ``head.0.weight``, ``head.1.weight``)."""
        return gm.get_submodule("conv") if self.is_conv else gm


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _a(word: str) -> str:
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _trace_reason(exc: TraceFailure) -> str:
    """The TraceFailure's location and torch's message, on one line (the fix it suggests is for whole models)."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    head = lines[0] if lines else type(exc).__name__
    said = next((line.removeprefix("torch says: ") for line in lines if line.startswith("torch says:")), "")
    return f"does not trace: {head}" + (f" ({said})" if said else "")


def _leaf_specs_for(prefix: str, leaf_modules: Sequence[LeafSpec]) -> list[LeafSpec]:
    """The user's leaf modules as seen from the submodule at ``prefix`` (names relative to it; types as they are)."""
    if not prefix:
        return list(leaf_modules)
    out: list[LeafSpec] = []
    for spec in leaf_modules:
        if isinstance(spec, str):
            if spec.startswith(prefix + "."):
                out.append(spec[len(prefix) + 1:])
        else:
            out.append(spec)
    return out


def _is_leaf(name: str, module: nn.Module, leaf_modules: Sequence[LeafSpec]) -> bool:
    names = {s for s in leaf_modules if isinstance(s, str)}
    types = tuple(s for s in leaf_modules if isinstance(s, type))
    return name in names or bool(types and isinstance(module, types))


def _describe(value: Any) -> Any:
    """Shapes of the tensors in ``value`` (lists of images included), for the report's context."""
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in value.items()}
    return repr(value)


def _clone(value: Any) -> Any:
    """A detached copy of the tensors in ``value``: a recorded input must not change when the model later
    modifies that tensor in place (``ReLU(inplace=True)``)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), value)


def _record_calls(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """(args, kwargs) of the first call of every submodule that contains a Conv2d, from one forward of a copy."""
    work = copy.deepcopy(model)
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in calls:
                calls[name] = (_clone(args), _clone(kwargs))
        return record

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True)
               for name, m in work.named_modules() if name and _has_conv(m)]
    try:
        with torch.no_grad():
            work(*inputs)
    except Exception as exc:
        raise ConfigError(f"partial mode runs the model once on the example inputs to record each submodule's "
                          f"inputs, and {type(model).__name__} raised {type(exc).__name__}: {_first_line(exc)}. "
                          "Check the example inputs (a detection model takes a list of (C, H, W) images, in eval "
                          "mode).") from exc
    finally:
        for h in handles:
            h.remove()
    return calls


def _bind(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]
          ) -> tuple[tuple[Any, ...], dict[str, Any]] | str:
    """Positional inputs and concrete_args (the Python constants among them) for one recorded call, or why not."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        signature = None
    names: list[str] = []
    if signature is not None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            return f"its recorded call does not bind to forward{signature} ({exc})"
        bound.apply_defaults()
        positional: list[Any] = []
        for p in signature.parameters.values():
            value = bound.arguments.get(p.name, p.default)
            if p.kind is p.VAR_POSITIONAL:
                if value:
                    return "takes *args; torch.fx traces named arguments only"
            elif p.kind is p.VAR_KEYWORD:
                if value:
                    return "takes **kwargs; torch.fx traces named arguments only"
            elif p.kind is p.KEYWORD_ONLY:
                return f"has the keyword-only argument {p.name!r}; fxrewrite passes inputs positionally"
            else:
                names.append(p.name)
                positional.append(value)
        args = tuple(positional)
    elif kwargs:
        return "is called with keyword arguments and its forward's signature cannot be read"
    concrete: dict[str, Any] = {}
    for i, value in enumerate(args):
        name = names[i] if i < len(names) else f"argument {i}"
        if isinstance(value, torch.Tensor):
            continue
        if isinstance(value, _CONSTANTS) and i < len(names):
            concrete[name] = value
            continue
        return (f"takes {_a(type(value).__name__)} argument {name!r} (torch.fx traces tensor arguments; flags "
                "are fixed with concrete_args)")
    return args, concrete


def _sharing_problem(qualname: str, module: nn.Module, model: nn.Module,
                     module_names: Counter[int]) -> str | None:
    """Why ``module`` cannot be rewritten on its own copy: it is aliased, or shares a parameter with the outside."""
    if module_names[id(module)] > 1:
        return "the same module object is reachable under several names; rewriting one copy would untie them"
    inside = {id(p) for p in module.parameters()}
    prefix = qualname + "."
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in inside and not name.startswith(prefix):
            return f"shares the parameter {name!r} with a module outside it; rewriting a copy would untie them"
    return None


class _Walker:
    """Finds the units (largest traceable submodules) and the submodules left eager."""

    def __init__(self, model: nn.Module, calls: Mapping[str, tuple[tuple[Any, ...], dict[str, Any]]],
                 leaf_modules: Sequence[LeafSpec], autowrap_functions: Sequence[Callable[..., Any]]) -> None:
        self.model = model
        self.calls = calls
        self.leaf_modules = leaf_modules
        self.autowrap_functions = autowrap_functions
        self.module_names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.units: list[_Unit] = []
        self.left_alone: list[LeftAlone] = []

    def try_unit(self, qualname: str, module: nn.Module, inputs: tuple[Any, ...],
                 concrete: Mapping[str, Any] | None) -> str | None:
        """Trace ``module``: on success it becomes a unit (None is returned), otherwise the reason it is not one."""
        try:
            gm = trace(module, concrete_args=concrete or None,
                       leaf_modules=_leaf_specs_for(qualname, self.leaf_modules),
                       autowrap_functions=self.autowrap_functions)
        except TraceFailure as exc:
            return _trace_reason(exc)
        self.units.append(_Unit(qualname, module, inputs, dict(concrete) if concrete else None, gm))
        return None

    def visit_children(self, qualname: str, module: nn.Module, reason: str) -> None:
        children = [(n, c) for n, c in module.named_children() if _has_conv(c)]
        if children:
            reason += "; its children were tried instead"
        self.left_alone.append(LeftAlone(qualname, reason))
        for name, child in children:
            self.visit(_join(qualname, name), child)

    def visit(self, qualname: str, module: nn.Module) -> None:
        if not _has_conv(module):
            return
        if _is_leaf(qualname, module, self.leaf_modules):
            self.left_alone.append(LeftAlone(qualname, "kept opaque by leaf_modules: its convolutions are not "
                                             "visible"))
            return
        call = self.calls.get(qualname)
        if call is None:
            self.left_alone.append(LeftAlone(qualname, "not called by the forward on the example inputs (its "
                                             "convolutions never ran, so there are no inputs to trace it with)"))
            return
        problem = _sharing_problem(qualname, module, self.model, self.module_names)
        if problem is not None:
            self.visit_children(qualname, module, problem)
            return
        bound = _bind(module, *call)
        if isinstance(bound, str):
            self.visit_children(qualname, module, bound)
            return
        reason = self.try_unit(qualname, module, *bound)
        if reason is not None:
            self.visit_children(qualname, module, reason)


def _root_reason(inputs: tuple[Any, ...]) -> str | None:
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            return (f"takes {_a(type(x).__name__)} argument (input {i}): torch.fx traces tensor arguments, so "
                    "the model is not traced as a whole")
    return None


def _pinned_rules(unit: _Unit, selections: Mapping[str, Selection]) -> list[Rule]:
    """One exact rule per site of ``unit`` that reproduces the decision the user's rules took for it globally."""
    rules: list[Rule] = []
    for site in dict.fromkeys(s.name for s in find_sites(unit.gm)):
        sel = selections[unit.qualify(site)]
        origin = sel.rule.describe() if sel.rule is not None else "(no selection rule includes this site)"
        rules.append(_PinnedRule(site, options=sel.options, skip=not sel.selected, origin=origin))
    return rules


def _resolve_globally(units: Sequence[_Unit], rules: Sequence[Rule]) -> dict[str, Selection]:
    """Resolve ``rules`` over the sites of every unit with qualified names; unmatched rules raise ConfigError."""
    sites: list[ConvSite] = []
    for unit in units:
        sites += [dataclasses.replace(s, name=unit.qualify(s.name)) for s in find_sites(unit.gm)]
    return resolve(rules, sites)


def _qualify(record: SiteRecord, unit: _Unit) -> SiteRecord:
    site = unit.qualify(record.site)
    reason = record.reason
    if reason.startswith(f"{record.site}:"):
        reason = site + reason[len(record.site):]
    return dataclasses.replace(record, site=site, reason=reason)


def _merge_verifications(results: Sequence[tuple[_Unit, Any]]) -> Any:
    """One Verification from the units' (unit, Verification): sites and outputs carry qualified names."""
    from fxrewrite.verification.result import Verification
    checks = [(unit, v) for unit, v in results if v is not None]
    if not checks:
        return None
    first = checks[0][1]
    sites = tuple(dataclasses.replace(s, site=u.qualify(s.site)) for u, v in checks for s in v.sites)
    outputs = tuple(dataclasses.replace(o, name=f"{u.qualname}:{o.name}") for u, v in checks for o in v.outputs)
    failures = tuple(f"[{u.qualname}] {f}" for u, v in checks for f in v.failures)
    unchecked = [f"{u.qualname}: {v.numerics_reason}" for u, v in checks if not v.numerics_checked]
    return Verification(
        ok=all(v.ok for _, v in checks), failures=failures, sites=sites, outputs=outputs,
        numerics_checked=not unchecked, numerics_reason="; ".join(unchecked), rtol=first.rtol, atol=first.atol,
        level=first.level, dtype=first.dtype, batches=min(v.batches for _, v in checks), mode=first.mode)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _summary(units: Sequence[tuple[str, Any]], left_alone: Sequence[LeftAlone]) -> str:
    lines = ["rewritten submodules (traced as a whole; MACs from their own trace, 1 MAC = one multiply-add):"]
    for qualname, report in units:
        costs = report.costs
        macs = f"MACs {costs.macs_before} -> {costs.macs_after}" if costs is not None else "MACs not computed"
        changed = sum(1 for r in report.records if r.changed)
        lines.append(f"  {qualname or '<model>'}: {changed} site(s) changed; {macs}")
    if not units:
        lines.append("  none")
    lines.append("left eager (not traced; their children were tried where they have any):")
    lines += [f"  {entry.qualname or '<model>'}: {entry.reason}" for entry in left_alone] or ["  none"]
    return "\n".join(lines)


def rewrite_partial(model: nn.Module, example_inputs: Any, passes: Any, *, select: Any = None,
                    concrete_args: Mapping[str, Any] | None = None, leaf_modules: Iterable[LeafSpec] = (),
                    autowrap_functions: Iterable[Callable[..., Any]] = (), verify: bool | str = True,
                    rtol: float | None = None, atol: float | None = None, dry_run: bool = False
                    ) -> tuple[nn.Module, Report, list[LeftAlone]]:
    """Rewrite ``model`` where it traces: the whole model when it can, else its largest traceable submodules.

    Returns ``(module, report, left_alone)``: a working ``nn.Module`` (a GraphModule when the whole model traced,
    otherwise a deep copy of ``model`` whose traceable submodules are replaced by their rewritten GraphModules), a
    report whose records and verification carry qualified site names, and the submodules that were left eager with
    the reason for each. ``concrete_args`` applies to the whole model only; ``leaf_modules`` names are qualified
    from the root. ``verify``/``rtol``/``atol`` are passed to each unit's ``fxrewrite.rewrite``. ``dry_run=True``
    plans instead (the module returned is an unchanged copy). See the module docstring.
    """
    if isinstance(model, torch.export.ExportedProgram):
        raise ConfigError("partial mode rewrites eager nn.Modules that do not trace as a whole; an ExportedProgram is "
                          "one graph already: call fxrewrite.rewrite(ep, example_inputs, passes) without partial.")
    check_traceable_type(model)
    pipeline = as_passes(passes)
    rules = parse_rules(select)
    inputs = example_inputs_tuple(example_inputs)
    leaves = list(leaf_modules)
    autowrap = list(autowrap_functions)
    options = {"verify": verify, "rtol": rtol, "atol": atol}
    title = "fxrewrite plan (dry run: nothing was changed)" if dry_run else "fxrewrite rewrite"

    walker = _Walker(model, {}, leaves, autowrap)
    reason = _root_reason(inputs)
    if reason is None:
        reason = walker.try_unit("", model, inputs, concrete_args)
    if reason is None:  # the whole model traces: this is an ordinary rewrite
        capture = {"concrete_args": concrete_args, "leaf_modules": leaves, "autowrap_functions": autowrap}
        if dry_run:
            planned = plan_graph(model, inputs, pipeline, select=select, **capture)
            return copy.deepcopy(model), planned.report, []
        result = rewrite_graph(model, inputs, pipeline, select=select, **capture, **options)
        return result.module, result.report, []

    walker.calls = _record_calls(model, inputs)
    walker.visit_children("", model, reason)
    selections = _resolve_globally(walker.units, rules) if rules else None

    out = copy.deepcopy(model)
    records: list[SiteRecord] = []
    verifications: list[tuple[_Unit, Any]] = []
    unit_reports: list[tuple[str, Report]] = []
    for unit in walker.units:
        unit_rules = _pinned_rules(unit, selections) if selections is not None else None
        capture = {"concrete_args": unit.concrete_args, "leaf_modules": _leaf_specs_for(unit.qualname, leaves),
                   "autowrap_functions": autowrap}
        try:
            if dry_run:
                report = plan_graph(unit.module, unit.inputs, pipeline, select=unit_rules, **capture).report
                verification = None
            else:
                result = rewrite_graph(unit.module, unit.inputs, pipeline, select=unit_rules, **capture, **options)
                report, verification = result.report, result.verification
                out.set_submodule(unit.qualname, unit.replacement(result.module))
        except FxRewriteError as exc:
            raise type(exc)(f"partial mode, submodule {unit.qualname!r} ({type(unit.module).__name__}): "
                            f"{exc}") from exc
        records += [_qualify(r, unit) for r in report.records]
        verifications.append((unit, verification))
        unit_reports.append((unit.qualname, report))

    context = {
        "model": type(model).__name__, "input_shapes": _describe(list(inputs)),
        "passes": [p.spec() for p in pipeline], "partial": True,
        "units": [u.qualname for u in walker.units],
        "left_alone": [{"qualname": e.qualname, "reason": e.reason} for e in walker.left_alone],
        "model_params_before": _params(model), "model_params_after": _params(out),
    }
    summary = _summary(unit_reports, walker.left_alone)
    report = Report(tuple(records), title=f"{title} (partial: {len(walker.units)} submodule(s) rewritten, "
                    f"{len(walker.left_alone)} left eager)", context=context,
                    extra_sections=(("partial rewrite", summary),),
                    verification=_merge_verifications(verifications))
    return out, report, list(walker.left_alone)
