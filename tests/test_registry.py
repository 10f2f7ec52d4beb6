"""The open pass registry: what ``register`` accepts and refuses, how entry points are discovered (lazily, with a
warning for a broken one), and that the built-in passes declare what the rest of fxrewrite reads from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

import fxrewrite
from fxrewrite.errors import ConfigError
from fxrewrite.graph.sites import REWRITE_KINDS
from fxrewrite.passes import REGISTRY, Built, ConvRewritePass, Pass, parse_spec, register, unregister
from fxrewrite.passes.registry import PassRegistry, eligibility_columns

TESTS = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Identity(ConvRewritePass):
    """Replaces a conv by a copy of itself (a pass with no kind: ``check`` says everything)."""

    name = "identity-copy"
    structure_options = MappingProxyType({"init": "random"})
    init: str = "copy"

    def build(self, site: object, conv: torch.nn.Conv2d) -> Built:
        return Built(torch.nn.Sequential(conv), 0.0, True)


def test_register_is_a_decorator_and_unregister_undoes_it() -> None:
    assert register(Identity) is Identity and REGISTRY["identity-copy"] is Identity
    try:
        assert register(Identity) is Identity  # again: nothing changes
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
        result = fxrewrite.rewrite(model, (torch.randn(1, 3, 8, 8),), passes="identity-copy")
        assert [r.status for r in result.report.records] == ["rewritten"]
    finally:
        assert unregister("identity-copy") is Identity
    assert "identity-copy" not in REGISTRY
    with pytest.raises(ConfigError, match="unknown pass 'identity-copy'"):
        fxrewrite.rewrite(model, (torch.randn(1, 3, 8, 8),), passes="identity-copy")


def _refusal(cls: object) -> str:
    with pytest.raises(ConfigError) as info:
        register(cls)  # type: ignore[arg-type]
    return str(info.value)


def test_register_refuses_what_is_not_a_pass() -> None:
    assert "not a subclass of fxrewrite.passes.Pass" in _refusal(int)
    assert "not a subclass of fxrewrite.passes.Pass" in _refusal(Identity())

    class NoName(Pass):
        pass
    assert "it needs a name" in _refusal(NoName)

    class NotADataclass(Identity):
        name = "not-a-dataclass"
    assert "must be a @dataclass(frozen=True) of its own" in _refusal(NotADataclass)

    @dataclasses.dataclass(frozen=True)
    class Clash(Identity):
        name = "grouped"
    assert "the name 'grouped' is already registered by fxrewrite.passes.grouped.Grouped" in _refusal(Clash)

    @dataclasses.dataclass(frozen=True)
    class Keep(Identity):
        name = "keep"
    assert "'keep' is reserved" in _refusal(Keep)

    @dataclasses.dataclass(frozen=True)
    class Several(Identity):
        name = "several problems"
    assert "letters, digits" in _refusal(Several)

    @dataclasses.dataclass(frozen=True)
    class Wrong(Identity):
        name = "wrong"
        kind = "spatial"
        structure_options = MappingProxyType({"rank": 1})
        budget_forms = MappingProxyType({"grouped": dict})
    text = _refusal(Wrong)
    assert text.startswith("cannot register pass class ") and "<locals>.Wrong: " in text
    assert "kind 'spatial' is not a structural rewrite kind" in text
    assert "structure_options must map some of its options ['init']" in text
    assert "budget form 'grouped' is already offered by pass 'grouped'" in text
    assert "wrong" not in REGISTRY


def test_broken_entry_points_are_warnings_naming_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from outside_pass.install import write_distribution
    write_distribution(tmp_path, "broken-passes", {"fxrewrite.passes": {
        "missing": "no_such_module_here:Thing", "not-a-pass": "outside_pass:exact_rank",
        "spatial": "outside_pass:SpatialSeparable"}})
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = PassRegistry()
    with pytest.warns(RuntimeWarning) as caught:
        assert list(registry) == ["spatial-separable"]  # the first lookup loads them
    messages = [str(w.message) for w in caught]
    assert any("entry point missing = no_such_module_here:Thing (group 'fxrewrite.passes', distribution "
               "broken-passes): ModuleNotFoundError" in m for m in messages), messages
    assert any("entry point not-a-pass = outside_pass:exact_rank" in m and "not a subclass" in m for m in messages)
    assert any("registers pass 'spatial-separable': name the entry point after the pass" in m for m in messages)
    assert "spatial-separable" not in REGISTRY  # a separate registry: the global one is untouched


def test_builtin_passes_declare_columns_structure_and_kinds() -> None:
    assert [h for h, _ in eligibility_columns()] == ["dw-sep", "grouped-sep", "grouped"]
    for cls in REGISTRY.values():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert cls.structure_options == ({"init": "random"} if "init" in fields else {})
        assert getattr(cls, "kind", "") in ("", *REWRITE_KINDS)


def test_parse_spec_is_the_pipeline_grammar() -> None:
    assert parse_spec(" grouped-separable { groups = 4|8 , max_rank=16 } ") == (
        "grouped-separable", {"groups": "4|8", "max_rank": "16"})
    with pytest.raises(ConfigError, match=r"cannot parse 'a\{b': expected name"):
        parse_spec("a{b")
    with pytest.raises(ConfigError, match="option 'rank' needs a value"):
        parse_spec("x{rank}")
