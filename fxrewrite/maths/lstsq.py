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

from fxrewrite.maths.column_sketch import ColumnSketch

__all__ = ["NormalEquations", "SketchedEquations", "grouped_targets", "relative_residual", "solve_each"]


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

    def residual_sums(self, w: torch.Tensor) -> tuple[float, float]:
        """``(||W X - Y||^2, ||Y||^2)`` from the sums."""
        err2 = ((w @ self.gram) * w).sum() - 2 * (w * self.cross).sum() + self.stats[0]
        return float(err2), float(self.stats[0])

    def residual(self, w: torch.Tensor) -> float:
        """Relative residual ||W X - Y|| / ||Y|| from the sums (no data needed)."""
        return relative_residual(*self.residual_sums(w))

    def solve(self, ridge: float, prior: torch.Tensor) -> torch.Tensor:
        """The least-squares weight with a ridge ``ridge`` x mean Gram diagonal (per group) pulling towards
        ``prior`` (groups, rows, dim); a group whose Gram is zero gets lam = 1, i.e. the prior. Memory: one copy
        of the Gram (plus the solver's factorisation)."""
        mean_diag = self.gram.diagonal(dim1=1, dim2=2).mean(dim=1)  # per group
        lam = torch.where(mean_diag > 0, ridge * mean_diag, torch.ones_like(mean_diag))[:, None, None]
        rhs = (self.cross + lam * prior).transpose(1, 2)
        lhs = self.gram.clone()
        lhs.diagonal(dim1=1, dim2=2).add_(lam[:, :, 0])  # G + lam I without an identity matrix
        return solve_each(lhs, rhs).transpose(1, 2)


def solve_each(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve`` matrix by matrix over the leading dimension. Batched CPU LU solves in torch 2.14 with
    MKL fail ("Pivots given to lu_solve must all be greater or equal to 1", MKL DLASWP errors) once the intra-op
    thread count has been changed in the process (``factorize.one_thread``, which the budget uses), at sizes from
    about 200; one matrix at a time they do not, and the arithmetic per matrix is the same."""
    return torch.stack([torch.linalg.solve(a[j], b[j]) for j in range(a.shape[0])])


def relative_residual(err2: float, y2: float) -> float:
    """``sqrt(err2 / y2)`` (0 for no error, inf for an error on zero targets)."""
    return math.sqrt(max(err2, 0.0) / y2) if y2 > 0 else (0.0 if err2 <= 0 else math.inf)


class SketchedEquations:
    """Bounded-memory counterpart of ``NormalEquations`` for a ``dim`` whose ``dim x dim`` Gram does not fit: the
    columns and targets are kept as a ``ColumnSketch`` of ``width`` columns (``F = X S``, ``T = Y S``; exact, the
    columns themselves, while at most ``width`` were added), with the exact ``sum ||x||^2`` per group (for the
    ridge), ``sum ||Y||^2`` and the count. ``solve`` is the same ridge solve on the sketched columns, by the
    push-through identity ``(C + lam W0)(G + lam I)^-1 = W0 + (T - W0 F)(F^T F + lam I)^-1 F^T``
    (``width x width`` systems): equal to ``NormalEquations.solve`` when exact. ``residual`` is exact when
    ``exact``; a sketch's residual must be measured on the data.

    >>> g = torch.Generator().manual_seed(0)
    >>> w = torch.randn(2, 3, 40, generator=g, dtype=torch.float64)
    >>> x = torch.randn(2, 40, 25, generator=g, dtype=torch.float64)
    >>> dense, sk = NormalEquations(2, 3, 40), SketchedEquations(2, 3, 40, width=32)
    >>> dense.add(x, w @ x); sk.add(x, w @ x)
    >>> prior = torch.zeros_like(w)
    >>> sk.exact, torch.allclose(sk.solve(1e-3, prior), dense.solve(1e-3, prior))
    (True, True)
    """

    def __init__(self, groups: int, rows: int, dim: int, width: int, device: torch.device | None = None,
                 seed: int = 0) -> None:
        self.sketch = ColumnSketch(groups, dim, width, rows=rows, device=device, seed=seed)
        self.diag = torch.zeros(groups, dtype=torch.float64, device=device)  # sum ||x||^2 per group
        self.stats = torch.zeros(2, dtype=torch.float64, device=device)  # sum ||Y||^2, number of columns
        self.dim = dim

    def add(self, cols: torch.Tensor, targets: torch.Tensor) -> None:
        """Add columns ``cols`` (groups, dim, n) and their targets (groups, rows, n), both float64."""
        self.sketch.add(cols, targets)
        self.diag += cols.square().sum(dim=(1, 2))
        self.stats[0] += targets.square().sum()
        self.stats[1] += targets.shape[-1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The sums to all-reduce under torch.distributed."""
        assert self.sketch.targets is not None
        return self.sketch.factor, self.sketch.targets, self.diag, self.stats

    @property
    def exact(self) -> bool:
        return self.sketch.exact

    def residual_sums(self, w: torch.Tensor) -> tuple[float, float]:
        """``(||W X - Y||^2, ||Y||^2)``, exact only when ``exact``."""
        f, t = self.sketch.columns(), self.sketch.sketched_targets()
        return float((w @ f - t).square().sum()), float(self.stats[0])

    def residual(self, w: torch.Tensor) -> float:
        return relative_residual(*self.residual_sums(w))

    def solve(self, ridge: float, prior: torch.Tensor) -> torch.Tensor:
        """As ``NormalEquations.solve`` (lam from the exact mean Gram diagonal), on the sketched columns."""
        f, t = self.sketch.columns(), self.sketch.sketched_targets()
        mean_diag = self.diag / self.dim
        lam = torch.where(mean_diag > 0, ridge * mean_diag, torch.ones_like(mean_diag))
        a = f.mT @ f
        a.diagonal(dim1=1, dim2=2).add_(lam[:, None])
        r = t - prior @ f  # (groups, rows, width)
        return prior + solve_each(a, r.mT).mT @ f.mT
