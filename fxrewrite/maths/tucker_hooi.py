"""Tucker-2 of a conv weight by HOOI: the sequentially truncated HOSVD start, then half-sweeps that set each factor
to the top singular subspace given the other (the error never increases and comes free from the eigenvalues).

The factors only; ``fxrewrite.maths.bottleneck_fit.tucker2`` turns them into conv weights.

>>> from fxrewrite.maths.bottleneck_factors import Unfolded
>>> w3 = torch.randn(6, 4, 9, dtype=torch.float64)
>>> start, (u, v, core), err0, sweeps, converged = hooi(Unfolded(w3), 6, 4, 1e-6, 10)  # full ranks: exact
>>> u.shape, v.shape, core.shape, err0 < 1e-6, torch.allclose(torch.einsum("op,pqk,iq->oik", u, core, v), w3)
(torch.Size([6, 6]), torch.Size([4, 4]), torch.Size([6, 4, 9]), True, True)
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxrewrite.maths.bottleneck_factors import Unfolded, relative_error, stalled, top_eig

__all__ = ["hooi"]


def hooi(w: Unfolded, ro: int, ri: int, tol: float, max_iter: int
        ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor], float, int, bool]:
    """Tucker-2 of ``w``: sequentially truncated HOSVD start (U from the mode-O unfolding, then V from ``U^T W``),
    then HOOI half-sweeps (each updates one factor to the top singular subspace given the other; the error after
    each comes free from the eigenvalues). Stops by :func:`stalled` (per half-sweep) or after ``max_iter`` full
    sweeps. Returns the start (U, V), the best (U, V, core (ro, ri, K)), the start's
    error, the sweeps run and whether ``tol`` was met."""
    o, i, k = w.shape
    u, _ = top_eig(w.oki.reshape(o, k * i), ro)
    x = w.times_u(u)  # (I, K, ro)
    v, kept = top_eig(x, ri)
    err = err0 = relative_error(w.norm2 - kept, w.norm2)
    history = [err]
    start, best, best_err = (u, v), (u, v, x, "x"), err
    converged, half = False, 0
    while half < 2 * max_iter:
        half += 1
        if half % 2:  # update U given V
            y = w.times_v(v)  # (O, K, ri)
            u, kept = top_eig(y, ro)
            state = (u, v, y, "y")
        else:
            x = w.times_u(u)
            v, kept = top_eig(x, ri)
            state = (u, v, x, "x")
        err = relative_error(w.norm2 - kept, w.norm2)
        history.append(err)
        if err < best_err:
            best, best_err = state, err
        if stalled(history, tol):
            converged = True
            break
    u, v, t, kind = best
    core = torch.einsum("okq,op->pqk", t, u) if kind == "y" else torch.einsum("ikp,iq->pqk", t, v)
    return start, (u, v, core), err0, (half + 1) // 2, converged
