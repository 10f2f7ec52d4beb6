"""Top eigenpair of a batch of small symmetric positive semi-definite matrices, without ``eigh`` for most of them.

Pure array maths. ``torch.linalg.eigh`` on thousands of 9x9 Gram matrices costs ~6 us a matrix in LAPACK's
per-call overhead, while a batched 9x9 product costs ~0.1 us (numpy's OpenBLAS; ~0.25 us in torch's MKL on this
AMD machine, and numpy's small elementwise ops cost ~1 us to torch's ~3 us, hence numpy on CPU).
:func:`top_eigenpairs` filters each matrix with a Chebyshev polynomial evaluated by doubling (``T_2m = 2 T_m^2 - 1``,
one batched product a step) and squaring, reads the top eigenvector off a column, and certifies every result. The
matrices it cannot certify (clustered top eigenvalues, zero or non-finite matrices) go to ``eigh``, as does every
batch off the CPU.

What a certified result guarantees (``G`` one matrix, ``T = trace(G)``, ``rho = v^T G v`` with ``||v|| = 1``):

* backward error: ``||G v - rho v|| <= TOL * T``, so ``(rho, v)`` is an exact eigenpair of a matrix within
  ``TOL * T`` of ``G`` (eigh's own is a few ``eps * ||G||``);
* it is the *top* one: an upper bound ``alpha`` on the second eigenvalue, read off the filtered matrix's Frobenius
  norm, is below ``rho``; then ``lambda_1 - rho <= ||G v - rho v||^2 / (rho - alpha) <= TOL * T`` (Kato-Temple),
  so the rank-1 energy ``rho`` is the optimum to ``TOL`` relative to the total, and the angle to the top eigenvector
  is at most ``||G v - rho v|| / (rho - alpha)``. Where the top eigenvalue is (near-)degenerate the vector is some
  vector of the top eigenspace, equally optimal to that accuracy (eigh's choice there is arbitrary too).

All of it up to rounding: the bound on the filtered matrix allows a relative ``1e-12`` for it.

>>> g = torch.tensor([[[2.0, 1.0], [1.0, 2.0]]], dtype=torch.float64)
>>> lam, v = top_eigenpairs(g)
>>> round(float(lam[0]), 12), [round(abs(x), 12) for x in v[0].tolist()]
(3.0, [0.707106781187, 0.707106781187])
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["TOL", "top_eigenpairs", "top_eigenpairs_filtered"]

TOL = 1e-13
"""Certified backward error and energy loss of a filtered result, relative to the trace."""

_DOUBLINGS = 4  # Chebyshev doublings: T_16
_SQUARINGS = 5  # then squarings: T_16^32, a polynomial of degree 512 in G
_POWER_STEPS = 6  # power steps on one vector for the lower bound on lambda_1 that places the filter
_SHRINK = 0.985  # the filter's interval ends at _SHRINK * (that lower bound)
_MARGIN = 1e-12  # relative rounding allowance on the filtered matrix's squared norm
_MIN_WIDTH = 0.05  # the filter's interval is at least this fraction of its upper end


def top_eigenpairs(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Top eigenvalue ``(...,)`` and unit eigenvector ``(..., n)`` of a batch of symmetric PSD ``(..., n, n)``.

    float64 in, float64 out, on ``gram``'s device. On the CPU certified results come from
    :func:`top_eigenpairs_filtered`, the rest from ``torch.linalg.eigh`` (its last eigenpair); elsewhere all from
    eigh. Signs are whatever the method gave: callers fix their own.

    >>> lam, v = top_eigenpairs(torch.diag(torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64))[None])
    >>> float(lam[0]), v[0].abs().tolist()
    (5.0, [0.0, 1.0, 0.0])
    """
    if gram.dtype != torch.float64:
        raise TypeError(f"maths.top_eigen: expected a float64 batch of Gram matrices, got {gram.dtype}")
    n = gram.shape[-1]
    batch = gram.shape[:-2]
    g = gram.detach().reshape(-1, n, n)
    if g.device.type != "cpu" or g.shape[0] == 0:
        lam, vec = torch.linalg.eigh(g)
        return lam[:, -1].reshape(batch), vec[:, :, -1].reshape(*batch, n)
    lam_np, vec_np, ok = top_eigenpairs_filtered(g.numpy())
    lam, vec = torch.from_numpy(lam_np), torch.from_numpy(vec_np)
    bad = np.flatnonzero(~ok)
    if bad.size:
        idx = torch.from_numpy(bad)
        lam_b, vec_b = torch.linalg.eigh(g.index_select(0, idx))
        lam.index_copy_(0, idx, lam_b[:, -1])
        vec.index_copy_(0, idx, vec_b[:, :, -1])
    return lam.reshape(batch), vec.reshape(*batch, n)


def top_eigenpairs_filtered(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate top eigenpairs ``(B,)``, ``(B, n)`` of ``g`` ``(B, n, n)`` float64 and the mask ``(B,)`` of those
    certified (see the module). Uncertified rows hold unspecified (possibly non-finite) values.

    >>> lam, v, ok = top_eigenpairs_filtered(np.zeros((1, 3, 3)))
    >>> ok.tolist()
    [False]
    """
    with np.errstate(all="ignore"):  # zero, clustered or non-finite matrices: NaN / inf, left uncertified
        return _filtered(np.ascontiguousarray(g, dtype=np.float64))


def _filtered(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # numpy's reductions over a short last axis are slow (~40 us for a (227, 9, 9) sum); products with a ones
    # vector, einsum dots and strided diagonals are not
    b, n = g.shape[0], g.shape[-1]
    ones = np.ones((n, 1))
    flat = g.reshape(b, n * n)
    diag = flat[:, :: n + 1]
    trace = diag.sum(-1)  # (B,)
    # Gershgorin: every eigenvalue >= lo (the filter's lower end; any lower bound of lambda_n keeps lambda_1 on top)
    lo = (2 * diag - (np.abs(g) @ ones)[:, :, 0]).min(-1)
    # a lower bound of lambda_1: the Rayleigh quotient of a few power steps from G 1
    x = g @ ones
    for _ in range(_POWER_STEPS):
        x = g @ x
    hi = _SHRINK * np.einsum("bij,bij->b", x, g @ x) / np.einsum("bij,bij->b", x, x)
    lo = np.minimum(np.maximum(lo, 0.0), hi * (1 - _MIN_WIDTH))  # a near-scalar G: widen (the certificate decides)
    width = hi - lo
    # M maps [lo, hi] onto [-1, 1] and lambda_1 >= hi above 1; C = T_m(M)^(2^k) grows there and is <= 1 below.
    # Held as D = 2 T_m(M) (so T_2m = 2 T_m^2 - 1 is D <- D^2 - 2)
    d = g * (4 / width)[:, None, None]
    d.reshape(b, n * n)[:, :: n + 1] -= (2 * (lo + hi) / width)[:, None]
    for _ in range(_DOUBLINGS):
        d = d @ d
        d.reshape(b, n * n)[:, :: n + 1] -= 2.0
    # D^(2^k) overflows beyond degree ~256: square D / ||D||_F instead, C = d * (||D||_F / 2)^(2^k)
    norm = np.sqrt(np.einsum("bij,bij->b", d, d))
    d *= (1 / norm)[:, None, None]
    for _ in range(_SQUARINGS):
        d = d @ d
    # v: the column of the largest diagonal entry of C ~ c_1 v_1 v_1^T
    v = d[np.arange(b), :, d.reshape(b, n * n)[:, :: n + 1].argmax(-1)][:, :, None]
    v /= np.sqrt(np.einsum("bij,bij->b", v, v))[:, None, None]
    gv = g @ v
    rho = np.einsum("bij,bij->b", v, gv)
    r = gv - rho[:, None, None] * v
    res2 = np.einsum("bij,bij->b", r, r)
    # certificate: every eigenvalue of C but its largest (c_1 >= v^T C v = q > 0) has c^2 <= ||C||_F^2 - q^2;
    # c_1 belongs to lambda_1 (C's polynomial is increasing above 1); inverting it bounds lambda_2 by alpha
    q = np.einsum("bij,bij->b", v, d @ v)
    f2 = np.einsum("bij,bij->b", d, d)
    log_c2 = 0.5 * np.log(np.maximum(f2 - q * q, 0.0) + _MARGIN * f2) + 2**_SQUARINGS * np.log(norm / 2)
    u = np.maximum(log_c2, 0.0) / 2**_SQUARINGS  # acosh(exp(u)) = u + log(1 + sqrt(1 - exp(-2u))), no overflow
    x2 = np.cosh((u + np.log1p(np.sqrt(-np.expm1(-2 * u)))) / 2**_DOUBLINGS)
    gap = rho - (lo + (x2 + 1) * 0.5 * width)
    tol = TOL * trace
    ok = (gap > 0) & (res2 <= tol * tol) & (res2 <= tol * gap) & (q > 0) & (trace > 0)
    return rho, v[:, :, 0], ok
