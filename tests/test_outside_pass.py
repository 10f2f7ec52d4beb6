"""A pass from outside fxrewrite, found the way an installed plugin is: ``tests/outside_pass`` (``spatial-separable``,
built on ``fxrewrite.passes.ConvRewritePass``) is declared in the ``fxrewrite.passes`` entry-point group of a
distribution whose ``.dist-info`` is written into a temporary folder on ``sys.path`` (no pip). It then runs through
everything a built-in pass does: pipeline strings, the dry run and its table, the CLI listing, a budget, and
save + replay. The numbers are checked, not just that it runs: exactness at full rank, the recorded error against
the error of the built weights, the recorded MACs against a count of the rewritten model's convolutions.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite.frontends.cli import main
from fxrewrite.passes import REGISTRY, discover, pass_class, unregister
from fxrewrite.passes.registry import PassRegistry

NAME = "spatial-separable"
TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Three convs the pass splits (one strided and dilated with a 3x5 kernel, one with reflect padding and no bias)
    and two it declines (grouped, 1x1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.wide = nn.Conv2d(8, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.point = nn.Conv2d(16, 8, 1)
        self.mirror = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.wide(x))
        return self.mirror(self.point(self.grouped(x)))


SPLIT = ("stem", "wide", "mirror")


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """``outside-pass`` 0.1 installed into ``tmp_path`` and discovered; unregistered afterwards."""
    from outside_pass.install import write_distribution
    assert NAME not in REGISTRY  # importing the package registers nothing: only the entry point does
    write_distribution(tmp_path, "outside-pass", {"fxrewrite.passes": {NAME: "outside_pass:SpatialSeparable"}})
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert discover() == [NAME]
    import outside_pass
    yield outside_pass
    if NAME in REGISTRY:
        unregister(NAME)


@pytest.fixture
def net() -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 3, 16, 16)


def counted_macs(module: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """MACs of every Conv2d of ``module`` on ``x``, counted from the output each one really produces."""
    out: dict[str, int] = {}
    handles = []
    for name, conv in module.named_modules():
        if isinstance(conv, nn.Conv2d):
            def hook(m: nn.Conv2d, _inp: object, y: torch.Tensor, name: str = name) -> None:
                out[name] = y.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            handles.append(conv.register_forward_hook(hook))
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    return out


def formula_macs(conv: nn.Conv2d, x_shape: tuple[int, ...], y_shape: tuple[int, ...], rank: int) -> int:
    """The split's MACs by hand: the (kh x 1) conv runs at the output height and the input width."""
    (kh, kw), n = conv.kernel_size, x_shape[0]
    return n * y_shape[2] * (rank * x_shape[3] * conv.in_channels * kh + conv.out_channels * y_shape[3] * rank * kw)


def test_found_through_importlib_metadata(installed: object) -> None:
    eps = [ep for ep in importlib.metadata.entry_points(group="fxrewrite.passes") if ep.name == NAME]
    assert [ep.value for ep in eps] == ["outside_pass:SpatialSeparable"]
    assert importlib.metadata.distribution("outside-pass").version == "0.1"
    assert pass_class(NAME) is installed.SpatialSeparable  # type: ignore[attr-defined]
    assert list(REGISTRY)[-1] == NAME  # after the built-in passes
    fresh = PassRegistry()  # a new registry loads the entry points on its first lookup
    assert fresh.get(NAME) is installed.SpatialSeparable  # type: ignore[attr-defined]
    assert discover() == []  # already there: nothing new


def test_pipeline_string_is_exact_at_full_rank(installed: object, net: tuple[Net, torch.Tensor]) -> None:
    model, x = net
    result = fxrewrite.rewrite(model, (x,), passes=f"{NAME}{{rank=exact}}")
    torch.testing.assert_close(result.module(x), model(x))
    assert result.verification is not None and result.verification.ok
    by_site = {r.site: r for r in result.report.records}
    assert {s: (r.status, r.code) for s, r in by_site.items()} == {
        "stem": ("rewritten", None), "wide": ("rewritten", None), "mirror": ("rewritten", None),
        "grouped": ("skipped", "grouped-conv"), "point": ("skipped", "already-separable")}
    assert {s: by_site[s].details["rank"] for s in SPLIT} == {"stem": 9, "wide": 24, "mirror": 24}
    assert all(by_site[s].exact and by_site[s].rel_error < 1e-12 for s in SPLIT)
    wide = result.module.get_submodule("wide")
    assert [(c.kernel_size, c.stride, c.padding, c.dilation) for c in wide] == [
        ((3, 1), (2, 1), (1, 0), (1, 1)), ((1, 5), (1, 1), (0, 2), (1, 2))]
    assert [c.padding_mode for c in result.module.get_submodule("mirror")] == ["reflect", "reflect"]


def test_low_rank_error_and_macs_are_what_was_built(installed: object, net: tuple[Net, torch.Tensor]) -> None:
    model, x = net
    rank = 3
    result = fxrewrite.rewrite(model, (x,), passes=f"{NAME}{{rank={rank}}}")
    counted = counted_macs(result.module, x)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = [getattr(model, s).register_forward_hook(
        lambda m, i, y, s=s: shapes.__setitem__(s, (tuple(i[0].shape), tuple(y.shape)))) for s in SPLIT]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    by_site = {r.site: r for r in result.report.records}
    for site in SPLIT:
        record, conv = by_site[site], getattr(model, site)
        vertical, horizontal = result.module.get_submodule(site)
        rebuilt = torch.einsum("jia,ojb->oiab", vertical.weight[..., 0], horizontal.weight[:, :, 0]).detach()
        weight = conv.weight.detach()
        assert record.rel_error == pytest.approx(float((weight - rebuilt).norm() / weight.norm()), rel=1e-5)
        assert not record.exact and record.rel_error > 0.01
        assert record.macs_after == counted[f"{site}.0"] + counted[f"{site}.1"]
        assert record.macs_after == formula_macs(conv, *shapes[site], rank)
        assert record.macs_before == counted_macs(model, x)[site]
        assert record.params_after == sum(p.numel() for p in result.module.get_submodule(site).parameters())
    assert result.report.records[0].macs_after < result.report.records[0].macs_before


def test_dry_run_table_and_plan(installed: object, net: tuple[Net, torch.Tensor]) -> None:
    model, x = net
    text = str(fxrewrite.plan(model, (x,))).splitlines()
    assert text[0].split() == ["site", "conv", "output", "MACs", "dw-sep", "grouped-sep", "grouped", "spatial-sep"]
    rows = {line.split()[0]: line.split()[-1] for line in text[2:7]}
    assert rows == {"stem": "yes", "wide": "yes", "grouped": "grouped-conv", "point": "already-separable",
                    "mirror": "yes"}
    planned = fxrewrite.plan(model, (x,), passes=f"{NAME}{{rank=2}}")
    assert [(r.site, r.status) for r in planned.records if r.status == "planned"] == [(s, "planned") for s in SPLIT]
    assert all(r.pass_name == NAME and r.options == {"rank": 2, "init": "svd"} for r in planned.records)


def test_cli_lists_it(installed: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert (f"{NAME}{{rank=1, init=svd}}\n    Conv2d kh x kw -> (kh x 1) conv then (1 x kw) conv, from a truncated "
            "SVD of the weight\n    options: rank: int | str; init: str") in out
    assert main(["passes", "--json"]) == 0
    entry = next(p for p in json.loads(capsys.readouterr().out)["passes"] if p["name"] == NAME)
    assert entry["options"] == {"rank": 1, "init": "svd"} and entry["required"] == []


def test_save_and_load_rewritten_replays_it(installed: object, net: tuple[Net, torch.Tensor], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = net
    result = fxrewrite.rewrite(model, (x,), passes=f"{NAME}{{rank=3}}")
    path = tmp_path / "net.safetensors"
    fxrewrite.save(result, path)

    def no_svd(*args: object) -> None:
        raise AssertionError("replay must rebuild the structure only (structure_options), not factorise")

    monkeypatch.setattr(installed, "svd_factors", no_svd)
    torch.manual_seed(1)
    fresh = Net().eval()  # other weights: the saved ones replace them
    loaded = fxrewrite.load_rewritten(fresh, path)
    assert loaded.state_dict().keys() == result.module.state_dict().keys()
    torch.testing.assert_close(loaded(x), result.module(x), rtol=0, atol=0)
    assert not torch.allclose(loaded(x), fresh(x))


def test_budget_chooses_among_its_candidates(installed: object, net: tuple[Net, torch.Tensor]) -> None:
    model, x = net
    form = installed.SpatialSeparable.budget_forms[NAME]()  # type: ignore[attr-defined]
    result = fxrewrite.rewrite(model, (x,), target=fxrewrite.Target(macs=0.6), forms=[NAME])
    records = [r for r in result.report.records if r.status == "rewritten"]
    assert records and {r.pass_name for r in records} == {NAME}
    before = counted_macs(model, x)
    after = counted_macs(result.module, x)
    assert sum(after.values()) <= 0.6 * sum(before.values())
    sites = {s.name: s for s in fxrewrite.plan(model, (x,)).sites}
    for r in records:
        conv = getattr(model, r.site)
        candidates = {c.options["rank"]: c for c in form.candidates(sites[r.site], conv.weight)}
        chosen = candidates[r.options["rank"]]
        assert chosen.macs == r.macs_after == after[f"{r.site}.0"] + after[f"{r.site}.1"]
        assert chosen.params == r.params_after
        assert chosen.rel_error == pytest.approx(r.rel_error, rel=1e-5, abs=1e-9)
    kept = sum(macs for site, macs in before.items() if site not in {r.site for r in records})
    assert sum(after.values()) == kept + sum(r.macs_after for r in records)
