"""Grouped linear least squares from running sums: the normal equations ``G = sum X X^T``, ``C = sum Y X^T`` of a
fit ``W_j X_j ~ Y_j`` per group j, accumulated batch by batch in float64, their residual without the data, and the
ridge solve towards a prior ``W0``::

    W_j = (C_j + lam W0_j) (G_j + lam I)^-1,   lam = ridge * trace(G_j) / dim(G_j)

The data side (which columns X, which targets Y) is the caller's: ``fxrewrite.tuning.repair`` feeds im2col columns
of a conv's input and the original model's output (``grouped_targets``).

>>> g = torch.Generator().manual_seed(0)
>>> w = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)  # 2 groups, 3 outputs, 4 inputs each
>>> eq = NormalEquations(groups=2, rows=3, dim=4)
>>> for _ in range(3):
...     x = torch.randn(2, 4, 10, generator=g, dtype=torch.float64)
...     eq.add(x, w @ x)
>>> int(eq.stats[1]), eq.residual(w) < 1e-12, eq.residual(torch.zeros_like(w))
(30, True, 1.0)
>>> torch.allclose(eq.solve(1e-12, torch.zeros_like(w)), w)
True
"""

from __future__ import annotations

import copy
import math

import torch

__all__ = ["NormalEquations", "grouped_targets"]


def grouped_targets(y: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, O, H, W) -> (groups, O/groups, N*H*W), matching ``im2col``'s column order.

    >>> grouped_targets(torch.arange(8.0).reshape(2, 2, 1, 2), groups=2).tolist()
    [[[0.0, 1.0, 4.0, 5.0]], [[2.0, 3.0, 6.0, 7.0]]]
    """
    n, o = y.shape[:2]
    return y.reshape(n, groups, o // groups, -1).permute(1, 2, 0, 3).reshape(groups, o // groups, -1)


class NormalEquations:
    """Sums over batches for a grouped least-squares fit: G = sum X X^T, C = sum Y X^T, sum ||Y||^2, count.

    ``gram`` is (groups, dim, dim), ``cross`` (groups, rows, dim), ``stats`` (sum ||Y||^2, number of columns); all
    float64 on ``device``. A weight ``w`` is (groups, rows, dim).
    """

    def __init__(self, groups: int, rows: int, dim: int, device: torch.device | None = None) -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.gram = torch.zeros(groups, dim, dim, **kw)
        self.cross = torch.zeros(groups, rows, dim, **kw)
        self.stats = torch.zeros(2, **kw)  # sum ||Y||^2, number of columns

    def add(self, cols: torch.Tensor, targets: torch.Tensor) -> None:
        """Add columns ``cols`` (groups, dim, n) and their targets (groups, rows, n), both float64."""
        self.gram += cols @ cols.transpose(1, 2)
        self.cross += targets @ cols.transpose(1, 2)
        self.stats[0] += targets.square().sum()
        self.stats[1] += targets.shape[-1]

    def merged(self, other: NormalEquations) -> NormalEquations:
        """The sums of both (the equations of the union of their columns)."""
        out = copy.copy(self)
        out.gram, out.cross, out.stats = self.gram + other.gram, self.cross + other.cross, self.stats + other.stats
        return out

    def residual(self, w: torch.Tensor) -> float:
        """Relative residual ||W X - Y|| / ||Y|| from the sums (no data needed)."""
        err2 = ((w @ self.gram) * w).sum() - 2 * (w * self.cross).sum() + self.stats[0]
        y2 = float(self.stats[0])
        return math.sqrt(max(float(err2), 0.0) / y2) if y2 > 0 else (0.0 if float(err2) <= 0 else math.inf)

    def solve(self, ridge: float, prior: torch.Tensor) -> torch.Tensor:
        """The least-squares weight with a ridge ``ridge`` x mean Gram diagonal (per group) pulling towards
        ``prior`` (groups, rows, dim); a group whose Gram is zero gets lam = 1, i.e. the prior."""
        d = self.gram.shape[-1]
        mean_diag = self.gram.diagonal(dim1=1, dim2=2).mean(dim=1)  # per group
        lam = torch.where(mean_diag > 0, ridge * mean_diag, torch.ones_like(mean_diag))[:, None, None]
        eye = torch.eye(d, dtype=self.gram.dtype, device=self.gram.device)
        rhs = (self.cross + lam * prior).transpose(1, 2)
        return torch.linalg.solve(self.gram + lam * eye, rhs).transpose(1, 2)
