"""Closed-form output errors of weight truncations on calibration data: with ``G`` the Gram matrix of a site's
unfolded input patches (``SiteStats``), a weight change ``dW`` changes the output by
``sqrt(trace(dW G dW^T) / sum ||y||^2)`` (relative). ``separable_output_errors`` gives it for every rank of a
(grouped-)separable factorisation from one small matrix, ``grouped_output_error`` for a block-diagonal truncation
and ``tucker2_output_errors`` for a truncated HOSVD. No graph here: ``fxrewrite.budget.calibration`` collects the
statistics.

When the ``d x d`` Gram does not fit the memory cap (``SiteStats.method`` ``"columns"`` or ``"sketch"``), the
statistics hold a factor ``F`` (``d x l``, ``fxrewrite.maths.column_sketch``) with ``G = F F^T`` (exact: the
columns themselves) or ``E[F F^T] = G`` (a count sketch), and every formula here evaluates ``||dW F||^2`` instead,
in chunks of columns, without forming any ``d x d`` matrix (memory ``O(d l)`` plus the weight's size).

>>> import torch
>>> _ = torch.manual_seed(0)
>>> x = torch.randn(4, 100, dtype=torch.float64)  # 100 input patches of d = 4 values (one source group)
>>> w = torch.randn(1, 3, 4, dtype=torch.float64)  # the weight as groups x outputs x d
>>> gram = (x @ x.T)[None]
>>> stats = SiteStats(gram, w, energy=float(((w @ gram) * w).sum()), columns=100)
>>> stats.output_error(-w)  # dropping the whole weight loses the whole output
1.0
>>> errors = separable_output_errors(stats, groups=2)  # 2 input groups of 2 columns: ranks 0, 1, 2
>>> [round(float(e), 6) for e in errors[[0, 2]]]
[1.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fxrewrite.maths import factorize

__all__ = ["SiteStats", "grouped_output_error", "separable_output_errors", "tucker2_output_errors"]


@dataclass
class SiteStats:
    """Second moments of one site's input on the calibration data (sums over batches; no activation is kept).

    With ``factor`` set (``method`` "columns" or "sketch", ``gram`` None) ``G`` is ``factor @ factor^T`` (see the
    module docstring) and is never formed.

    Per source group ``b`` of the conv (``G`` groups, ``m = O/G`` outputs, ``d = (I/G)K`` columns): ``gram[b]`` the
    Gram matrix ``sum x x^T`` of the unfolded input patches (``fxrewrite.maths.im2col.im2col`` columns) and
    ``weight[b]`` the conv weight as ``m x d``, both float64; ``energy`` the output energy ``sum ||W x + bias||^2``.
    A weight change ``dW`` changes the output by ``trace(dW G dW^T) / energy`` (squared, relative):
    ``output_error(dw)``.
    """

    gram: Tensor | None
    weight: Tensor
    energy: float
    columns: int
    factor: Tensor | None = None  # (G, d, l) with G = F F^T ("columns") or E[F F^T] = G ("sketch"); gram is None
    method: str = "gram"  # "gram" (dense), "columns" (exact factor) or "sketch" (unbiased factor)
    memory_cap: int = 1 << 30  # bytes the formulas' temporaries may take (column chunks of the factor)
    taps: int = 0  # kh * kw of the conv (0: unknown); lets slice Grams be shared between group counts
    _cache: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_gram(cls, gram: Tensor, weight: Tensor, bias: Tensor | None, sums: Tensor, columns: int,
                  memory_cap: int = 1 << 30) -> SiteStats:
        """Dense statistics from the Gram (``G x d x d``), the column sums (``G x d``) and the bias (``G x m`` or
        None): the output energy ``sum ||W x + b||^2 = trace(W G W^T) + 2 b . W sums + n ||b||^2``, with ``W G``
        computed once and kept for ``grouped_output_error``.

        >>> x = torch.ones(1, 2, 3, dtype=torch.float64); w = torch.ones(1, 1, 2, dtype=torch.float64)
        >>> SiteStats.from_gram(x @ x.mT, w, torch.ones(1, 1, dtype=torch.float64), x.sum(-1), 3).energy  # (2+1)^2*3
        27.0
        """
        wg = weight @ gram
        energy = float((wg * weight).sum())
        if bias is not None:
            energy += float(2 * (bias * (weight @ sums[..., None])[..., 0]).sum() + columns * bias.square().sum())
        stats = cls(gram, weight, energy, columns, memory_cap=memory_cap)
        stats._cache["wg"] = wg
        return stats

    @property
    def weight_times_gram(self) -> Tensor:
        """``W G`` per source group (``m x d``, float64)."""
        if "wg" not in self._cache:
            self._cache["wg"] = self.weight @ self.gram
        return self._cache["wg"]

    def compute(self, name: str) -> Tensor:
        """``gram``, or ``weight_gram`` (``W^T W`` per source group), in the dtype the quadratic forms use (cached):
        float32 from ``_FP32_FROM`` columns on, float64 below (``formula_dtype``). From 1024 columns on (resnet's
        256- and 512-channel 3x3 convs) the slices' eigenvectors are float32 too: products 2-3x and eigenvectors 2x
        faster (resnet18's calibrated budget 9.6 -> 7.5 s). The price is float32's eigenvector accuracy,
        ``eps * ||A||^2 / gap``: on random 512-channel weights the output errors agree with float64 to about 3e-7
        (an exactly rank-r weight's error at rank r reads ~5e-7, not 0); on a steeply decaying spectrum (singular
        values ``e^{-j/30}``) errors below about 1e-3 carry an absolute error of up to 2e-4 (mostly over-estimated:
        2.5e-5 reads 1.6e-4), which the budget's objective ``-log(1 - e^2)`` does not see (``e^2 < 1e-7``)."""
        if name not in self._cache:
            dtype = formula_dtype(self.gram.shape[-1])
            if name == "gram":
                self._cache[name] = self.gram.to(dtype)
            elif name == "weight_gram":
                w = self.weight.to(dtype)
                self._cache[name] = w.mT @ w
            else:
                raise ValueError(f"SiteStats.compute: unknown matrix {name!r} (gram or weight_gram)")
        return self._cache[name]

    def output_error(self, dw: Tensor) -> float:
        """Relative output error ``sqrt(trace(dW G dW^T) / energy)`` of a weight change ``dw`` (``G x m x d``)."""
        if self.factor is not None:
            dw64 = dw.to(torch.float64)
            q = sum(float((dw64 @ f).square().sum()) for f in self.factor_chunks(dw.shape[-2] * dw.shape[0]))
            return _relative(q, self.energy)
        q = float(((dw.to(torch.float64) @ self.gram) * dw).sum())
        return _relative(q, self.energy)

    def factor_chunks(self, per_column: int) -> Iterator[Tensor]:
        """The factor in chunks of columns, sized so that a temporary of ``per_column`` float64 numbers per column
        (times 4) stays within the memory cap."""
        assert self.factor is not None
        width = self.factor.shape[-1]
        step = max(1, self.memory_cap // 4 // (8 * 4 * max(1, per_column)))
        for lo in range(0, width, step):
            yield self.factor[..., lo:lo + step]


def _relative(q: float | np.ndarray, energy: float) -> Any:
    """``sqrt(q / energy)`` (0 for a site whose output is zero on the data)."""
    q = np.maximum(q, 0.0)
    if energy <= 0.0:
        return np.zeros_like(q) if isinstance(q, np.ndarray) else 0.0
    out = np.sqrt(q / energy)
    return out if isinstance(out, np.ndarray) else float(out)


_FP32_FROM = 1024  # see SiteStats.compute


def formula_dtype(columns: int) -> torch.dtype:
    """The dtype of the error formulas' products and eigenvectors for ``columns`` columns per source group: float32
    from ``_FP32_FROM`` on (see ``SiteStats.compute``), float64 below."""
    return torch.float32 if columns >= _FP32_FROM else torch.float64


def _block_quad(m: Tensor, r: Tensor) -> Tensor:
    """``out[x, j, y, l] = sum_{a, b} r[x, a, j] M[(x, a), (y, b)] r[y, b, l]`` for block-diagonal factors ``r``
    (``q`` blocks of ``c x k``) and a ``qc x qc`` matrix ``M``: ``R^T M R`` in ``D^2 k + D q k^2`` operations; both
    in the formulas' dtype (``formula_dtype``)."""
    q, c, k = r.shape
    t = (m.reshape(q * c, q, c).transpose(0, 1) @ r)  # (y, (x, a), l)
    t = t.reshape(q, q, c, k).permute(1, 2, 0, 3).reshape(q, c, q * k)  # (x, a, (y, l))
    return (r.mT @ t).reshape(q, k, q, k)


def separable_output_errors(stats: SiteStats, groups: int) -> np.ndarray:
    """``errors[r]``: the relative output error on the calibration data of the (grouped-)separable factorisation
    with ``groups`` input groups and rank ``r`` (0 .. the exact rank), the per-group truncated SVD that
    ``factorize.grouped_separable`` builds. With ``A_i = sum_j s_ij u_ij v_ij^T`` the slice of input group ``i``,
    the discarded change is ``sum_{j >= r} s_ij u_ij v_ij^T``, so ``trace(dW G dW^T) = sum_{j, l >= r} Z[j, l]``
    with ``Z[j, l] = sum_{x, y} (s u_xj . s u_yl) (v_xj^T G_xy v_yl)``: one ``k x k`` matrix per group count
    gives every rank."""
    if stats.factor is not None:
        return _separable_factor(stats, groups)
    big_g, m, d = stats.weight.shape
    q = groups // big_g
    c = d // q
    k = min(m, c)
    z = torch.zeros(k, k, dtype=torch.float64)
    dtype = formula_dtype(d)
    for b in range(big_g):
        a = stats.weight[b].reshape(m, q, c).transpose(0, 1)  # (q, m, c): the slices A_i of this source group
        if c <= m:  # tall slices (as factorize computes them): right vectors V, left Gram V^T A_x^T A_y V
            with factorize.one_thread():  # batched eigh: threads only synchronise
                right = torch.linalg.eigh((a.mT @ a).to(dtype)).eigenvectors.flip(-1)  # (q, c, c), descending
            left = _block_quad(stats.compute("weight_gram")[b], right)
        else:  # wide slices: left vectors U, right factors A^T U = V S
            with factorize.one_thread():
                u = torch.linalg.eigh((a @ a.mT).to(dtype)).eigenvectors.flip(-1)  # (q, m, m)
            right = a.mT.to(dtype) @ u
            flat = u.transpose(0, 1).reshape(m, q * k)
            left = (flat.mT @ flat).reshape(q, k, q, k)
        z += (left * _block_quad(stats.compute("gram")[b], right)).sum(0).sum(1).to(torch.float64)
    tail = z.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1).diagonal()  # tail[r] = sum_{j, l >= r} z[j, l]
    return _relative(torch.cat([tail, tail.new_zeros(1)]).numpy(), stats.energy)


def grouped_output_error(stats: SiteStats, groups: int) -> float:
    """Relative output error of keeping the block diagonal with ``groups`` groups (``factorize.block_diagonal``):
    ``trace(dW G dW^T) = trace(W G W^T) - 2 trace(W_kept G W^T) + trace(W_kept G W_kept^T)``, the last one
    block by block."""
    if stats.factor is not None:
        return _grouped_factor(stats, groups)
    big_g, m, d = stats.weight.shape
    q = groups // big_g
    mo, dc = m // q, d // q
    w = torch.diagonal(stats.weight.reshape(big_g, q, mo, q, dc), dim1=1, dim2=3)  # (G, mo, dc, q)
    wg = torch.diagonal(stats.weight_times_gram.reshape(big_g, q, mo, q, dc), dim1=1, dim2=3)
    blocks = torch.diagonal(stats.gram.reshape(big_g, q, dc, q, dc), dim1=1, dim2=3).permute(0, 3, 1, 2)
    kept = w.permute(0, 3, 1, 2)  # (G, q, mo, dc)
    total = float((stats.weight * stats.weight_times_gram).sum())
    q_err = total - 2 * float((w * wg).sum()) + float(((kept @ blocks) * kept).sum())
    return _relative(q_err, stats.energy)


def tucker2_output_errors(stats: SiteStats, u: Tensor, v: Tensor, ranks: Sequence[int]) -> list[float]:
    """Relative output errors of the truncated HOSVD ``W ~ U_r U_r^T W x_I V_r V_r^T`` (``u``, ``v``: the full
    mode-O / mode-I eigenvector bases, descending) for each rank. In the rotated bases the change keeps the core
    entries ``(p, q)`` with ``p >= r`` or ``q >= r``: rows ``p >= r`` count in full, rows ``p < r`` only on the
    input channels ``q >= r``, whose quadratic forms are accumulated row by row (chunked to bound memory)."""
    if stats.weight.shape[0] != 1:
        raise ValueError("tucker2_output_errors needs an ungrouped conv (the candidate is dense)")
    if stats.factor is not None:
        return _tucker2_factor(stats, u, v, ranks)
    o, d = stats.weight.shape[1:]
    i = v.shape[0]
    k = d // i
    y = torch.einsum("oik,op,iq->pqk", stats.weight[0].reshape(o, i, k), u, v)  # the rotated weight (core)
    g = stats.gram[0].reshape(i, k, i, k)
    g = torch.einsum("akbl,bz->akzl", g, v)
    g = torch.einsum("akzl,aq->qkzl", g, v).reshape(d, d)
    yf = y.reshape(o, d)
    rows = ((yf @ g) * yf).sum(dim=1)  # full-row quadratic forms
    suffix = torch.cat([rows.flip(0).cumsum(0).flip(0), rows.new_zeros(1)])  # suffix[p] = sum_{p' >= p}
    gq = g.reshape(i, k, d)
    # rows per chunk: the (i, rows, d) product stays ~256 MiB, or 1/4 of a lower memory cap
    step = max(1, min(1 << 25, stats.memory_cap // 32) // max(i * d, 1))
    acc = torch.zeros(i, i, dtype=torch.float64)
    done = 0
    out = []

    def pair_forms(lo: int, hi: int) -> Tensor:  # (hi-lo, i, i): C_p[q, z] = sum_kl y[p,q,k] g[q,k,z,l] y[p,z,l]
        t = torch.bmm(y[lo:hi].transpose(0, 1), gq)  # (i, rows, d)
        t = t.reshape(i, hi - lo, i, k)
        return (t * y[lo:hi].unsqueeze(0)).sum(dim=-1).permute(1, 0, 2)

    for r in ranks:
        r_o, r_i = min(r, o), min(r, i)
        while done < r_o:
            hi = min(done + step, r_o)
            acc += pair_forms(done, hi).sum(dim=0)
            done = hi
        out.append(_relative(float(suffix[r_o] + acc[r_i:, r_i:].sum()), stats.energy))
    return out


# ---------------------------------------------------------------- factor forms (G = F F^T, no d x d matrix formed)

def _wide_grams(stats: SiteStats, b: int, q: int) -> Tensor | None:
    """The ``m x m`` Grams of source group ``b``'s ``q`` slices (``m < d / q``) as sums of those of the finest
    slicing into whole input channels that is still wider than ``m`` (computed once per site and cached: resnet's
    512-channel 3x3 convs split into 1, 2, 4, 8 slices form one set of 8 Grams instead of four sets); None when the
    taps are unknown."""
    finest = _finest_wide(stats, q)
    if finest is None:
        return None
    m, d = stats.weight.shape[1:]
    key = f"slice_grams{b}:{finest}"
    if key not in stats._cache:
        a = stats.weight[b].reshape(m, finest, d // finest).transpose(0, 1)
        stats._cache[key] = a @ a.mT
    return stats._cache[key].reshape(q, finest // q, m, m).sum(dim=1)


def _finest_wide(stats: SiteStats, q: int) -> int | None:
    """The finest slicing into whole input channels that ``q`` slices are sums of and whose slices are still wider
    than the ``m`` outputs (``q`` itself at the least); None when the taps are unknown."""
    m, d = stats.weight.shape[1:]
    if stats.taps <= 0 or d % stats.taps:
        return None
    channels = d // stats.taps  # the finest slicing keeps whole channels and at most the weight's numbers
    return max(f for f in range(q, channels + 1, q) if (channels % f == 0 and d // f > m) or f == q)


def _tall_grams(stats: SiteStats, b: int, q: int) -> Tensor:
    """The ``c x c`` Grams ``A_x^T A_x`` (float64) of source group ``b``'s ``q`` slices (``c = d / q <= m``): diagonal
    blocks of those of the coarsest tall slicing formed so far (cached per site), or formed here."""
    m, d = stats.weight.shape[1:]
    c = d // q
    coarser = sorted((int(k.split(":")[1]), v) for k, v in stats._cache.items() if k.startswith(f"tall_grams{b}:"))
    for p, grams in coarser:
        if q % p == 0:
            s = q // p  # each of the p Grams (d/p square) holds s diagonal blocks of c x c
            blocks = torch.diagonal(grams.reshape(p, s, c, s, c), dim1=1, dim2=3)  # (p, c, c, s)
            return blocks.permute(0, 3, 1, 2).reshape(q, c, c)
    at = stats.weight[b].mT.reshape(q, c, m)  # A_x^T, a view
    stats._cache[f"tall_grams{b}:{q}"] = grams = at @ at.mT
    return grams


def _cached(stats: SiteStats, key: str, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, kept in ``stats``' cache while the tensors kept this way take at most an eighth of the memory
    cap (the factor in the formulas' dtype and the slices' outputs on it, shared by every group count)."""
    if key in stats._cache:
        return stats._cache[key]
    value = make()
    kept = sum(t.numel() * t.element_size() for k, t in stats._cache.items() if k.startswith("chunk:"))
    if kept + value.numel() * value.element_size() <= stats.memory_cap // 8:
        stats._cache[key] = value
    return value


def _weight_t(stats: SiteStats, b: int, dtype: torch.dtype) -> Tensor:
    """``W_b^T`` (``d x m``, contiguous, in ``dtype``; cached): slice ``x``'s ``A_x^T`` is a row block of it."""
    return _cached(stats, f"chunk:wt{b}:{dtype}", lambda: stats.weight[b].mT.to(dtype).contiguous())


def _factor_chunks(stats: SiteStats, b: int, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """``(key, F_b)`` for each chunk of the factor's columns (``d x n``, in ``dtype``, cached): the same chunks for
    every group count and form (the largest temporaries hold at most ``d`` numbers per column), so what is cached
    per chunk is reused."""
    assert stats.factor is not None
    lo = 0
    for f in stats.factor_chunks(stats.weight.shape[-1] + stats.weight.shape[-2]):
        key, lo = f"{b}:{lo}:{lo + f.shape[-1]}:{dtype}", lo + f.shape[-1]
        yield key, _cached(stats, f"chunk:f{key}", lambda f=f: f[b].to(dtype))


def _slice_outputs(stats: SiteStats, b: int, key: str, f_b: Tensor, finest: int) -> Tensor:
    """``Y_x = A_x F_x`` (``finest x m x n``) for the ``finest`` slices of source group ``b`` on the chunk ``f_b``
    (cached): coarser slicings' outputs are sums of these, the whole output ``W F`` their total."""
    m, d = stats.weight.shape[1:]
    wt = _weight_t(stats, b, f_b.dtype)
    return _cached(stats, f"chunk:y{key}:{finest}",
                   lambda: wt.view(finest, d // finest, m).mT @ f_b.view(finest, d // finest, -1))


def _separable_factor(stats: SiteStats, groups: int) -> np.ndarray:
    """``separable_output_errors`` from the factor: the discarded change of rank ``r`` maps ``F`` to
    ``D_r = sum_{j >= r} M_j`` with ``M_j = sum_x left_xj (right_xj^T F_x)`` (``m x l``), so ``tail[r] = ||D_r||^2``
    (``_tail_norms``: no ``k x k`` matrix of all inner products, no ``k x m x l`` tensor). Wide slices (``c > m``):
    ``left = U`` (orthonormal) and ``right_x^T F_x = U_x^T Y_x`` with ``Y_x = A_x F_x`` the slice's output, formed once
    per site at the finest whole-channel slicing and summed for coarser ones (``A^T U`` is never formed). Tall slices:
    ``right = V``, ``left = A V``, with the ``c x c`` Grams shared as diagonal blocks between group counts. With one
    slice per source group the ``M_j`` are orthogonal and ``tail`` is a suffix sum of their squared norms."""
    assert stats.factor is not None
    big_g, m, d = stats.weight.shape
    q = groups // big_g
    c = d // q
    k = min(m, c)
    norms = torch.zeros(k, dtype=torch.float64)  # ascending eigenvalue order: norms[t] = tail[k - 1 - t]
    dtype = formula_dtype(d)
    for b in range(big_g):
        finest = 0
        if c > m:  # wide: left vectors U of the m x m slice Grams
            grams = _wide_grams(stats, b, q)
            if grams is None:
                a = stats.weight[b].mT.reshape(q, c, m).mT
                grams = a @ a.mT
            else:
                finest = _finest_wide(stats, q) or 0
            with factorize.one_thread():  # batched eigh: threads only synchronise
                u = torch.linalg.eigh(grams.to(dtype)).eigenvectors  # (q, m, m), ascending
            right_t = left_t = u.mT.contiguous()  # U^T
        else:  # tall: right vectors V of the c x c slice Grams, left = A V
            with factorize.one_thread():
                right = torch.linalg.eigh(_tall_grams(stats, b, q).to(dtype)).eigenvectors  # (q, c, c), ascending
            right_t = right.mT
            left_t = right_t @ _weight_t(stats, b, dtype).view(q, c, m)  # (q, c, m): (A_x V_x)^T
        scale = left_t[0].square().sum(dim=-1, dtype=torch.float64) if q == 1 else None  # orthogonal columns
        for key, f_b in _factor_chunks(stats, b, dtype):
            if finest:  # p_x = U_x^T (A_x F_x), from the outputs of the finest slices
                y = _slice_outputs(stats, b, key, f_b, finest)
                p = right_t @ (y.reshape(q, finest // q, m, -1).sum(dim=1) if finest != q else y)  # (q, k, n)
            elif c > m:
                p = right_t @ (_weight_t(stats, b, dtype).view(q, c, m).mT @ f_b.view(q, c, -1))
            else:
                p = right_t @ f_b.view(q, c, -1)  # (q, k, n)
            if scale is not None:
                norms += (scale * p[0].square().sum(dim=-1, dtype=torch.float64)).cumsum(0)
            else:
                norms += _tail_norms(left_t, p, orthonormal=c > m)
    tail = torch.cat([norms.flip(0), norms.new_zeros(1)])
    return _relative(tail.numpy(), stats.energy)


def _tail_norms(left_t: Tensor, p: Tensor, orthonormal: bool = False) -> Tensor:
    """``out[t] = ||sum_{s <= t} M_s||^2`` (float64, ``(k,)``) for ``M_s = sum_x left_t[x, s] p[x, s]^T``
    (``left_t`` ``q x k x m``, ``p`` ``q x k x n``): one ``m x n`` buffer updated rank by rank (one small GEMM each,
    on strided views: the buffer stays in cache) and its squared norm taken by a cascade sum. With two slices of
    orthonormal vectors (``orthonormal``: wide slices, ``left_t`` = ``U^T``) the inner products instead give every
    rank at once: ``out[t] = sum_{s <= t} (|p_1s|^2 + |p_2s|^2) + 2 sum_{s, u <= t} (U_1^T U_2)_su (P_1 P_2^T)_su``,
    two GEMMs (resnet18's layer4: 5x faster). (Blocks of ranks whose inner products come from larger GEMMs measured
    no faster for more slices: they double the multiply-adds.)"""
    q, k, m = left_t.shape
    if q == 2 and orthonormal:
        own = p.square().sum(dim=(0, 2), dtype=torch.float64)  # (k,)
        cross = ((left_t[0] @ left_t[1].mT) * (p[0] @ p[1].mT)).to(torch.float64)  # (k, k)
        return own.cumsum(0) + 2 * cross.cumsum(0).cumsum(1).diagonal()
    acc = torch.zeros(m, p.shape[-1], dtype=p.dtype)
    flat, squares = acc.view(-1), torch.empty(acc.numel(), dtype=p.dtype)
    out = torch.empty(k, dtype=p.dtype)
    with factorize.one_thread():  # k small GEMMs: threads would only synchronise (8x slower on 2 busy cores)
        for s in range(k):
            acc.addmm_(left_t[:, s].mT, p[:, s])
            torch.sum(torch.mul(flat, flat, out=squares), 0, out=out[s])  # cascade sum: ~1e-7 relative (dot: 6e-7)
    return out.to(torch.float64)


def _grouped_factor(stats: SiteStats, groups: int) -> float:
    """``grouped_output_error`` from the factor: ``||W F - blockdiag(W) F||^2``. Where ``groups`` divides the finest
    wide slicing both terms are read off the slices' outputs (``_slice_outputs``, shared with the separable form);
    otherwise ``W F`` is cached per chunk and the kept blocks are multiplied out."""
    assert stats.factor is not None
    big_g, m, d = stats.weight.shape
    q = groups // big_g
    mo, dc = m // q, d // q
    dtype = formula_dtype(d)
    finest = _finest_wide(stats, 1) or 1  # the outputs of these slices are shared with the separable form
    q_err = 0.0
    for b in range(big_g):
        wt = _weight_t(stats, b, dtype)
        for key, f_b in _factor_chunks(stats, b, dtype):
            y = _slice_outputs(stats, b, key, f_b, finest) if finest > 1 else None
            if y is None:
                full = _cached(stats, f"chunk:wf{key}", lambda wt=wt, f_b=f_b: wt.mT @ f_b)
            else:
                full = _cached(stats, f"chunk:wf{key}", lambda y=y: y.sum(dim=0))
            if y is not None and finest % q == 0:
                yq = y.reshape(q, finest // q, m, -1).sum(dim=1) if finest != q else y  # (q, m, n)
                kept = torch.diagonal(yq.reshape(q, q, mo, -1), dim1=0, dim2=1).permute(2, 0, 1)  # (q, mo, n)
            else:
                blocks = torch.diagonal(wt.view(q, dc, q, mo), dim1=0, dim2=2).permute(2, 0, 1).contiguous()
                kept = blocks.mT @ f_b.view(q, dc, -1)  # (q, mo, n): the diagonal blocks' outputs
            q_err += float((full.view(q, mo, -1) - kept).square().sum(dtype=torch.float64))
    return _relative(q_err, stats.energy)


def _tucker2_factor(stats: SiteStats, u: Tensor, v: Tensor, ranks: Sequence[int]) -> list[float]:
    """``tucker2_output_errors`` from the factor: in the rotated bases the output on the factor is ``Z = y F'``
    (``F'`` = the factor with its input channels rotated by ``v``); with ``T[q, p] = y[p, q] F'[q]`` and its suffix
    sums ``S[r, p] = sum_{q >= r} T[q, p]``, rank ``r`` loses ``sum_{p >= r} ||Z_p||^2 + sum_{p < r} ||S[r, p]||^2``."""
    assert stats.factor is not None
    o, d = stats.weight.shape[1:]
    i = v.shape[0]
    k = d // i
    y = torch.einsum("oik,op,iq->pqk", stats.weight[0].reshape(o, i, k), u, v).transpose(0, 1)  # (q, p, k)
    rows = torch.zeros(o, dtype=torch.float64)
    tails = torch.zeros(i + 1, o, dtype=torch.float64)  # tails[r, p] = ||S[r, p]||^2 (S[i] = 0)
    for f in stats.factor_chunks(2 * i * o + 2 * d):
        fr = torch.einsum("akn,aq->qkn", f[0].reshape(i, k, -1), v)  # (q, k, n)
        t = y @ fr  # (q, p, n)
        suffix = t.flip(0).cumsum(0).flip(0)  # (q, p, n): S[r] for r < i
        rows += suffix[0].square().sum(dim=-1)
        tails[:i] += suffix.square().sum(dim=-1)
    row_suffix = torch.cat([rows.flip(0).cumsum(0).flip(0), rows.new_zeros(1)])
    out = []
    for r in ranks:
        r_o, r_i = min(r, o), min(r, i)
        out.append(_relative(float(row_suffix[r_o] + tails[r_i, :r_o].sum()), stats.energy))
    return out
