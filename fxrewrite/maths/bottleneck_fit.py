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

This module holds the entry points (:func:`tucker2`, :func:`block_term`), the rank and MAC arithmetic and the result;
the fitting itself is in ``fxrewrite.maths.tucker_hooi`` (HOOI), ``fxrewrite.maths.block_term_als`` (ALS, CP, the
exact closed forms) and ``fxrewrite.maths.bottleneck_factors`` (the unfolded weight and the factor layout).

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

from fxrewrite.maths.block_term_als import als, exact_blocks
from fxrewrite.maths.bottleneck_factors import Factors, Unfolded, fit_error
from fxrewrite.maths.factorize import dense_weight, one_thread
from fxrewrite.maths.tucker_hooi import hooi

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


def _result(w: Tensor, unf: Unfolded, weight: Tensor, start: Factors | float, best: Factors, iterations: int,
            converged: bool, exact: bool) -> BottleneckFit:
    """The fit as conv weights, with its exact dense error. ``start`` is the start's factors (the result is the
    better of start and best) or, for a monotone method, just the start's error."""
    o, i, kh, kw = w.shape
    err = fit_error(unf, best)
    if isinstance(start, float):
        init_err = max(start, err)
    else:
        init_err = fit_error(unf, start) if start is not best else err
        if err > init_err:
            best, err = start, init_err
    u, c, v = best
    g, ro, ri = c.shape[0], c.shape[1], c.shape[2]
    first = v.reshape(i, g * ri).mT.reshape(g * ri, i, 1, 1)
    core = c.reshape(g * ro, ri, kh, kw)
    last = u.reshape(o, g * ro, 1, 1)
    first, core, last = (t.to(dtype=weight.dtype, device=weight.device).contiguous() for t in (first, core, last))
    return BottleneckFit(first, core, last, g, g * ri, g * ro, err, init_err, iterations, converged, exact)



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
    unf = Unfolded(w.reshape(o, i, k))

    def padded(u: Tensor, v: Tensor, core: Tensor) -> Factors:
        c = w.new_zeros(1, rank_out, rank_in, k)
        c[0, :ro, :ri] = core
        return (torch.cat([u, u.new_zeros(o, rank_out - ro)], 1).reshape(o, 1, rank_out), c,
                torch.cat([v, v.new_zeros(i, rank_in - ri)], 1).reshape(i, 1, rank_in))

    if unf.norm2 == 0.0:
        zero = padded(w.new_zeros(o, ro), w.new_zeros(i, ri), w.new_zeros(ro, ri, k))
        return _result(w, unf, weight, zero, zero, 0, True, exact)
    _, best, err0, sweeps, converged = hooi(unf, ro, ri, tol, max_iter)
    # HOOI never increases the error: the start's error (from the eigenvalues) is enough
    return _result(w, unf, weight, err0, padded(*best), sweeps, converged, exact)



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
    unf = Unfolded(w3)
    if unf.norm2 == 0.0:
        zero = (w3.new_zeros(o, g, r), w3.new_zeros(g, r, r, k), w3.new_zeros(i, g, r))
        return _result(w, unf, weight, zero, zero, 0, True, exact)
    if exact:
        f = exact_blocks(w3, g, r)
        return _result(w, unf, weight, f, f, 0, True, True)
    gen = torch.Generator(device=w.device).manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=w.dtype, device=w.device)

    if init == "random":
        f = randn(o, g, r), w3.new_zeros(g, r, r, k), randn(i, g, r)
        start, best, _, it, converged = als(unf, f, tol, max_iter, fit_core=True)
        return _result(w, unf, weight, start, best, it, converged, False)
    # closed-form start: the block diagonal of the core of a truncated HOSVD in its bases (small random columns
    # beyond O or I). When the HOSVD compresses (R*R <= O*I / 2), ALS runs first on its core (cheap), then on the
    # full weight; otherwise, and for CP fits too small for the compression to save time, on the full weight only.
    ro, ri = min(rank, o), min(rank, i)
    _, (u0, v0, t), _, _, _ = hooi(unf, ro, ri, tol, 0)

    def basis(n: int) -> Tensor:
        return torch.cat([torch.eye(n, dtype=w.dtype, device=w.device), 1e-3 * randn(n, rank - n)], 1).reshape(n, g, r)

    def lift(f: Factors) -> Factors:  # orthonormal (unit) columns stay so: U0 and V0 are orthonormal
        return torch.einsum("op,pbr->obr", u0, f[0]), f[1], torch.einsum("iq,qbr->ibr", v0, f[2])

    f = basis(ro), w3.new_zeros(g, r, r, k), basis(ri)
    if 2 * ro * ri > o * i or (r == 1 and o * i * k * rank < SMALL_FIT_MACS):
        start, best, _, it, converged = als(unf, lift(f), tol, max_iter, fit_core=True)
        return _result(w, unf, weight, start, best, it, converged, False)
    core = Unfolded(t)
    residual2 = unf.norm2 - core.norm2  # the Tucker residual, orthogonal to everything in the bases
    single = r == 1 and ro * ri * k * rank >= SMALL_FIT_MACS  # CP: float32 products where they dominate the sweep
    start, best, _, it1, _ = als(core, f, tol, max_iter, fit_core=True, offset2=residual2, ref2=unf.norm2,
                                  single=single)
    _, best, _, it2, converged = als(unf, lift(best), tol, max_iter)
    return _result(w, unf, weight, lift(start), best, it1 + it2, converged, False)
