"""Replayable rewrite plans: rebuild a rewritten architecture on a freshly built model, then load its weights.

A ``RewritePlan`` lists, in application order, every site a rewrite changed with the pass and the effective options
used there. ``apply_plan(fresh_model, plan)`` re-runs those passes (looked up in the pass registry) restricted to
exactly those sites, building the new modules with each pass's ``structure_options`` (e.g. ``init=random``: structure
only, no factorisation), so the result has the same state_dict keys and shapes as the rewritten module and
``load_state_dict(saved, strict=True)`` restores it. With weights saved as
safetensors (``fxrewrite.save(..., "model.safetensors")``) nothing needs ``torch.load(weights_only=False)``.

>>> import torch, fxrewrite
>>> from fxrewrite.io.replay import apply_plan, plan_from_result, RewritePlan
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
>>> result = fxrewrite.rewrite(model, (torch.randn(1, 3, 16, 16),), passes="grouped{groups=2}")
>>> plan = RewritePlan.from_json(plan_from_result(result).to_json())
>>> [(e.site, e.pass_name, e.options["groups"]) for e in plan.entries]
[('2', 'grouped', 2)]
>>> rebuilt = apply_plan(model, plan)
>>> rebuilt.load_state_dict(result.module.state_dict(), strict=True)
<All keys matched successfully>
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import ConfigError, FxRewriteError
from fxrewrite.util.files import atomic_write_text

SCHEMA = "fxrewrite.plan"
SCHEMA_VERSION = 1
REPLAYED_STATUSES = ("rewritten",)


class PlanMismatch(FxRewriteError):
    """A plan does not fit the model it is applied to (a site is missing or no longer eligible)."""


@dataclass(frozen=True)
class PlanEntry:
    """One rewritten site: the qualified name, the pass's CLI name and the effective options used there."""

    site: str
    pass_name: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "pass": self.pass_name, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanEntry:
        try:
            return cls(str(d["site"]), str(d["pass"]), MappingProxyType(dict(d.get("options") or {})))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"plan entry {d!r} needs 'site', 'pass' and optional 'options'") from exc


def _versions() -> tuple[str, str]:
    from fxrewrite.version import __version__
    return __version__, torch.__version__


@dataclass(frozen=True)
class RewritePlan:
    """A JSON-serialisable recipe that rebuilds a rewritten architecture: ``entries`` in application order."""

    entries: tuple[PlanEntry, ...]
    input_shapes: tuple[tuple[int, ...], ...] | None = None
    fxrewrite_version: str = field(default_factory=lambda: _versions()[0])
    torch_version: str = field(default_factory=lambda: _versions()[1])
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": self.schema_version,
                "fxrewrite_version": self.fxrewrite_version, "torch_version": self.torch_version,
                "input_shapes": [list(s) for s in self.input_shapes] if self.input_shapes is not None else None,
                "entries": [e.to_dict() for e in self.entries]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RewritePlan:
        if d.get("schema") != SCHEMA:
            raise ConfigError(f"not an fxrewrite plan (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        version = d.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ConfigError(f"plan schema_version {version!r} is newer than this fxrewrite understands "
                              f"({SCHEMA_VERSION}); upgrade fxrewrite.")
        shapes = d.get("input_shapes")
        return cls(tuple(PlanEntry.from_dict(e) for e in d.get("entries", ())),
                   tuple(tuple(int(x) for x in s) for s in shapes) if shapes is not None else None,
                   str(d.get("fxrewrite_version", "?")), str(d.get("torch_version", "?")), version)

    @classmethod
    def from_json(cls, text: str) -> RewritePlan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"plan is not valid JSON: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> RewritePlan:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically."""
        return atomic_write_text(path, self.to_json() + "\n")


def plan_path_for(path: str | Path) -> Path:
    """Where the replay plan of a weights file lives: ``model.safetensors`` -> ``model.plan.json``.

    >>> plan_path_for("out/model.safetensors").as_posix()
    'out/model.plan.json'
    """
    p = Path(path)
    return p.with_name(p.stem + ".plan.json")


def plan_from_result(result: Any) -> RewritePlan:
    """The plan of a ``RewriteResult`` (or a ``Report``): its ``rewritten`` records, in order.

    >>> from fxrewrite.report.report import Report, SiteRecord
    >>> rec = SiteRecord(site="conv", pass_name="grouped", status="rewritten", options={"groups": 2})
    >>> plan_from_result(Report((rec,))).entries[0].to_dict()
    {'site': 'conv', 'pass': 'grouped', 'options': {'groups': 2}}
    """
    report = getattr(result, "report", result)
    records = getattr(report, "records", None)
    if records is None:
        raise ConfigError(f"plan_from_result needs a RewriteResult or Report, got {type(result).__name__}")
    if any(r.status == "planned" for r in records):
        raise ConfigError("this is a dry-run plan (status 'planned'); replay needs the result of rewrite().")
    entries = tuple(PlanEntry(r.site, r.pass_name, MappingProxyType(dict(r.options)))
                    for r in records if r.status in REPLAYED_STATUSES)
    shapes = report.context.get("input_shapes") if hasattr(report, "context") else None
    input_shapes = None
    if isinstance(shapes, list | tuple) and all(isinstance(s, list | tuple) for s in shapes):
        input_shapes = tuple(tuple(int(x) for x in s) for s in shapes)
    return RewritePlan(entries, input_shapes)


def _structure_pass(entry: PlanEntry) -> Any:
    """The entry's pass from the registry, with the entry's options and the pass's ``structure_options`` (which
    build the same modules without computing weights: the saved weights are loaded over them)."""
    from fxrewrite.passes import REGISTRY
    cls = REGISTRY.get(entry.pass_name)
    if cls is None:
        raise PlanMismatch(f"plan entry for site {entry.site!r} names unknown pass {entry.pass_name!r}; "
                           f"this fxrewrite has: {', '.join(sorted(REGISTRY))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    options = {k: v for k, v in entry.options.items() if k in fields}
    unknown = sorted(set(entry.options) - fields)
    if unknown:
        raise PlanMismatch(f"plan entry {entry.site!r}: pass {entry.pass_name!r} has no options {unknown}; the plan "
                           "was written by a different fxrewrite version.")
    options |= dict(cls.structure_options)
    return cls(**options)


def apply_plan(fresh_model: nn.Module, plan: RewritePlan, example_inputs: Any = None, *,
               concrete_args: Mapping[str, Any] | None = None, leaf_modules: Iterable[Any] = (),
               autowrap_functions: Iterable[Callable[..., Any]] = ()) -> torch.fx.GraphModule:
    """Rebuild the rewritten architecture on a copy of ``fresh_model`` (same class, any weights).

    The new modules are built with random weights (structure only); load the saved weights afterwards with
    ``load_state_dict(..., strict=True)``. ``example_inputs`` (default: zeros of the plan's input shapes) are only
    used for shape metadata. Raises ``PlanMismatch`` when a site is missing or the pass declines it.
    """
    from fxrewrite.graph.capture import trace
    from fxrewrite.graph.select import Rule
    from fxrewrite.graph.shapes import propagate_shapes
    if not isinstance(plan, RewritePlan):
        raise ConfigError(f"apply_plan needs a RewritePlan (RewritePlan.load(path)), got {type(plan).__name__}")
    gm = trace(fresh_model, concrete_args=concrete_args, leaf_modules=leaf_modules,
               autowrap_functions=autowrap_functions)
    if example_inputs is None and plan.input_shapes is not None:
        example_inputs = tuple(torch.zeros(s) for s in plan.input_shapes)
    if example_inputs is not None:
        propagate_shapes(gm, tuple(example_inputs))
    for i, entry in enumerate(plan.entries):
        p = _structure_pass(entry)
        try:
            result = p.run(gm, [Rule(entry.site)])
        except ConfigError as exc:
            raise PlanMismatch(f"plan entry {i} ({entry.pass_name} at {entry.site!r}) does not fit this model: "
                               f"{exc}. Build the same architecture the plan was recorded on.") from exc
        done = [r for r in result.records if r.site == entry.site and r.status in REPLAYED_STATUSES]
        if not done:
            why = "; ".join(f"{r.code}: {r.reason}" for r in result.records if r.site == entry.site) or "not found"
            raise PlanMismatch(f"plan entry {i} ({entry.pass_name} at {entry.site!r}) was not applied ({why}). "
                               "Build the same architecture the plan was recorded on.")
        gm = result.graph_module
        gm.graph.lint()
        gm.recompile()
    return gm


def load_rewritten(fresh_model: nn.Module, weights: str | Path, plan: RewritePlan | str | Path | None = None,
                   example_inputs: Any = None, **capture: Any) -> torch.fx.GraphModule:
    """Rebuild from ``weights`` (a .safetensors file) and its plan (default: the plan saved beside it or in the
    file's metadata) on ``fresh_model``; the weights load with ``strict=True``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = Path(weights)
    if plan is None:
        beside = plan_path_for(weights)
        if beside.exists():
            plan = RewritePlan.load(beside)
        else:
            with safe_open(str(weights), framework="pt") as f:
                text = (f.metadata() or {}).get("fxrewrite_plan")
            if text is None:
                raise ConfigError(f"{weights}: no plan beside it ({beside.name}) nor in its metadata; pass plan=.")
            plan = RewritePlan.from_json(text)
    elif not isinstance(plan, RewritePlan):
        plan = RewritePlan.load(plan)
    gm = apply_plan(fresh_model, plan, example_inputs, **capture)
    gm.load_state_dict(load_file(str(weights)), strict=True)
    return gm
