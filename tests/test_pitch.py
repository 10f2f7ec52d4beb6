"""The trained 1-D model (``fxrewrite.demos.pitch``) in a smaller configuration: it learns, its single-channel stem
holds at least 40% of the conv MACs, and a budgeted rewrite meets its MAC target by an independent (hook) count."""

from __future__ import annotations

import math

import torch

from fxrewrite.demos.pitch import PitchCNN, conv_macs, make_tones, run_demo


def test_tones_are_seeded_and_labelled() -> None:
    x1, y1 = make_tones(64, classes=12, seed=3)
    x2, y2 = make_tones(64, classes=12, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (64, 1, 1024, 1) and torch.isfinite(x1).all()
    torch.testing.assert_close(x1.square().mean(dim=(1, 2, 3)), torch.ones(64), rtol=1e-4, atol=1e-4)
    assert set(y1.tolist()) <= set(range(12))


def test_the_stem_holds_at_least_40_percent_of_the_conv_macs() -> None:
    macs = conv_macs(PitchCNN(), torch.zeros(1, 1, 1024, 1))
    stem = PitchCNN().stem
    assert stem.in_channels == 1 and stem.kernel_size == (256, 1) and stem.stride == (4, 1)
    assert macs["stem"] == 257 * 32 * 256  # (1024 + 2 * 128 - 256) / 4 + 1 output positions, 32 filters, 256 taps
    assert macs["stem"] / sum(macs.values()) >= 0.40


def test_a_small_pitch_model_trains_and_a_budget_meets_its_target() -> None:
    result = run_demo(classes=12, train=600, test=300, epochs=3, calib_batches=4, targets=(0.5,), seed=0)
    chance = 100.0 / 12
    print(f"\n{result}")
    assert result.acc_train >= 4 * chance and result.acc_original >= 4 * chance  # well above chance (8.3%)
    assert result.stem_share >= 0.40
    (row,) = result.rows
    # conv MACs counted with forward hooks on the returned modules, not by fxrewrite's cost model
    assert row.conv_macs_free <= 0.5 * row.conv_macs_before
    assert row.conv_macs_repaired <= 0.5 * row.conv_macs_before
    assert "stem" in row.changed_repaired  # the most expensive layer is a candidate and the budget cuts it
    assert math.isfinite(row.acc_repaired) and math.isfinite(row.acc_free)
    assert row.acc_repaired > 2 * chance
