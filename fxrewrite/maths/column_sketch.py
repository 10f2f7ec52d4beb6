"""Bounded-memory second moments: a signed count sketch of the columns of ``X`` (``groups x dim x n``, n growing
batch by batch) into ``width`` buckets, ``F = X S`` with ``S`` an ``n x width`` matrix holding one +-1 per row.

``F F^T`` stands in for the Gram ``X X^T`` (and ``T F^T``, with ``T = Y S`` the targets sketched alike, for
``Y X^T``) when the ``dim x dim`` Gram does not fit a memory cap: the sketch takes ``dim x width`` numbers.

- **Exact while the columns fit** (``exact``): column ``j`` goes to bucket ``j mod width`` with sign +1 while
  ``j < width``, so up to ``width`` columns ``F`` *is* ``X`` and every formula built on it is exact.
- **Unbiased beyond** (``sketch``): later columns share buckets with independent random signs, so
  ``E[F F^T] = X X^T`` and ``E[T F^T] = Y X^T`` (the cross terms of a shared bucket have mean zero). A quadratic
  form ``v^T X X^T v`` is then estimated with a relative standard deviation of about ``sqrt(2 / width)`` (at most
  ``sqrt(2)`` times that when one bucket dominates), e.g. 6% at 512 buckets.

Signs come from a seeded generator (per process under torch.distributed, where the per-process sketches are summed
and are then never called exact), so a run is reproducible.

>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(1, 5, 3, generator=g, dtype=torch.float64)
>>> s = ColumnSketch(groups=1, dim=5, width=4); s.add(x)
>>> s.exact, torch.allclose(s.columns() @ s.columns().mT, x @ x.mT)
(True, True)
>>> s.add(x); s.exact  # 6 columns in 4 buckets: an unbiased sketch now
False
"""

from __future__ import annotations

import torch

from fxrewrite.util.distributed import is_distributed

__all__ = ["DEFAULT_MEMORY_CAP", "ColumnSketch", "sketch_width"]

DEFAULT_MEMORY_CAP = 1 << 30  # bytes: the default cap of calibration statistics and repair (1 GiB)


def sketch_width(cap_bytes: int, groups: int, dim: int, rows: int = 0, copies: int = 1) -> int:
    """Buckets such that ``copies`` sketches of ``groups x (dim + rows)`` float64 numbers per bucket take at most a
    quarter of ``cap_bytes`` (the rest is left to the formulas that read them and to the batch in flight); >= 1."""
    return max(1, cap_bytes // 4 // (8 * copies * groups * (dim + rows)))


class ColumnSketch:
    """Running ``F = X S`` (``groups x dim x width``) and, with ``rows``, ``T = Y S`` (``groups x rows x width``),
    float64 on ``device``; ``count`` columns seen so far."""

    def __init__(self, groups: int, dim: int, width: int, rows: int = 0, device: torch.device | None = None,
                 seed: int = 0) -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.width = width
        self.factor = torch.zeros(groups, dim, width, **kw)
        self.targets = torch.zeros(groups, rows, width, **kw) if rows else None
        self.count = 0
        self.distributed = is_distributed()
        rank = torch.distributed.get_rank() if self.distributed else 0
        self._gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)

    def add(self, cols: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Add columns ``cols`` (groups, dim, n) and, if the sketch keeps targets, their targets (groups, rows, n)."""
        n = cols.shape[-1]
        pos = torch.arange(self.count, self.count + n)
        signs = torch.randint(0, 2, (n,), generator=self._gen, dtype=torch.float64) * 2 - 1
        if not self.distributed:
            signs = torch.where(pos < self.width, torch.ones_like(signs), signs)  # the first width columns: exact
        idx = (pos % self.width).to(self.factor.device)
        signs = signs.to(self.factor.device)
        self.factor.index_add_(2, idx, cols.to(torch.float64) * signs)
        if self.targets is not None:
            if targets is None:
                raise ValueError("ColumnSketch.add: this sketch keeps targets; pass them")
            self.targets.index_add_(2, idx, targets.to(torch.float64) * signs)
        self.count += n

    @property
    def exact(self) -> bool:
        """True while ``F`` holds the columns themselves (at most ``width`` columns, one process)."""
        return self.count <= self.width and not self.distributed

    @property
    def method(self) -> str:
        """``"columns"`` (exact) or ``"sketch"``."""
        return "columns" if self.exact else "sketch"

    def columns(self) -> torch.Tensor:
        """``F``, trimmed to the columns seen when exact."""
        return self.factor[..., :self.count] if self.exact else self.factor

    def sketched_targets(self) -> torch.Tensor:
        """``T``, trimmed like ``columns()``."""
        assert self.targets is not None
        return self.targets[..., :self.count] if self.exact else self.targets
