"""Block-term (ResNeXt-style, ``g`` blocks of ``r x r``) and CP (``r = 1``) fits of a conv weight by alternating
least squares with Bro's extrapolation (``als``, ``cp_als``), and the closed-form exact factors at or above the
exact rank (``exact_blocks``).

The factors only, in the layout of ``fxrewrite.maths.bottleneck_factors``; ``fxrewrite.maths.bottleneck_fit.
block_term`` chooses the start and the stages and turns the factors into conv weights.

>>> from fxrewrite.maths.bottleneck_factors import Unfolded, fit_error
>>> w3 = torch.randn(8, 6, 9, dtype=torch.float64)
>>> fit_error(Unfolded(w3), exact_blocks(w3, 4, 4)) < 1e-12  # 4 blocks of 4 x 4 are exact for this shape
True
>>> g = torch.Generator().manual_seed(0)
>>> start = (torch.randn(8, 2, 2, generator=g, dtype=torch.float64), torch.zeros(2, 2, 2, 9, dtype=torch.float64),
...          torch.randn(6, 2, 2, generator=g, dtype=torch.float64))
>>> first, best, err0, sweeps, converged = als(Unfolded(w3), start, 0.0, 5, fit_core=True)
>>> sweeps, fit_error(Unfolded(w3), best) <= err0 < 1
(5, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fxrewrite.maths.bottleneck_factors import Factors, Unfolded, relative_error, stalled
from fxrewrite.maths.tucker_hooi import hooi

__all__ = ["SINGLE_MIN_ERROR", "als", "cp_als", "exact_blocks"]

SINGLE_MIN_ERROR = 1e-2  # CP sweeps with float32 products switch to float64 below this relative error
_DIRECT_CORE_SOLVE = 512  # block-term core update: direct solve up to g*r*r unknowns per tap, else Gauss-Seidel


def _spd_cholesky(n: Tensor) -> Tensor | None:
    """Cholesky factor of a symmetric positive semi-definite ``n``, with a tiny ridge when it is singular; None when
    even that fails."""
    chol, info = torch.linalg.cholesky_ex(n)
    if int(info) == 0:
        return chol
    scale = float(n.diagonal().abs().mean()) if n.numel() else 0.0
    ridge = torch.eye(n.shape[-1], dtype=n.dtype, device=n.device) * (1e-13 * scale + 1e-300)
    chol, info = torch.linalg.cholesky_ex(n + ridge)
    return chol if int(info) == 0 else None


def _spd_solve(n: Tensor, b: Tensor) -> Tensor:
    """Solve ``n x = b`` for a symmetric positive semi-definite ``n`` (Cholesky; a tiny ridge, then the
    pseudo-inverse, when it is singular)."""
    chol = _spd_cholesky(n)
    return torch.linalg.pinv(n, hermitian=True) @ b if chol is None else torch.cholesky_solve(b, chol)


def _spd_inverse(n: Tensor) -> Tensor:
    """The inverse of a symmetric positive semi-definite ``n`` (Cholesky; a tiny ridge, then the pseudo-inverse,
    when it is singular). Cheaper than :func:`_spd_solve` for small ``n`` or many right-hand sides."""
    chol = _spd_cholesky(n)
    return torch.linalg.pinv(n, hermitian=True) if chol is None else torch.cholesky_inverse(chol)



class _Blocks:
    """Block-term algebra for ``g`` blocks of ``r x r``, with the core laid out as ``C[b, k, p, q]`` so that every
    contraction is a batched matrix product (O(K R^2 r) flops; ``R = g r``)."""

    def __init__(self, g: int, r: int, k: int) -> None:
        self.g, self.r, self.k = g, r, k

    def grams(self, f: Tensor) -> Tensor:
        """(n, g, r) -> the Gram matrix of all columns, (R, R)."""
        m = f.reshape(f.shape[0], -1)
        return m.mT @ m

    def lhs_u(self, c: Tensor, pv: Tensor) -> Tensor:
        """``Z Z^T`` of the U update: ``sum_k sum_{q,t} C[b,k,p,q] (V^T V)[(b,q),(c,t)] C[c,k,s,t]``, (R, R)."""
        g, r, k = self.g, self.r, self.k
        x = torch.matmul(c, pv.reshape(g, 1, r, g * r))  # [b, k, p, (c,t)]
        x = x.reshape(g, k, r, g, r).permute(3, 1, 0, 2, 4).reshape(g, k, g * r, r)  # [c, k, (b,p), t]
        z = torch.matmul(x, c.mT).sum(1)  # [c, (b,p), s]
        return z.permute(1, 0, 2).reshape(g * r, g * r)

    def rhs_u(self, y: Tensor, c: Tensor) -> Tensor:
        """``W_(O) Z^T`` from ``y = W x_I V`` (O, K, g, r): ``sum_{k,q} y[o,k,b,q] C[b,k,p,q]``, (O, R)."""
        g, r, k = self.g, self.r, self.k
        yb = y.permute(2, 0, 1, 3).reshape(g, -1, k * r)
        return torch.bmm(yb, c.permute(0, 1, 3, 2).reshape(g, k * r, r)).permute(1, 0, 2).reshape(-1, g * r)

    def core_rhs(self, u: Tensor, y: Tensor) -> Tensor:
        """``U_b^T W_k V_b`` for every block and tap, (g, K, r, r)."""
        g, r, k = self.g, self.r, self.k
        yb = y.permute(2, 0, 1, 3).reshape(g, -1, k * r)
        return torch.bmm(u.permute(1, 2, 0), yb).reshape(g, r, k, r).permute(0, 2, 1, 3)

    def apply_n(self, c: Tensor, pu: Tensor, pv: Tensor) -> Tensor:
        """The core's normal matrix applied to ``c``: ``sum_{c,s,t} PU[(b,p),(c,s)] C[c,k,s,t] PV[(b,q),(c,t)]``."""
        g, r, k = self.g, self.r, self.k
        x = torch.matmul(pu.reshape(g * r, g, r).permute(1, 0, 2).unsqueeze(1), c)  # [c, k, (b,p), t]
        x = x.reshape(g, k, g, r, r).permute(2, 1, 3, 0, 4).reshape(g, k, r, g * r)  # [b, k, p, (c,t)]
        return torch.matmul(x, pv.reshape(g, r, g * r).mT.unsqueeze(1))  # [b, k, p, q]

    def core_update(self, rhs: Tensor, pu: Tensor, pv: Tensor, c: Tensor) -> Tensor:
        """Least-squares block-diagonal core for fixed U, V: ``N vec(C) = vec(U_b^T W V_b)`` per tap. Solved directly
        up to ``_DIRECT_CORE_SOLVE`` unknowns per tap, else by one block Gauss-Seidel sweep (each block's update
        exact given the others, so the error never increases)."""
        g, r, k = self.g, self.r, self.k
        if g * r * r <= _DIRECT_CORE_SOLVE:
            n = torch.einsum("bpcs,bqct->bpqcst", pu.reshape(g, r, g, r), pv.reshape(g, r, g, r))
            sol = _spd_solve(n.reshape(g * r * r, g * r * r), rhs.permute(0, 2, 3, 1).reshape(g * r * r, k))
            return sol.reshape(g, r, r, k).permute(0, 3, 1, 2)
        c = c.clone()
        pu4, pv4 = pu.reshape(g, r, g, r), pv.reshape(g, r, g, r)
        for blk in range(g):
            left, right = pu4[blk].permute(1, 0, 2).unsqueeze(1), pv4[blk].permute(1, 2, 0).unsqueeze(1)
            coupled = torch.matmul(torch.matmul(left, c), right).sum(0)  # sum_c PU[b,:,c,:] C_c PV[b,:,c,:]^T
            own = pu4[blk, :, blk] @ c[blk] @ pv4[blk, :, blk].mT
            target = rhs[blk] - (coupled - own)  # (K, r, r)
            step = _spd_solve(pu4[blk, :, blk], target.permute(1, 0, 2).reshape(r, k * r)).reshape(r, k, r)
            step = _spd_solve(pv4[blk, :, blk], step.permute(2, 1, 0).reshape(r, k * r)).reshape(r, k, r)
            c[blk] = step.permute(1, 2, 0)
        return c

    def normalise(self, f: Tensor, c: Tensor, side: str) -> tuple[Tensor, Tensor]:
        """Re-orthonormalise each block of a factor (n, g, r) by QR (unit columns when r > n), folding the
        triangular factor (or the norms) into the core so that the fitted weight is unchanged."""
        n, r = f.shape[0], f.shape[2]
        if r > n:
            s = f.norm(dim=0).clamp_min(1e-300)  # (g, r)
            return f / s, c * (s[:, None, :, None] if side == "u" else s[:, None, None, :])
        q, t = torch.linalg.qr(f.permute(1, 0, 2))  # (g, n, r), (g, r, r)
        c = torch.matmul(t.unsqueeze(1), c) if side == "u" else torch.matmul(c, t.mT.unsqueeze(1))
        return q.permute(1, 0, 2), c


def als(w: Unfolded, f: Factors, tol: float, max_iter: int, *, fit_core: bool = False,
         offset2: float = 0.0, ref2: float | None = None, single: bool = False
         ) -> tuple[Factors, Factors, float, int, bool]:
    """Alternating least squares for the block-term model on ``w``, with extrapolation.

    One sweep updates U (least squares given C, V), V (given U, C) and the core C (given U, V); U and V blocks are
    re-orthonormalised after their update. From the third sweep on, the extrapolated point ``old + s (new - old)``
    with ``s = sweep^(1/p)`` (Bro's line search; p = 2 at first, + 1 after 4 rejections in a row) is taken when it
    has a lower error. Errors are ``sqrt((offset2 + ||w - w'||^2) / ref2)`` (``ref2`` defaults to ``||w||^2``); the
    loop stops by :func:`stalled` or after ``max_iter`` sweeps. ``fit_core`` first replaces C by its least-squares
    value for the given U, V; ``single`` (CP only) takes the products with ``w`` in float32 (:func:`cp_als`).
    Returns the start, the best iterate, the start's error, the sweeps run and whether ``tol`` was met.
    """
    ref2 = w.norm2 if ref2 is None else ref2
    o, g, r = f[0].shape
    if r == 1:
        return cp_als(w, f, tol, max_iter, fit_core=fit_core, offset2=offset2, ref2=ref2, single=single)
    alg = _Blocks(g, r, w.shape[2])

    class State:
        """Factors (core as C[b, k, p, q]) with what later steps reuse: Grams, ``W x_I V`` and the error."""

        def __init__(self, u: Tensor, c: Tensor, v: Tensor, *, fit: bool = False,
                     pu: Tensor | None = None, y: Tensor | None = None) -> None:
            self.pu = alg.grams(u) if pu is None else pu
            self.pv = alg.grams(v)
            self.y = w.times_v(v) if y is None else y  # (O, K, g, r)
            rhs = alg.core_rhs(u, self.y)
            if fit:
                c = alg.core_update(rhs, self.pu, self.pv, c)
            nc = alg.apply_n(c, self.pu, self.pv)
            self.u, self.c, self.v = u, c, v
            self.err = relative_error(offset2 + w.norm2 - 2 * float((rhs * c).sum()) + float((c * nc).sum()), ref2)

        def factors(self) -> Factors:
            return self.u, self.c.permute(0, 2, 3, 1), self.v

    st = State(f[0], f[1].permute(0, 3, 1, 2), f[2], fit=fit_core)
    err0 = best_err = st.err
    history = [st.err]
    start = best = st
    power, fails, converged, it = 2.0, 0, False, 0
    for it in range(1, max_iter + 1):
        # U: W_(O) ~ U Z, Z[(b,p), (i,k)] = sum_q C[b,k,p,q] V[i,b,q]; normal equations U (Z Z^T) = W_(O) Z^T
        u = _spd_solve(alg.lhs_u(st.c, st.pv), alg.rhs_u(st.y, st.c).mT).mT.reshape(o, g, r)
        u, c = alg.normalise(u, st.c, "u")
        pu = alg.grams(u)
        # V: the same with the roles of U and V (and of the core's two indices) swapped
        ct = c.mT
        v = _spd_solve(alg.lhs_u(ct, pu), alg.rhs_u(w.times_u(u), ct).mT).mT.reshape(-1, g, r)
        v, c = alg.normalise(v, c, "v")
        new = State(u, c, v, fit=True, pu=pu)  # the core update
        if it > 2:
            step = it ** (1.0 / power)
            u, c, v, y = (torch.lerp(a, b, step) for a, b in zip((st.u, st.c, st.v, st.y),
                                                                 (new.u, new.c, new.v, new.y), strict=True))
            ext = State(u, c, v, y=y)  # W x_I V is linear in V: no product with W
            if ext.err < new.err:
                new, fails = ext, 0
            else:
                fails += 1
                if fails == 4:
                    power, fails = power + 1.0, 0
        st = new
        history.append(st.err)
        if st.err < best_err:
            best, best_err = st, st.err
        if stalled(history, tol):
            converged = True
            break
    return start.factors(), best.factors(), err0, it, converged


def cp_als(w: Unfolded, f: Factors, tol: float, max_iter: int, *, fit_core: bool, offset2: float, ref2: float,
            single: bool = False) -> tuple[Factors, Factors, float, int, bool]:
    """:func:`als` for ``r = 1`` (CP: every block a rank-1 term). Factors are kept transposed, one row per term:
    U^T (R, O), V^T (R, I), C (R, K); the Grams are Hadamard products of R x R Grams and every solve is a Cholesky
    solve with them. Two products with the weight per sweep: ``U^T W`` (R, I, K) for the V update and ``V^T W``
    (R, O, K) for the core update, the error and the next sweep's U update; the right-hand sides are batched
    matrix-vector products over the R terms. ``V^T W`` is linear in V, so the extrapolated point's is a combination
    of two known ones and its error needs no product with the weight. ``single``: the products with the weight (and
    the batched products on them) in float32, Grams, solves and errors in float64, until the relative error falls
    below ``SINGLE_MIN_ERROR`` (float32 products resolve the squared error to ~1e-7 of ``||W||^2`` only); float64
    from then on."""
    o, i, k = w.shape
    ut, ct, vt = (t.contiguous() for t in (f[0].reshape(o, -1).mT, f[1].reshape(-1, k), f[2].reshape(i, -1).mT))
    rank = ut.shape[0]
    base2 = offset2 + w.norm2
    dtype = ut.dtype
    oki, iko = (w.oki.float(), w.iko.float()) if single else (w.oki, w.iko)

    def low(t: Tensor) -> Tensor:  # to the dtype of the products with the weight
        return t.float() if single else t

    def high(t: Tensor) -> Tensor:
        return t.to(dtype) if single else t

    def times(ft: Tensor, unfolded: Tensor) -> Tensor:  # F^T W: (R, n, K) with rows (n, k) in ``unfolded``
        return (low(ft) @ unfolded.mT).reshape(rank, -1, k)

    def core_rhs(ut: Tensor, yt: Tensor) -> Tensor:  # sum_o U[o, r] (V^T W)[r, o, k]: (R, K)
        return high(torch.bmm(low(ut).unsqueeze(1), yt).squeeze(1))

    def factor_rhs(yt: Tensor, ct: Tensor) -> Tensor:  # sum_k (V^T W)[r, o, k] C[r, k]: (R, O)
        return high(torch.bmm(yt, low(ct).unsqueeze(-1)).squeeze(-1))

    def error2(mc: Tensor, ct: Tensor, guv: Tensor | None) -> float:  # ||W - W'||^2 + offset2, mc = core_rhs
        if guv is None:  # C is the least-squares core for mc: the quadratic term equals <mc, C>
            return base2 - float((mc * ct).sum())
        return base2 - 2 * float((mc * ct).sum()) + float((guv * (ct @ ct.mT)).sum())

    def solve(gram: Tensor, rhs: Tensor) -> Tensor:  # gram^-1 rhs (row-major, for the batched products)
        return _spd_inverse(gram) @ rhs

    def unit(ft: Tensor, ct: Tensor) -> tuple[Tensor, Tensor]:  # unit rows, the norms folded into C
        n = ft.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return ft / n, ct * n

    yt = times(vt, oki)  # V^T W, valid for the current V
    gv = vt @ vt.mT  # likewise its Gram
    guv = (ut @ ut.mT) * gv
    mc = core_rhs(ut, yt)
    if fit_core:
        ct = solve(guv, mc)
    err0 = best_err = relative_error(error2(mc, ct, guv), ref2)
    history = [err0]
    start = best = (ut, ct, vt)
    power, fails, converged, it = 2.0, 0, False, 0
    for it in range(1, max_iter + 1):
        old = (ut, ct, vt, yt)
        ut, ct = unit(solve(gv * (ct @ ct.mT), factor_rhs(yt, ct)), ct)
        gu = ut @ ut.mT
        vt, ct = unit(solve(gu * (ct @ ct.mT), factor_rhs(times(ut, iko), ct)), ct)
        yt, gv = times(vt, oki), vt @ vt.mT
        guv = gu * gv
        mc = core_rhs(ut, yt)
        ct = solve(guv, mc)
        err2 = error2(mc, ct, None)
        if it > 2:  # extrapolation, kept only when it lowers the error
            step = it ** (1.0 / power)
            ext = tuple(torch.lerp(a, b, step) for a, b in zip(old, (ut, ct, vt, yt), strict=True))
            ext_gv = ext[2] @ ext[2].mT
            ext_err2 = error2(core_rhs(ext[0], ext[3]), ext[1], (ext[0] @ ext[0].mT) * ext_gv)
            if ext_err2 < err2:
                (ut, ct, vt, yt), gv, err2, fails = ext, ext_gv, ext_err2, 0
            else:
                fails += 1
                if fails == 4:
                    power, fails = power + 1.0, 0
        err = relative_error(err2, ref2)
        history.append(err)
        if err < best_err:
            best, best_err = (ut, ct, vt), err
        if stalled(history, tol):
            converged = True
            break
        if single and err2 < SINGLE_MIN_ERROR**2 * ref2:  # float32 products blur smaller errors: float64 on
            single, oki, iko = False, w.oki, w.iko
            yt = times(vt, oki)

    def blocks(f: tuple[Tensor, Tensor, Tensor]) -> Factors:
        ut, ct, vt = f
        return ut.mT.reshape(o, rank, 1), ct.reshape(rank, 1, 1, k), vt.mT.reshape(i, rank, 1)

    return blocks(start), blocks(best), err0, it, converged


def exact_blocks(w3: Tensor, g: int, r: int) -> Factors:
    """The closed-form exact block-term factors (see ``bottleneck_fit.exact_groups``), zero-padded to ``g`` groups."""
    o, i, k = w3.shape
    if r >= max(min(o, i * k), min(i, o * k)):
        ro, ri = min(r, o), min(r, i)
        _, (u0, v0, t), _, _, _ = hooi(Unfolded(w3), ro, ri, 0.0, 0)
        u, c, v = w3.new_zeros(o, g, r), w3.new_zeros(g, r, r, k), w3.new_zeros(i, g, r)
        u[:, 0, :ro], v[:, 0, :ri], c[0, :ro, :ri] = u0, v0, t
        return u, c, v
    by_in = min((math.ceil(i / cc) * math.ceil(min(o, cc * k) / r), cc) for cc in range(1, min(r, i) + 1))
    by_out = min((math.ceil(o / d) * math.ceil(min(i, d * k) / r), d) for d in range(1, min(r, o) + 1))
    if by_out < by_in:  # chunks of output channels: the same construction on W with O and I swapped
        u, c, v = _chunked(w3.permute(1, 0, 2), g, r, by_out[1])
        return v, c.transpose(1, 2).contiguous(), u
    return _chunked(w3, g, r, by_in[1])


def _chunked(w3: Tensor, g: int, r: int, chunk: int) -> Factors:
    """Input chunks of ``chunk <= r`` channels; each chunk's ``O x chunk*K`` SVD split into blocks of r triplets."""
    o, i, k = w3.shape
    u, c, v = w3.new_zeros(o, g, r), w3.new_zeros(g, r, r, k), w3.new_zeros(i, g, r)
    blk = 0
    eye = torch.eye(chunk, dtype=w3.dtype, device=w3.device)
    for lo in range(0, i, chunk):
        width = min(chunk, i - lo)
        uu, s, vh = torch.linalg.svd(w3[:, lo:lo + width].reshape(o, width * k), full_matrices=False)
        for first in range(0, s.shape[0], r):
            n = min(r, s.shape[0] - first)
            u[:, blk, :n] = uu[:, first:first + n]
            c[blk, :n, :width] = (s[first:first + n, None] * vh[first:first + n]).reshape(n, width, k)
            v[lo:lo + width, blk, :width] = eye[:width, :width]
            blk += 1
    return u, c, v
