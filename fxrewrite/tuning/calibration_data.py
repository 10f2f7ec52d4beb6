"""How the tuning reads calibration batches: the held-out split of each batch (``halves``: the even samples fit,
the odd samples check) and the floating-point tensors of a model output that errors are measured on
(``output_leaves``).

>>> fit, check = halves(torch.arange(5))
>>> fit.tolist(), check.tolist()
([0, 2, 4], [1, 3])
>>> [t.shape for t in output_leaves({"logits": torch.zeros(2, 3), "index": torch.zeros(2, dtype=torch.long)})]
[torch.Size([2, 3])]
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["halves", "output_leaves"]


def halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch split into its fit half (even samples) and its check half (odd samples)."""
    return t[0::2], t[1::2]


def output_leaves(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a (nested) model output."""
    leaves = torch.utils._pytree.tree_leaves(value)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
