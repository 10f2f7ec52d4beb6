"""What the bottleneck fits share: the conv weight as a 3-way tensor ``(O, I, K)`` in the two unfoldings their
contractions need (``Unfolded``), the internal factor layout (``Factors``: U ``(O, g, r_out)``, C
``(g, r_out, r_in, K)``, V ``(I, g, r_in)``, with ``W'[o, i, k] = sum U C V``), the dense error of a set of factors,
the top eigenvectors the HOSVD takes, and the stopping rule of every alternating fit.

Pure tensor maths; used by ``fxrewrite.maths.tucker_hooi``, ``fxrewrite.maths.block_term_als`` and
``fxrewrite.maths.bottleneck_fit``.

>>> w3 = torch.randn(4, 3, 9, dtype=torch.float64)
>>> unf = Unfolded(w3)
>>> f = (torch.eye(4, dtype=torch.float64).reshape(4, 1, 4), w3.reshape(1, 4, 3, 9),
...      torch.eye(3, dtype=torch.float64).reshape(3, 1, 3))
>>> fit_error(unf, f) < 1e-15, relative_error(1.0, 4.0), stalled([1.0, 0.5, 0.5], tol=1e-3)
(True, 0.5, False)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Factors", "Unfolded", "dense_oki", "fit_error", "relative_error", "stalled", "top_eig"]

# Factors, internally: U (O, g, r_out), C (g, r_out, r_in, K), V (I, g, r_in); W'[o,i,k] = sum U C V.
Factors = tuple[Tensor, Tensor, Tensor]

STALL_WINDOW = 5  # the stopping rule averages the error's fall over this many steps


class Unfolded:
    """``w`` (O, I, K) in the two layouts the contractions need, and its squared norm."""

    def __init__(self, w3: Tensor) -> None:
        self.shape = tuple(w3.shape)
        o, i, k = self.shape
        self.oki = w3.permute(0, 2, 1).reshape(o * k, i)  # rows (o, k)
        self.iko = w3.permute(1, 2, 0).reshape(i * k, o)  # rows (i, k)
        self.norm2 = float(w3.square().sum())

    def times_v(self, v: Tensor) -> Tensor:
        """``W x_I V``: (O, K, *V.shape[1:])."""
        o, _, k = self.shape
        return (self.oki @ v.reshape(v.shape[0], -1)).reshape(o, k, *v.shape[1:])

    def times_u(self, u: Tensor) -> Tensor:
        """``W x_O U``: (I, K, *U.shape[1:])."""
        _, i, k = self.shape
        return (self.iko @ u.reshape(u.shape[0], -1)).reshape(i, k, *u.shape[1:])


def top_eig(m: Tensor, r: int) -> tuple[Tensor, float]:
    """Top-``r`` left singular vectors of ``m`` (n x *) and the sum of the top ``r`` squared singular values."""
    m = m.reshape(m.shape[0], -1)
    vals, vecs = torch.linalg.eigh(m @ m.mT)
    return vecs[:, -r:].flip(-1), float(vals[-r:].sum())


def relative_error(err2: float, norm2: float) -> float:
    """``sqrt(err2 / norm2)`` from squared norms (a negative rounding residue counts as 0; 0 when ``norm2`` is 0)."""
    return math.sqrt(max(err2, 0.0) / norm2) if norm2 > 0 else 0.0


def dense_oki(f: Factors) -> Tensor:
    """The fitted weight in the (O*K, I) layout (rows (o, k)), by two matrix products."""
    u, c, v = f
    o, g, ro = u.shape
    i, _, ri = v.shape
    k = c.shape[-1]
    t = torch.einsum("obp,bpqk->okbq", u, c) if g > 1 else (u.reshape(o, ro) @ c.reshape(ro, ri * k)).reshape(
        o, ri, k).mT
    return t.reshape(o * k, g * ri) @ v.reshape(i, g * ri).mT


def fit_error(unf: Unfolded, f: Factors) -> float:
    """``||W - W'||_F / ||W||_F`` from the dense reconstruction of the factors."""
    return float((unf.oki - dense_oki(f)).norm()) / math.sqrt(unf.norm2) if unf.norm2 else 0.0


def stalled(history: list[float], tol: float) -> bool:
    """ALS stopping rule: the relative error fell by less than ``tol`` per sweep on average over the last
    ``STALL_WINDOW`` sweeps (fewer at the start). Averaging keeps one unlucky sweep from stopping the fit early."""
    n = min(STALL_WINDOW, len(history) - 1)
    return n > 0 and history[-1 - n] - history[-1] < n * tol
