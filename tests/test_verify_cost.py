"""What the verifier costs: shapes re-propagated only where the rewrite changed something (the whole models only
when the recorded metadata cannot stand for them, or with ``shapes="full"``). The benchmark (bench_pass_speed) times the
whole path and its growth with the graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite.errors import ConfigError
from fxrewrite.verification import shape_check, verify


class Chain(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x


def _count_changed(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    used: list[bool] = []
    real = shape_check.propagate_changed

    def spy(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        used.append(out is not None)
        return out

    monkeypatch.setattr(verify, "propagate_changed", spy)
    return used


def test_rewrite_checks_shapes_at_the_rewritten_sites_only(seeded: None, monkeypatch: pytest.MonkeyPatch) -> None:
    used = _count_changed(monkeypatch)
    model = Chain(3).eval()
    x = torch.randn(1, 4, 8, 8)
    result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact}")
    assert result.verification.ok and used == [True]
    v = fxrewrite.verify(model, result.module, (x,))
    full = fxrewrite.verify(model, result.module, (x,), shapes="full")
    assert used == [True, True] and v.ok and full.ok
    assert [(s.output_before, s.output_after, s.cost_before, s.cost_after) for s in v.sites] == \
        [(s.output_before, s.output_after, s.cost_before, s.cost_after) for s in full.sites]
    assert v.outputs == full.outputs and (v.cost_before, v.cost_after) == (full.cost_before, full.cost_after)
    # other inputs than the rewrite's: the recorded metadata does not describe them, both models are propagated
    other = fxrewrite.verify(model, result.module, (torch.randn(2, 4, 8, 8),))
    assert used[-1] is False and other.ok and other.outputs[0].after.shape == (2, 4, 8, 8)


def test_a_site_whose_shape_changed_falls_back_to_the_whole_propagation(seeded: None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    used = _count_changed(monkeypatch)
    model = Chain(2).eval()
    x = torch.randn(1, 4, 8, 8)
    new = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact}", verify=False).module
    new.get_submodule("convs.0.0").stride = (2, 2)
    v = fxrewrite.verify(model, new, (x,))
    assert used == [False] and not v.ok
    assert v.failures[0].startswith("site convs.0: output shape (1, 4, 8, 8) -> (1, 4, 4, 4)")


def test_shapes_full_sees_an_edit_outside_the_rewritten_sites(seeded: None) -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(1), nn.Conv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(1, 4, 8, 8)
    new = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact}", select="0", verify=False).module
    new.get_submodule("1").stride = 2  # no pass touched it: only the whole propagation sees it
    full = fxrewrite.verify(model, new, (x,), shapes="full")
    assert not full.ok and any("(1, 4, 8, 8) -> (1, 4, 4, 4)" in f for f in full.failures)
    with pytest.raises(ConfigError, match="shapes must be"):
        fxrewrite.verify(model, new, (x,), shapes="some")


def test_real_and_fake_site_propagation_give_the_same_metadata(seeded: None) -> None:
    from fxrewrite.graph.shapes import propagate_nodes
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, groups=2)).eval()
    x = torch.randn(2, 4, 9, 9).to(memory_format=torch.channels_last)
    gm = fxrewrite.rewrite(model, (x,), passes="grouped-separable{groups=2, rank=1}", verify=False).module
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target != "1"]

    def metadata() -> list[tuple[object, ...]]:
        return [(tuple(v.shape), v.stride(), v.dtype, v.device, type(v).__name__)
                for v in (n.meta["val"] for n in nodes)]

    propagate_nodes(gm, nodes)
    fake = metadata()
    for n in nodes:
        n.meta.pop("val")
    propagate_nodes(gm, nodes, real=True)
    assert metadata() == fake and fake[-1][0] == (2, 6, 3, 3)


class WithConstant(nn.Module):
    """A tensor made in forward becomes a tracer-made constant attribute of the traced copy only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.tensor([2.0])


@pytest.mark.parametrize("model", [Chain(3), WithConstant()], ids=["chain", "constant"])
def test_rewrite_hands_verify_its_graph_and_costs(model: nn.Module, seeded: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from fxrewrite.measure import cost
    model = model.eval()
    x = torch.randn(1, 4, 8, 8)
    traced: list[str] = []
    counted: list[int] = []
    real_as_gm, real_cost = verify.as_graph_module, cost.model_cost
    monkeypatch.setattr(verify, "as_graph_module", lambda m, **kw: traced.append(
        "rewritten" if isinstance(m, torch.fx.GraphModule) else "original") or real_as_gm(m, **kw))
    monkeypatch.setattr(cost, "model_cost", lambda gm: counted.append(1) or real_cost(gm))
    result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact}")
    # the rewritten module is copied; the original is traced again only where the captured graph names a constant
    # the original lacks; the costs are the pipeline's (verify counts none)
    assert traced == (["rewritten"] if isinstance(model, Chain) else ["original", "rewritten"])
    assert counted == [] and result.verification.ok
    alone = fxrewrite.verify(model, result.module, (x,))
    assert counted == [1, 1] and alone.ok
    mine = result.verification
    assert [(s.site, s.output_before, s.output_after, s.cost_before, s.cost_after, s.local, s.accumulated)
            for s in mine.sites] == [(s.site, s.output_before, s.output_after, s.cost_before, s.cost_after, s.local,
                                      s.accumulated) for s in alone.sites]
    assert (mine.outputs, mine.cost_before, mine.cost_after) == (alone.outputs, alone.cost_before, alone.cost_after)
