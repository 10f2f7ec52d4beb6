"""Bottleneck factorisations of a conv weight: 1x1 -> (grouped) kxk -> 1x1, fitted in torch.

Pure tensor maths (no ``nn.Module``, no ``torch.fx``). ``W`` has shape ``(O, I, kh, kw)`` (a grouped source conv is
densified first), ``K = kh * kw``. With ``g`` groups and ``R = g * r`` middle channels the fitted weight is

    W'[o, i, k] = sum_b sum_{p, q < r} U_b[o, p] C_b[p, q, k] V_b[i, q]

i.e. ``conv1x1(V^T: I -> R)`` then a grouped kxk conv (``C``: R -> R, g groups) then ``conv1x1(U: R -> O)``.
``g = 1`` is Tucker-2 (:func:`tucker2`, which also allows different input / output ranks); ``g = R`` (``r = 1``) is
the CP / MobileNetV2-style depthwise linear bottleneck; in between it is a block-term decomposition (ResNeXt block),
:func:`block_term`.

Fitting, in float64 on the weight's device (results come back in the weight's dtype; the one float32 part is
named below):

- Tucker-2: sequentially truncated HOSVD start (U: top singular vectors of the mode-O unfolding; V: those of the
  mode-I unfolding of ``U^T W``; core = projection), then HOOI half-sweeps (each factor in turn set to the top
  singular subspace given the other; the error never increases and comes free from the eigenvalues).
- Block term (``g >= 2``, CP included): the start is the block diagonal of the core of a truncated HOSVD of rank
  ``min(R, O) x min(R, I)``, in its bases (closed form). Alternating least squares follows: U, V and the core, each a
  closed-form least-squares update (U / V blocks re-orthonormalised by QR; the core's normal equations solved
  directly, or by block Gauss-Seidel when large), with Bro's extrapolation kept only when it lowers the error (its
  error costs no product with the weight: ``W x_I V`` is linear in V). When the HOSVD compresses (``2 R^2 <= O I``),
  ALS runs first on its small core, then on the weight; not for CP fits with ``O I K R < SMALL_FIT_MACS``, whose
  sweeps cost mostly per-call overhead, so that the compression saves no time: they run on the weight from the
  start. CP sweeps on an ``r_o x r_i x K`` core with ``r_o r_i K R >= SMALL_FIT_MACS`` take their products with it
  in float32 while the relative error is above 1e-2 (Grams, solves and errors stay float64; the stage on the weight
  that follows is float64 throughout).
  ``init="random"`` starts from seeded random factors instead.
- A stage stops when the relative error fell by less than ``tol`` per step on average over the last 5 steps
  (absolute, in relative-error units; defaults ``TUCKER_TOL`` per HOOI half-sweep, ``ALS_TOL`` per ALS sweep) or after
  ``max_iter`` sweeps. The best iterate is kept, so a fit is never worse than its start.
- At or above the exact rank (:func:`exact_rank`) the factors are built in closed form and reproduce ``W`` exactly.

``rel_error`` is ``||W - W'||_F / ||W||_F`` computed from the dense reconstruction of the returned float64 factors.

>>> w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
>>> t = tucker2(w, rank_in=8, rank_out=16)
>>> t.first.shape, t.core.shape, t.last.shape, t.exact, t.rel_error < 1e-12
(torch.Size([8, 8, 1, 1]), torch.Size([16, 8, 3, 3]), torch.Size([16, 16, 1, 1]), True, True)
>>> b = block_term(w, groups=4, rank=8, max_iter=10)
>>> b.core.shape, b.rel_error <= b.init_rel_error
(torch.Size([8, 2, 3, 3]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fxrewrite.maths.factorize import dense_weight, one_thread

__all__ = [
    "BottleneckFit",
    "block_term",
    "bottleneck_macs",
    "compose",
    "exact_groups",
    "exact_rank",
    "rank_for_macs",
    "tucker2",
]

INITS = ("svd", "random")
TUCKER_TOL = 1e-6  # default tol of HOOI (Tucker-2): its steps are cheap and improve slowly but steadily
ALS_TOL = 5e-5  # default tol of block-term / CP ALS
DEFAULT_MAX_ITER = 100
SMALL_FIT_MACS = 1 << 20  # CP: below this many MACs per product with the weight (O*I*K*R), overhead dominates
SINGLE_MIN_ERROR = 1e-2  # CP sweeps with float32 products switch to float64 below this relative error
_DIRECT_CORE_SOLVE = 512  # block-term core update: direct solve up to g*r*r unknowns per tap, else Gauss-Seidel


@dataclass(frozen=True)
class BottleneckFit:
    """A fitted ``conv1x1 -> conv kxk (groups) -> conv1x1`` factorisation of a conv weight.

    ``first``: ``(R_in, I, 1, 1)``; ``core``: ``(R_out, R_in / groups, kh, kw)`` used with ``groups``; ``last``:
    ``(O, R_out, 1, 1)``. ``init_rel_error`` is the error of the closed-form (or random) start, ``rel_error`` the
    final one (never larger); ``iterations`` counts the alternating sweeps over all stages and ``converged`` says
    whether the last stage met ``tol`` (True for a closed-form exact fit). ``exact`` is True when the rank is at
    least the exact rank, where the fit reproduces the weight up to rounding.
    """

    first: Tensor
    core: Tensor
    last: Tensor
    groups: int
    rank_in: int
    rank_out: int
    rel_error: float
    init_rel_error: float
    iterations: int
    converged: bool
    exact: bool

    def dense(self) -> Tensor:
        """The effective ``(O, I, kh, kw)`` weight of the three convolutions (float64)."""
        return compose(self.first, self.core, self.last, self.groups)


# ----------------------------------------------------------------------------------------------------- helpers


def compose(first: Tensor, core: Tensor, last: Tensor, groups: int) -> Tensor:
    """Dense float64 weight of ``conv1x1(first) -> conv(core, groups) -> conv1x1(last)``.

    >>> compose(torch.ones(2, 3, 1, 1), torch.ones(2, 1, 1, 1), torch.ones(4, 2, 1, 1), 2)[:, :, 0, 0]
    tensor([[2., 2., 2.],
            [2., 2., 2.],
            [2., 2., 2.],
            [2., 2., 2.]], dtype=torch.float64)
    """
    r_in, i = first.shape[0], first.shape[1]
    r_out, ri, kh, kw = core.shape
    o = last.shape[0]
    g = groups
    if r_in != g * ri:
        raise ValueError(f"first has {r_in} output channels but the core expects {g} x {ri}")
    v = first.to(torch.float64).reshape(g, ri, i)
    c = core.to(torch.float64).reshape(g, r_out // g, ri, kh * kw)
    u = last.to(torch.float64).reshape(o, g, r_out // g)
    return torch.einsum("obp,bpqk,bqi->oik", u, c, v).reshape(o, i, kh, kw)


def bottleneck_macs(in_channels: int, out_channels: int, kernel_size: tuple[int, int] | int, rank: int, *,
                    groups: int = 1, rank_out: int | None = None) -> int:
    """MACs per output pixel of ``1x1 (I -> R) -> kxk (R -> R_out, groups) -> 1x1 (R_out -> O)``.

    All three convs are counted at the output resolution (exact for stride 1 with size-preserving padding; with
    stride s the first 1x1 runs on the input grid, s^2 times as many pixels). Compare with ``O * I * K``.

    >>> bottleneck_macs(64, 64, 3, 34, groups=34)  # CP rank 34: 34 * (64 + 9 + 64)
    4658
    >>> bottleneck_macs(64, 64, (3, 3), 38)  # Tucker-2 rank 38: 64*38 + 38*38*9 + 38*64
    17860
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    r_out = rank if rank_out is None else rank_out
    if rank % groups or r_out % groups:
        raise ValueError(f"groups={groups} must divide rank={rank} and rank_out={r_out}")
    return in_channels * rank + r_out * (rank // groups) * kh * kw + r_out * out_channels


def rank_for_macs(in_channels: int, out_channels: int, kernel_size: tuple[int, int] | int, macs: float, *,
                  groups: int = 1, depthwise: bool = False) -> int:
    """Largest rank ``R`` (a multiple of ``groups``; any R with ``depthwise``, where groups = R) whose
    :func:`bottleneck_macs` is at most ``macs``; 0 when even the smallest does not fit.

    >>> rank_for_macs(64, 64, 3, 64 * 9 + 64 * 64, depthwise=True)  # the MACs of depthwise-separable multiplier 1
    34
    >>> rank_for_macs(64, 64, 3, 64 * 64 * 9 / 2)
    38
    """
    best, r = 0, groups if not depthwise else 1
    while True:
        cost = bottleneck_macs(in_channels, out_channels, kernel_size, r, groups=r if depthwise else groups)
        if cost > macs:
            return best
        best, r = r, r + (1 if depthwise else groups)


def exact_groups(out_channels: int, in_channels: int, k: int, r: int) -> int:
    """Smallest number of groups of ``r x r`` blocks for which :func:`block_term` has an exact closed form.

    The constructions: one Tucker-2 block when ``r >= max(min(O, I*K), min(I, O*K))``; or input chunks of ``c <= r``
    channels, each an ``O x c*K`` SVD split into blocks of ``r`` singular triplets (``ceil(I/c) * ceil(min(O, cK)/r)``
    groups); or the same over output chunks. For ``r = 1`` that is ``min(I*min(O, K), O*min(I, K))``, the CP rank
    bound of one SVD per input (or output) channel.

    >>> exact_groups(16, 8, 9, 1), exact_groups(16, 8, 9, 16), exact_groups(16, 8, 9, 4)
    (72, 1, 8)
    """
    o, i = out_channels, in_channels
    if r >= max(min(o, i * k), min(i, o * k)):
        return 1
    best = min(math.ceil(i / c) * math.ceil(min(o, c * k) / r) for c in range(1, min(r, i) + 1))
    return min(best, *(math.ceil(o / d) * math.ceil(min(i, d * k) / r) for d in range(1, min(r, o) + 1)))


def exact_rank(weight_shape: tuple[int, ...], groups: int | None = 1, *, source_groups: int = 1) -> int:
    """Smallest rank ``R`` at which the bottleneck with ``groups`` groups (``None``: depthwise, groups = R) is exact
    by construction (a sufficient condition: a smaller rank may happen to fit some weights exactly too).

    Tucker-2 (groups=1): ``max(min(O, I*K), min(I, O*K))``. Otherwise ``groups * r`` for the smallest ``r`` with
    :func:`exact_groups` ``<= groups``; depthwise: :func:`exact_groups` with ``r = 1``.

    >>> exact_rank((16, 8, 3, 3)), exact_rank((16, 8, 3, 3), None), exact_rank((16, 8, 3, 3), 4)  # 4 groups: r = 8
    (16, 72, 32)
    """
    o, i, k = int(weight_shape[0]), int(weight_shape[1]) * source_groups, int(weight_shape[2]) * int(weight_shape[3])
    if groups is None:
        return exact_groups(o, i, k, 1)
    r = 1
    while exact_groups(o, i, k, r) > groups:
        r += 1
    return groups * r


def _check(weight: Tensor, source_groups: int, tol: float, max_iter: int, init: str) -> Tensor:
    if weight.dim() != 4:
        raise ValueError(f"expected a 4-D conv weight (O, I/G, kh, kw), got shape {tuple(weight.shape)}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    w = dense_weight(weight.detach().to(torch.float64), source_groups)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight has non-finite entries (inf or nan); fix the model's weights first")
    return w


def _rel(err2: float, norm2: float) -> float:
    return math.sqrt(max(err2, 0.0) / norm2) if norm2 > 0 else 0.0


# Factors, internally: U (O, g, r_out), C (g, r_out, r_in, K), V (I, g, r_in); W'[o,i,k] = sum U C V.
Factors = tuple[Tensor, Tensor, Tensor]


def _dense_oki(f: Factors) -> Tensor:
    """The fitted weight in the (O*K, I) layout (rows (o, k)), by two matrix products."""
    u, c, v = f
    o, g, ro = u.shape
    i, _, ri = v.shape
    k = c.shape[-1]
    t = torch.einsum("obp,bpqk->okbq", u, c) if g > 1 else (u.reshape(o, ro) @ c.reshape(ro, ri * k)).reshape(
        o, ri, k).mT
    return t.reshape(o * k, g * ri) @ v.reshape(i, g * ri).mT


def _fit_error(unf: _Unfolded, f: Factors) -> float:
    """``||W - W'||_F / ||W||_F`` from the dense reconstruction of the factors."""
    return float((unf.oki - _dense_oki(f)).norm()) / math.sqrt(unf.norm2) if unf.norm2 else 0.0


def _result(w: Tensor, unf: _Unfolded, weight: Tensor, start: Factors | float, best: Factors, iterations: int,
            converged: bool, exact: bool) -> BottleneckFit:
    """The fit as conv weights, with its exact dense error. ``start`` is the start's factors (the result is the
    better of start and best) or, for a monotone method, just the start's error."""
    o, i, kh, kw = w.shape
    err = _fit_error(unf, best)
    if isinstance(start, float):
        init_err = max(start, err)
    else:
        init_err = _fit_error(unf, start) if start is not best else err
        if err > init_err:
            best, err = start, init_err
    u, c, v = best
    g, ro, ri = c.shape[0], c.shape[1], c.shape[2]
    first = v.reshape(i, g * ri).mT.reshape(g * ri, i, 1, 1)
    core = c.reshape(g * ro, ri, kh, kw)
    last = u.reshape(o, g * ro, 1, 1)
    first, core, last = (t.to(dtype=weight.dtype, device=weight.device).contiguous() for t in (first, core, last))
    return BottleneckFit(first, core, last, g, g * ri, g * ro, err, init_err, iterations, converged, exact)


class _Unfolded:
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


def _top_eig(m: Tensor, r: int) -> tuple[Tensor, float]:
    """Top-``r`` left singular vectors of ``m`` (n x *) and the sum of the top ``r`` squared singular values."""
    m = m.reshape(m.shape[0], -1)
    vals, vecs = torch.linalg.eigh(m @ m.mT)
    return vecs[:, -r:].flip(-1), float(vals[-r:].sum())


# ------------------------------------------------------------------------------------------------- Tucker-2


def _tucker(w: _Unfolded, ro: int, ri: int, tol: float, max_iter: int
            ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor], float, int, bool]:
    """Tucker-2 of ``w``: sequentially truncated HOSVD start (U from the mode-O unfolding, then V from ``U^T W``),
    then HOOI half-sweeps (each updates one factor to the top singular subspace given the other; the error after
    each comes free from the eigenvalues). Stops by :func:`_stalled` (per half-sweep) or after ``max_iter`` full
    sweeps. Returns the start (U, V), the best (U, V, core (ro, ri, K)), the start's
    error, the sweeps run and whether ``tol`` was met."""
    o, i, k = w.shape
    u, _ = _top_eig(w.oki.reshape(o, k * i), ro)
    x = w.times_u(u)  # (I, K, ro)
    v, kept = _top_eig(x, ri)
    err = err0 = _rel(w.norm2 - kept, w.norm2)
    history = [err]
    start, best, best_err = (u, v), (u, v, x, "x"), err
    converged, half = False, 0
    while half < 2 * max_iter:
        half += 1
        if half % 2:  # update U given V
            y = w.times_v(v)  # (O, K, ri)
            u, kept = _top_eig(y, ro)
            state = (u, v, y, "y")
        else:
            x = w.times_u(u)
            v, kept = _top_eig(x, ri)
            state = (u, v, x, "x")
        err = _rel(w.norm2 - kept, w.norm2)
        history.append(err)
        if err < best_err:
            best, best_err = state, err
        if _stalled(history, tol):
            converged = True
            break
    u, v, t, kind = best
    core = torch.einsum("okq,op->pqk", t, u) if kind == "y" else torch.einsum("ikp,iq->pqk", t, v)
    return start, (u, v, core), err0, (half + 1) // 2, converged


@one_thread()
def tucker2(weight: Tensor, rank_in: int, rank_out: int, *, source_groups: int = 1, tol: float | None = None,
            max_iter: int = DEFAULT_MAX_ITER) -> BottleneckFit:
    """Tucker-2 fit ``1x1 (I -> rank_in) -> kxk (rank_in -> rank_out) -> 1x1 (rank_out -> O)``: ST-HOSVD, then HOOI.

    Exact when ``rank_out >= min(O, I*K)`` and ``rank_in >= min(I, O*K)``. Ranks above ``O`` / ``I`` are padded
    with zero channels. ``tol=None`` is ``TUCKER_TOL``.

    >>> w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    >>> errors = [tucker2(w, r, r).rel_error for r in (1, 2, 4, 6)]  # exact from rank_in 4, rank_out 6
    >>> errors == sorted(errors, reverse=True), errors[-1] < 1e-12
    (True, True)
    """
    tol = TUCKER_TOL if tol is None else tol
    w = _check(weight, source_groups, tol, max_iter, "svd")
    if rank_in < 1 or rank_out < 1:
        raise ValueError(f"ranks must be >= 1, got rank_in={rank_in}, rank_out={rank_out}")
    o, i, kh, kw = w.shape
    k = kh * kw
    exact = rank_out >= min(o, i * k) and rank_in >= min(i, o * k)
    ro, ri = min(rank_out, o), min(rank_in, i)
    unf = _Unfolded(w.reshape(o, i, k))

    def padded(u: Tensor, v: Tensor, core: Tensor) -> Factors:
        c = w.new_zeros(1, rank_out, rank_in, k)
        c[0, :ro, :ri] = core
        return (torch.cat([u, u.new_zeros(o, rank_out - ro)], 1).reshape(o, 1, rank_out), c,
                torch.cat([v, v.new_zeros(i, rank_in - ri)], 1).reshape(i, 1, rank_in))

    if unf.norm2 == 0.0:
        zero = padded(w.new_zeros(o, ro), w.new_zeros(i, ri), w.new_zeros(ro, ri, k))
        return _result(w, unf, weight, zero, zero, 0, True, exact)
    _, best, err0, sweeps, converged = _tucker(unf, ro, ri, tol, max_iter)
    # HOOI never increases the error: the start's error (from the eigenvalues) is enough
    return _result(w, unf, weight, err0, padded(*best), sweeps, converged, exact)


# ----------------------------------------------------------------------------------------------- block term


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


_WINDOW = 5


def _stalled(history: list[float], tol: float) -> bool:
    """ALS stopping rule: the relative error fell by less than ``tol`` per sweep on average over the last
    ``_WINDOW`` sweeps (fewer at the start). Averaging keeps one unlucky sweep from stopping the fit early."""
    n = min(_WINDOW, len(history) - 1)
    return n > 0 and history[-1 - n] - history[-1] < n * tol


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


def _als(w: _Unfolded, f: Factors, tol: float, max_iter: int, *, fit_core: bool = False,
         offset2: float = 0.0, ref2: float | None = None, single: bool = False
         ) -> tuple[Factors, Factors, float, int, bool]:
    """Alternating least squares for the block-term model on ``w``, with extrapolation.

    One sweep updates U (least squares given C, V), V (given U, C) and the core C (given U, V); U and V blocks are
    re-orthonormalised after their update. From the third sweep on, the extrapolated point ``old + s (new - old)``
    with ``s = sweep^(1/p)`` (Bro's line search; p = 2 at first, + 1 after 4 rejections in a row) is taken when it
    has a lower error. Errors are ``sqrt((offset2 + ||w - w'||^2) / ref2)`` (``ref2`` defaults to ``||w||^2``); the
    loop stops by :func:`_stalled` or after ``max_iter`` sweeps. ``fit_core`` first replaces C by its least-squares
    value for the given U, V; ``single`` (CP only) takes the products with ``w`` in float32 (:func:`_cp_als`).
    Returns the start, the best iterate, the start's error, the sweeps run and whether ``tol`` was met.
    """
    ref2 = w.norm2 if ref2 is None else ref2
    o, g, r = f[0].shape
    if r == 1:
        return _cp_als(w, f, tol, max_iter, fit_core=fit_core, offset2=offset2, ref2=ref2, single=single)
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
            self.err = _rel(offset2 + w.norm2 - 2 * float((rhs * c).sum()) + float((c * nc).sum()), ref2)

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
        if _stalled(history, tol):
            converged = True
            break
    return start.factors(), best.factors(), err0, it, converged


def _cp_als(w: _Unfolded, f: Factors, tol: float, max_iter: int, *, fit_core: bool, offset2: float, ref2: float,
            single: bool = False) -> tuple[Factors, Factors, float, int, bool]:
    """:func:`_als` for ``r = 1`` (CP: every block a rank-1 term). Factors are kept transposed, one row per term:
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
    err0 = best_err = _rel(error2(mc, ct, guv), ref2)
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
        err = _rel(err2, ref2)
        history.append(err)
        if err < best_err:
            best, best_err = (ut, ct, vt), err
        if _stalled(history, tol):
            converged = True
            break
        if single and err2 < SINGLE_MIN_ERROR**2 * ref2:  # float32 products blur smaller errors: float64 on
            single, oki, iko = False, w.oki, w.iko
            yt = times(vt, oki)

    def blocks(f: tuple[Tensor, Tensor, Tensor]) -> Factors:
        ut, ct, vt = f
        return ut.mT.reshape(o, rank, 1), ct.reshape(rank, 1, 1, k), vt.mT.reshape(i, rank, 1)

    return blocks(start), blocks(best), err0, it, converged


def _exact_blocks(w3: Tensor, g: int, r: int) -> Factors:
    """The closed-form exact block-term factors (see :func:`exact_groups`), zero-padded to ``g`` groups."""
    o, i, k = w3.shape
    if r >= max(min(o, i * k), min(i, o * k)):
        ro, ri = min(r, o), min(r, i)
        _, (u0, v0, t), _, _, _ = _tucker(_Unfolded(w3), ro, ri, 0.0, 0)
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


@one_thread()
def block_term(weight: Tensor, groups: int, rank: int, *, source_groups: int = 1, tol: float | None = None,
               max_iter: int = DEFAULT_MAX_ITER, init: str = "svd", seed: int = 0) -> BottleneckFit:
    """Block-term fit ``1x1 (I -> rank) -> kxk (rank -> rank, groups) -> 1x1 (rank -> O)``.

    ``groups`` must divide ``rank``; ``groups = rank`` is the CP / depthwise bottleneck, ``groups = 1`` Tucker-2.
    Exact (closed form) when ``rank >= exact_rank(weight.shape, groups)`` (``groups=None`` there for the depthwise
    case). ``seed`` seeds ``init="random"`` and the random columns a start needs when ``rank`` exceeds ``O`` or ``I``.
    ``max_iter`` caps each ALS stage (on the HOSVD core when it compresses, then on the weight; one stage on the
    weight for CP fits with ``O*I*K*rank < SMALL_FIT_MACS``). ``tol=None`` is ``ALS_TOL`` (``TUCKER_TOL`` for
    ``groups=1``, which is :func:`tucker2`); the stopping rule is the module's (see its docstring).

    >>> w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    >>> cp = block_term(w, groups=12, rank=12, max_iter=10)
    >>> cp.core.shape, cp.rel_error < cp.init_rel_error < 1
    (torch.Size([12, 1, 3, 3]), True)
    >>> block_term(w, groups=48, rank=exact_rank(w.shape, None)).rel_error < 1e-12
    True
    """
    if groups == 1 and init == "svd":
        return tucker2(weight, rank, rank, source_groups=source_groups, tol=tol, max_iter=max_iter)
    tol = ALS_TOL if tol is None else tol
    w = _check(weight, source_groups, tol, max_iter, init)
    if groups < 1 or rank < 1 or rank % groups:
        raise ValueError(f"rank={rank} must be a positive multiple of groups={groups}")
    o, i, kh, kw = w.shape
    k = kh * kw
    g, r = groups, rank // groups
    w3 = w.reshape(o, i, k)
    exact = exact_groups(o, i, k, r) <= g
    unf = _Unfolded(w3)
    if unf.norm2 == 0.0:
        zero = (w3.new_zeros(o, g, r), w3.new_zeros(g, r, r, k), w3.new_zeros(i, g, r))
        return _result(w, unf, weight, zero, zero, 0, True, exact)
    if exact:
        f = _exact_blocks(w3, g, r)
        return _result(w, unf, weight, f, f, 0, True, True)
    gen = torch.Generator(device=w.device).manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=w.dtype, device=w.device)

    if init == "random":
        f = randn(o, g, r), w3.new_zeros(g, r, r, k), randn(i, g, r)
        start, best, _, it, converged = _als(unf, f, tol, max_iter, fit_core=True)
        return _result(w, unf, weight, start, best, it, converged, False)
    # closed-form start: the block diagonal of the core of a truncated HOSVD in its bases (small random columns
    # beyond O or I). When the HOSVD compresses (R*R <= O*I / 2), ALS runs first on its core (cheap), then on the
    # full weight; otherwise, and for CP fits too small for the compression to save time, on the full weight only.
    ro, ri = min(rank, o), min(rank, i)
    _, (u0, v0, t), _, _, _ = _tucker(unf, ro, ri, tol, 0)

    def basis(n: int) -> Tensor:
        return torch.cat([torch.eye(n, dtype=w.dtype, device=w.device), 1e-3 * randn(n, rank - n)], 1).reshape(n, g, r)

    def lift(f: Factors) -> Factors:  # orthonormal (unit) columns stay so: U0 and V0 are orthonormal
        return torch.einsum("op,pbr->obr", u0, f[0]), f[1], torch.einsum("iq,qbr->ibr", v0, f[2])

    f = basis(ro), w3.new_zeros(g, r, r, k), basis(ri)
    if 2 * ro * ri > o * i or (r == 1 and o * i * k * rank < SMALL_FIT_MACS):
        start, best, _, it, converged = _als(unf, lift(f), tol, max_iter, fit_core=True)
        return _result(w, unf, weight, start, best, it, converged, False)
    core = _Unfolded(t)
    residual2 = unf.norm2 - core.norm2  # the Tucker residual, orthogonal to everything in the bases
    single = r == 1 and ro * ri * k * rank >= SMALL_FIT_MACS  # CP: float32 products where they dominate the sweep
    start, best, _, it1, _ = _als(core, f, tol, max_iter, fit_core=True, offset2=residual2, ref2=unf.norm2,
                                  single=single)
    _, best, _, it2, converged = _als(unf, lift(best), tol, max_iter)
    return _result(w, unf, weight, lift(start), best, it1 + it2, converged, False)
