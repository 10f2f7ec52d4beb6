"""The records of a verification: tensor metadata, error figures, cost totals, and the check of one rewritten site
or one model output (frozen dataclasses with ``to_dict``), and the default tolerance per dtype (``FLOAT_LEVEL``).

>>> import torch
>>> TensorMeta.of(torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last))
TensorMeta(shape=(2, 3, 4, 4), dtype='float32', device='cpu', memory_format='channels_last')
>>> TensorMeta((2, 3), "float32", "cpu", "contiguous").mismatch(TensorMeta((2, 4), "float16", "cpu", "contiguous"))
'shape (2, 4) -> (2, 3), dtype float16 -> float32'
>>> ErrorStats(rel_l2=1e-3, max_abs=1e-6, sqnr_db=60.0, cosine=1.0, numel=8).exceeds(1e-4, 1e-5)
False
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from fxrewrite.util.formatting import json_float

__all__ = ["FLOAT_LEVEL", "CostTotals", "ErrorStats", "OutputCheck", "SiteCheck", "TensorMeta"]

#: Default (rtol, atol) per dtype: what an exact rewrite meets (relative L2 / max abs error).
FLOAT_LEVEL: Mapping[torch.dtype, tuple[float, float]] = MappingProxyType({
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
})


@dataclass(frozen=True)
class TensorMeta:
    """Shape, dtype, device and memory format of one tensor (from FakeTensor propagation)."""

    shape: tuple[int, ...]
    dtype: str
    device: str
    memory_format: str

    @staticmethod
    def of(t: torch.Tensor) -> TensorMeta:
        return TensorMeta(tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."), str(t.device),
                          _memory_format(t))

    def mismatch(self, other: TensorMeta, *, memory_format: bool = True) -> str | None:
        """A sentence saying what differs from ``other`` (None when they agree)."""
        diffs = [f"{k} {getattr(other, k)} -> {getattr(self, k)}" for k in ("shape", "dtype", "device")
                 if getattr(self, k) != getattr(other, k)]
        if memory_format and self.memory_format != other.memory_format:
            diffs.append(f"memory format {other.memory_format} -> {self.memory_format}")
        return ", ".join(diffs) or None

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "device": self.device,
                "memory_format": self.memory_format}


@dataclass(frozen=True)
class ErrorStats:
    """Error of a candidate tensor (rewritten) against a reference (original), over all batches.

    Figures are over the elements where both are finite; ``nonfinite`` counts elements that are non-finite in the
    candidate but finite in the reference, ``reference_nonfinite`` those non-finite in the reference (nothing can be
    compared there, so either count fails every gate). ``sqnr_db`` is ``inf`` when the error is exactly zero.
    """

    rel_l2: float
    max_abs: float
    sqnr_db: float
    cosine: float
    numel: int
    nonfinite: int = 0
    reference_nonfinite: int = 0

    def exceeds(self, rtol: float, atol: float) -> bool:
        return self.nonfinite > 0 or self.reference_nonfinite > 0 or (self.rel_l2 > rtol and self.max_abs > atol)

    def to_dict(self) -> dict[str, Any]:
        return {"rel_l2": json_float(self.rel_l2), "max_abs": json_float(self.max_abs),
                "sqnr_db": json_float(self.sqnr_db), "cosine": json_float(self.cosine), "numel": self.numel,
                "nonfinite": self.nonfinite, "reference_nonfinite": self.reference_nonfinite}


@dataclass(frozen=True)
class CostTotals:
    """Analytic totals of one model (``fxrewrite.measure.cost``): parameter elements, MACs, activation bytes."""

    params: int
    macs: int
    activation_bytes: int

    def to_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs, "activation_bytes": self.activation_bytes}


@dataclass(frozen=True)
class SiteCheck:
    """Verification of one rewritten site: boundary shapes, local and accumulated error, analytic costs.

    ``status`` is ``ok``, ``failed`` (``reason`` says why) or ``unchecked`` (numerics skipped or the site has no
    counterpart in the original graph).
    """

    site: str
    passes: tuple[str, ...]
    nodes: tuple[str, ...]
    original_node: str | None
    input_before: TensorMeta | None
    input_after: TensorMeta | None
    output_before: TensorMeta | None
    output_after: TensorMeta | None
    shapes_ok: bool
    local: ErrorStats | None
    accumulated: ErrorStats | None
    cost_before: CostTotals | None
    cost_after: CostTotals | None
    status: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site, "passes": list(self.passes), "nodes": list(self.nodes),
            "original_node": self.original_node,
            **{k: (getattr(self, k).to_dict() if getattr(self, k) is not None else None)
               for k in ("input_before", "input_after", "output_before", "output_after", "local", "accumulated",
                         "cost_before", "cost_after")},
            "shapes_ok": self.shapes_ok, "status": self.status, "reason": self.reason,
        }


@dataclass(frozen=True)
class OutputCheck:
    """Verification of one model output (``output``, ``output[0]``, ``output['out']``...)."""

    name: str
    before: TensorMeta | None
    after: TensorMeta | None
    shapes_ok: bool
    error: ErrorStats | None
    status: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "before": self.before.to_dict() if self.before else None,
                "after": self.after.to_dict() if self.after else None, "shapes_ok": self.shapes_ok,
                "error": self.error.to_dict() if self.error else None, "status": self.status,
                "reason": self.reason}


def _memory_format(t: torch.Tensor) -> str:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return "channels_last_3d"
    return "contiguous" if t.is_contiguous() else "strided"
