"""fxrewrite.distill: the loss goes down, the loss is the relative squared output error (checked by hand on the
first step), site terms add to it, and the inputs are untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite.errors import ConfigError
from fxrewrite.tuning.distill import distill

pytestmark = pytest.mark.usefixtures("one_thread")



def _setup() -> tuple[nn.Module, torch.fx.GraphModule, list[tuple[torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    rewritten = fxrewrite.rewrite(model, (torch.randn(1, 3, 8, 8),), passes="grouped{groups=2}",
                                  verify=False).module
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 8, 8, generator=g),) for _ in range(4)]
    return model, rewritten, data


def test_loss_decreases_over_20_steps_and_inputs_are_untouched() -> None:
    model, rewritten, data = _setup()
    state = {k: v.clone() for k, v in rewritten.state_dict().items()}
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = distill(model, rewritten, data, steps=20, lr=1e-2, progress=False)
    assert len(result.losses) == 20 and result.steps == 20 and result.device == "cpu"
    # first step: the relative squared error of the untouched rewrite on the first batch, computed here
    (x,) = data[0]
    with torch.no_grad():
        s, t = rewritten(x), model(x)
    assert result.losses[0] == pytest.approx(float((s - t).square().sum() / t.square().sum()), rel=1e-5)
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5
    # the returned module matches the original better than the input rewrite did, on all the data
    with torch.no_grad():
        before = sum(float((rewritten(x) - model(x)).square().sum()) for (x,) in data)
        after = sum(float((result.module(x) - model(x)).square().sum()) for (x,) in data)
    assert after < 0.5 * before
    for k, v in rewritten.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original_state[k], rtol=0, atol=0)
    assert not model.training and result.module is not rewritten


def test_training_that_raises_the_probe_loss_is_reverted() -> None:
    model, rewritten, data = _setup()
    (x,) = data[0]
    with torch.no_grad():
        s, t = rewritten(x), model(x)
    start = float((s - t).square().sum() / t.square().sum())
    good = distill(model, rewritten, data, steps=20, lr=1e-2, progress=False)
    assert good.probe_before == pytest.approx(start, rel=1e-5)
    assert good.probe_after < good.probe_before and not good.reverted
    # an absurd learning rate: training diverges, the probe loss rises, the input weights come back bit for bit
    bad = distill(model, rewritten, data, steps=5, lr=10.0, progress=False)
    assert bad.probe_after > bad.probe_before == pytest.approx(start, rel=1e-5) and bad.reverted
    for k, v in rewritten.state_dict().items():
        torch.testing.assert_close(bad.module.state_dict()[k], v, rtol=0, atol=0)
    assert "input weights were kept" in str(bad)
    kept = distill(model, rewritten, data, steps=5, lr=10.0, progress=False, revert_if_worse=False)
    assert not kept.reverted and kept.probe_after == pytest.approx(bad.probe_after, rel=1e-4)
    with torch.no_grad():
        assert not torch.equal(kept.module(x), s)


def test_site_weight_adds_the_site_terms() -> None:
    model, rewritten, data = _setup()
    plain = distill(model, rewritten, data, steps=1, lr=1e-3, progress=False)
    with_sites = distill(model, rewritten, data, steps=1, lr=1e-3, site_weight=2.0, progress=False)
    assert with_sites.sites == ("3", "5")  # conv 0 has 3 input channels: not divisible by 2, not rewritten
    # site terms by hand on the first batch: the rewritten convs' outputs against the original's
    (x,) = data[0]
    outs: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    hooks = [rewritten.get_submodule(n).register_forward_hook(lambda mod, a, o: outs["a"].append(o))
             for n in ("3", "5")]
    hooks += [model[i].register_forward_hook(lambda mod, a, o: outs["b"].append(o)) for i in (3, 5)]
    with torch.no_grad():
        rewritten(x)
        model(x)
    for h in hooks:
        h.remove()
    terms = [float((a - b).square().sum() / b.square().sum()) for a, b in zip(outs["a"], outs["b"], strict=True)]
    expected = plain.losses[0] + 2.0 * sum(terms) / 2
    assert with_sites.losses[0] == pytest.approx(expected, rel=1e-5)


def test_bad_arguments() -> None:
    model, rewritten, data = _setup()
    with pytest.raises(ConfigError, match="one-shot"):
        distill(model, rewritten, iter(data), steps=2, progress=False)
    with pytest.raises(ConfigError, match="steps"):
        distill(model, rewritten, data, steps=0, progress=False)
    with pytest.raises(ConfigError, match="empty"):
        distill(model, rewritten, [], steps=2, progress=False)
