"""The numeric side of a verification: error figures accumulated over batches in float64 (``ErrorAccumulator``,
``error_stats``), TF32 turned off while comparing (``full_precision``), and when numerics cannot run at all
(``numerics_blocker``: meta or fake tensors).

>>> import torch
>>> acc = ErrorAccumulator()
>>> acc.add(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
>>> acc.add(torch.tensor([3.0, float("inf")]), torch.tensor([4.0, 0.0]))
>>> s = acc.stats()
>>> s.max_abs, s.numel, s.nonfinite
(1.0, 4, 1)
>>> numerics_blocker(torch.nn.Linear(2, 2, device="meta"), torch.nn.Linear(2, 2), [torch.zeros(1, 2)])
'the original model is on the meta device (no data): shapes and costs only'
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from fxrewrite.util.runtime import tensors_of
from fxrewrite.verification.records import ErrorStats

__all__ = ["ErrorAccumulator", "error_stats", "full_precision", "numerics_blocker"]


class ErrorAccumulator:
    """Sums over batches (float64) from which ErrorStats are computed."""

    def __init__(self) -> None:
        self.err2 = self.ref2 = self.cand2 = self.dot = self.max_abs = 0.0
        self.numel = self.nonfinite = self.reference_nonfinite = 0

    def add(self, candidate: torch.Tensor, reference: torch.Tensor) -> None:
        a = candidate.detach().to(torch.float64)
        b = reference.detach().to(torch.float64)
        if a.is_complex() or b.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        if a.numel() and a.shape == b.shape:
            # the fast path: a NaN or inf anywhere makes a sum of squares non-finite, so the masks below are built
            # only then (or when float64 overflows)
            sums = _sums(a, b)
            if all(math.isfinite(v) for v in sums[:3]):
                self._accumulate(sums, candidate.numel())
                return
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        self.nonfinite += int((~fa & fb).sum())
        self.reference_nonfinite += int((~fb).sum())
        both = fa & fb
        if not bool(both.all()):
            a, b = a[both], b[both]
        self._accumulate(_sums(a, b), candidate.numel())

    def _accumulate(self, sums: tuple[float, float, float, float, float], numel: int) -> None:
        err2, ref2, cand2, dot, max_abs = sums
        self.err2 += err2
        self.ref2 += ref2
        self.cand2 += cand2
        self.dot += dot
        self.max_abs = max(self.max_abs, max_abs)
        self.numel += int(numel)

    def stats(self) -> ErrorStats:
        if self.err2 == 0.0:
            rel, sqnr = 0.0, math.inf
        else:
            rel = math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else math.inf
            sqnr = 10 * math.log10(self.ref2 / self.err2) if self.ref2 > 0 else -math.inf
        if self.cand2 > 0 and self.ref2 > 0:
            cosine = self.dot / math.sqrt(self.cand2 * self.ref2)
        else:
            cosine = 1.0 if self.cand2 == self.ref2 else 0.0
        return ErrorStats(rel, self.max_abs, sqnr, cosine, self.numel, self.nonfinite, self.reference_nonfinite)


def _sums(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, float, float]:
    """``(||a - b||^2, ||b||^2, ||a||^2, <a, b>, max |a - b|)`` in one tensor and one read-back (0 for empty)."""
    d = a - b
    if not d.numel():
        return 0.0, 0.0, 0.0, 0.0, 0.0
    err2, ref2, cand2, dot, max_abs = torch.stack(
        [(d * d).sum(), (b * b).sum(), (a * a).sum(), (a * b).sum(), d.abs().max()]).tolist()
    return err2, ref2, cand2, dot, max_abs


def error_stats(candidate: torch.Tensor, reference: torch.Tensor) -> ErrorStats:
    """Error figures of ``candidate`` against ``reference`` (one pair of tensors).

    >>> e = error_stats(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    >>> round(e.rel_l2, 6), e.max_abs, round(e.sqnr_db, 3)
    (0.267261, 1.0, 11.461)
    """
    acc = ErrorAccumulator()
    acc.add(candidate, reference)
    return acc.stats()


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Turn TF32 off for convolutions and matmuls (CUDA would otherwise round float32 to 10-bit mantissas, and an
    exact rewrite would not meet float level); restore the user's settings afterwards."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul


def numerics_blocker(original: nn.Module, rewritten: nn.Module, inputs: Sequence[Any]) -> str | None:
    """Why the numeric comparison cannot run (a model or an input without data), or None when it can."""
    for label, module in (("original", original), ("rewritten", rewritten)):
        if any(t.is_meta for t in tensors_of(module)):
            return f"the {label} model is on the meta device (no data): shapes and costs only"
    if any(isinstance(x, FakeTensor) for x in inputs if isinstance(x, torch.Tensor)):
        return "the example inputs are FakeTensors (no data): shapes and costs only"
    if any(x.device.type == "meta" for x in inputs if isinstance(x, torch.Tensor)):
        return "the example inputs are on the meta device (no data): shapes and costs only"
    return None
