"""Factorisations of Conv2d weights into cheaper grouped / separable convolutions.

Pure tensor maths: no ``nn.Module`` and no ``torch.fx``. A conv weight ``W`` has shape
``(O, I/G, kh, kw)`` where ``G`` is the source conv's ``groups``; ``K = kh * kw``.

Every factorisation is computed in float64 on the weight's device and returned in the weight's
dtype and device, on one CPU thread (:func:`one_thread`); the one exception is the rank-1 pointwise
factor of a dense float32 conv, formed in float32 (:func:`_rank_one_pointwise`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from fxrewrite.maths.top_eigen import top_eigenpairs

__all__ = [
    "BlockDiagonal",
    "SeparableFactors",
    "block_diagonal",
    "channel_shuffle_permutation",
    "dense_weight",
    "depthwise_separable",
    "exact_rank",
    "grouped_separable",
    "one_thread",
    "predicted_rel_error",
    "singular_values",
]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch CPU work on one intra-op thread, then restore the thread count.

    Factorisations are batched small GEMMs and ``eigh`` calls whose threads mostly synchronise: on a busy 2-core
    machine two threads were 8-130x slower than one (a 512x512x3x3 weight split into 4 groups: 22.8 s vs 0.17 s).

    >>> with one_thread():
    ...     torch.get_num_threads()
    1
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


@dataclass(frozen=True)
class SeparableFactors:
    """Factors of a conv weight as ``conv1x1(groups=G, pointwise) o conv(groups=g, spatial)``.

    ``spatial`` has shape ``(g*r, I/g, kh, kw)``: output channel ``i*r + j`` belongs to input group ``i``.
    ``pointwise`` has shape ``(O, g*r/G, 1, 1)`` and is used with ``groups=G`` (the source groups).
    ``rel_error`` is ``||W - W'||_F / ||W||_F`` from the singular values; ``exact`` is ``rank >= exact_rank``.
    Both tensors are contiguous.
    """

    spatial: Tensor
    pointwise: Tensor
    rank: int
    groups: int
    rel_error: float
    exact: bool


@dataclass(frozen=True)
class BlockDiagonal:
    """Block-diagonal truncation of a conv weight, usable as ``Conv2d(groups=groups)``.

    ``kept_energy`` is ``||W_kept||^2 / ||W||^2`` (1.0 for a zero weight), ``rel_error`` is
    ``sqrt(1 - kept_energy)`` and ``exact`` is True when nothing nonzero was dropped.
    """

    weight: Tensor
    groups: int
    kept_energy: float
    rel_error: float
    exact: bool


def _check_weight(weight_shape: tuple[int, ...], source_groups: int) -> tuple[int, int, int]:
    """Validate a conv weight shape; return ``(O, I, K)``."""
    if len(weight_shape) != 4:
        raise ValueError(f"expected a 4-D conv weight (O, I/G, kh, kw), got shape {tuple(weight_shape)}")
    if source_groups < 1:
        raise ValueError(f"source_groups must be >= 1, got {source_groups}")
    out_ch, in_per_group, kh, kw = (int(s) for s in weight_shape)
    if out_ch % source_groups != 0:
        raise ValueError(
            f"source_groups={source_groups} does not divide the {out_ch} output channels of weight "
            f"shape {tuple(weight_shape)}"
        )
    return out_ch, in_per_group * source_groups, kh * kw


def _check_groups(in_ch: int, source_groups: int, groups: int) -> None:
    """Validate the target ``groups`` against the input channels and the source groups."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if in_ch % groups != 0:
        raise ValueError(f"groups={groups} does not divide the number of input channels I={in_ch}")
    if groups % source_groups != 0:
        raise ValueError(f"groups={groups} is not a multiple of source_groups={source_groups}")


def exact_rank(weight_shape: tuple[int, ...], source_groups: int, groups: int) -> int:
    """Rank at which grouped-separable factoring is exact: ``min(O/G, (I/g)*K)``.

    >>> exact_rank((8, 4, 3, 3), source_groups=1, groups=4)
    8
    >>> exact_rank((8, 4, 1, 1), source_groups=1, groups=4)
    1
    """
    out_ch, in_ch, k = _check_weight(tuple(weight_shape), source_groups)
    _check_groups(in_ch, source_groups, groups)
    return min(out_ch // source_groups, (in_ch // groups) * k)


def dense_weight(weight: Tensor, source_groups: int) -> Tensor:
    """Expand a grouped conv weight to its dense ``(O, I, kh, kw)`` form (zeros off the block diagonal).

    >>> dense_weight(torch.ones(4, 1, 1, 1), 2)[:, :, 0, 0]
    tensor([[1., 0.],
            [1., 0.],
            [0., 1.],
            [0., 1.]])
    """
    out_ch, in_ch, _ = _check_weight(tuple(weight.shape), source_groups)
    g = source_groups
    ob, ib = out_ch // g, in_ch // g
    kh, kw = weight.shape[2], weight.shape[3]
    dense = weight.new_zeros(out_ch, in_ch, kh, kw)
    # diagonal over (output block, input block) is a writable view of shape (Ob, Ib, kh, kw, G)
    diag = torch.diagonal(dense.view(g, ob, g, ib, kh, kw), dim1=0, dim2=2)
    diag.copy_(weight.reshape(g, ob, ib, kh, kw).movedim(0, -1))
    return dense


def group_matrices(weight: Tensor, source_groups: int, groups: int) -> Tensor:
    """Per-input-group matrices ``A_i`` of shape ``(g, O/G, (I/g)*K)`` in float64 (for a dense source a strided view
    of the widened weight, see :func:`group_matrix_chunks`).

    ``A_i`` is the source weight restricted to input group ``i`` and the output block that sees it.
    """
    return next(group_matrix_chunks(weight, source_groups, groups, max_bytes=None))


def group_matrix_chunks(weight: Tensor, source_groups: int, groups: int,
                        max_bytes: int | None = 1 << 23) -> Iterator[Tensor]:
    """:func:`group_matrices` in consecutive runs of groups of at most ``max_bytes`` each (None: all at once), as
    few runs as that allows, of equal sizes (to one group).

    Every chunk is a float64 batch written into one reused buffer, so a chunk is valid only until the next is drawn:
    a few MB that stay in the last-level cache (a whole resnet152's 3x3 weights widened at once are 237 MB of
    freshly faulted pages, about a third of the factorisation's time). Equal runs leave no small tail batch, on
    which the per-call costs of the batched steps dominate (a 256-channel conv at 4 MiB: runs of 227 and 29).
    A dense source (``source_groups=1``) is widened in its own row order and the chunk is a strided view of it
    (each matrix row-major with a leading dimension of the run's width: BLAS reads it as it is); a grouped one is
    copied into a contiguous batch.

    >>> [tuple(c.shape) for c in group_matrix_chunks(torch.zeros(4, 6, 1, 1), 1, 3, max_bytes=128)]
    [(1, 4, 2), (2, 4, 2)]
    >>> [c.shape[0] for c in group_matrix_chunks(torch.zeros(4, 10, 1, 1), 1, 10, max_bytes=96)]
    [2, 3, 2, 3]
    """
    out_ch, in_ch, k = _check_weight(tuple(weight.shape), source_groups)
    _check_groups(in_ch, source_groups, groups)
    big_g, g = source_groups, groups
    per_block = g // big_g  # input groups per source block
    c = in_ch // g
    ob = out_ch // big_g
    per_chunk = g if max_bytes is None else max(1, min(g, max_bytes // (ob * c * k * 8)))
    runs = -(-g // per_chunk)
    bounds = [g * i // runs for i in range(runs + 1)]  # run sizes differ by at most one group
    buffer = torch.empty(-(-g // runs) * ob * c * k, dtype=torch.float64, device=weight.device)
    if big_g == 1:
        # (O, g, c*K): a run of groups is a block of columns, read row by row (sequential reads: staging plus Grams
        # of resnet152's 3x3 weights 56 ms against 69 ms with the transposing copy below); the batch is its
        # (n, O, c*K) transposed view
        w = weight.detach().reshape(ob, g, c * k)
        for start, end in itertools.pairwise(bounds):
            n = end - start
            yield buffer[:ob * n * c * k].view(ob, n, c * k).copy_(w[:, start:end]).transpose(0, 1)
        return
    # (G, O/G, g/G, c, K) -> (G, g/G, O/G, c, K) -> (g, O/G, c*K); input group i = b*(g/G) + l. One strided copy
    # that also widens to float64 gives a contiguous batch.
    w = weight.detach().reshape(big_g, ob, per_block, c, k).permute(0, 2, 1, 3, 4).reshape(g, ob, c, k)
    for start, end in itertools.pairwise(bounds):
        n = end - start
        yield buffer[:n * ob * c * k].view(n, ob, c, k).copy_(w[start:end]).view(n, ob, c * k)


def _low_rank(a: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Balanced best rank-``rank`` factors of a batch of matrices: ``a ~ left @ right`` and the relative error.

    ``a`` is ``(..., m, n)``; ``left`` is ``(..., m, rank)`` and ``right`` ``(..., rank, n)``, with the j-th column
    of ``left`` and row of ``right`` both scaled by ``sqrt(s_j)``. The singular subspace comes from the eigenvectors
    of the small Gram matrix (``n x n`` for the usual tall ``O x K`` slices): a batched GEMM plus tiny ``eigh`` calls,
    several times faster on CPU than a batched SVD of many tall-skinny matrices. The factors reconstruct
    ``a @ V_r @ V_r^T`` (or ``U_r @ U_r^T @ a``) - Eckart-Young's optimum - so the relative error is that of the
    discarded squared singular values (the Gram eigenvalues), and at full rank the product is ``a`` to rounding
    whatever the accuracy of small singular values. Signs: the largest-magnitude entry of each ``v_j`` is positive.

    >>> left, right, err = _low_rank(torch.tensor([[[3.0, 0.0], [0.0, 4.0]]], dtype=torch.float64), 1)
    >>> (left @ right).tolist(), round(err, 12)
    ([[[0.0, 0.0], [0.0, 4.0]]], 0.6)
    """
    left, right, discarded, total = _low_rank_parts(a, rank)
    return left, right, _relative_error(discarded, total, rank >= min(a.shape[-2], a.shape[-1]))


def _relative_error(discarded: float, total: float, full_rank: bool) -> float:
    return 0.0 if total == 0.0 or full_rank else math.sqrt(discarded / total)


# rank 1 on Grams of at most this size (measured up to 25: 5x5 kernels), in batches of at least this many:
# top_eigenpairs instead of eigh. One thread, Kaiming-random Grams, time per batch of 227 (of 29): 9x9 0.56 ms vs
# eigh's 1.37 ms (0.25 vs 0.24 ms), 16x16 1.1 vs 3.9 ms, 25x25 3.1 vs 10.3 ms
_TOP_EIGEN_MAX_N = 25
_TOP_EIGEN_MIN_BATCH = 32


def _gram(a: Tensor, tall: bool) -> Tensor:
    """``a^T a`` (tall) or ``a a^T`` of a float64 batch; on the CPU through numpy, whose OpenBLAS batched product is
    ~1.5x torch's MKL one here (a (227, 256, 9) batch: 0.63 ms vs 0.99 ms).

    >>> _gram(torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]], dtype=torch.float64), True).tolist()
    [[[35.0, 44.0], [44.0, 56.0]]]
    """
    size, inner = min(a.shape[-2], a.shape[-1]), max(a.shape[-2], a.shape[-1])
    # small products only: numpy's OpenBLAS threads large ones (measured here: from between 2.6M and 41M multiply-adds
    # a matrix), which one_thread, governing torch's threads, would not stop
    if a.device.type != "cpu" or a.dtype != torch.float64 or size * size * inner > 1 << 18:
        return a.mT @ a if tall else a @ a.mT
    x = a.detach().numpy()
    xt = x.swapaxes(-1, -2)
    return torch.from_numpy(xt @ x if tall else x @ xt)


def _low_rank_parts(a: Tensor, rank: int, *, left: bool = True) -> tuple[Tensor, Tensor, float, float]:
    """:func:`_low_rank`'s factors with the discarded and the total squared singular values (sums over the batch),
    so that a batch taken in chunks adds up to the same error. ``left=False`` (tall ``a`` only) gives, in place of
    the left factor, the ``(..., n, r)`` vectors it is the product of ``a`` with (``v_j / sqrt(s_j)``, signed).

    Rank 1 on large batches of small Grams takes the top eigenpair from :func:`top_eigenpairs` (certified to a
    backward error of ``1e-13 * trace``, ``eigh`` for the rest) and the energies from the trace."""
    m, n = a.shape[-2], a.shape[-1]
    tall = m >= n
    gram = _gram(a, tall)
    size = gram.shape[-1]
    if rank == 1 and size <= _TOP_EIGEN_MAX_N and math.prod(gram.shape[:-2]) >= _TOP_EIGEN_MIN_BATCH:
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
        top, vec = top_eigenpairs(gram)
        lam, vecs = top.clamp_min(0).unsqueeze(-1), vec.unsqueeze(-1)
        total = float(trace.sum())
        discarded = float((trace - top).clamp_min(0).sum())
    else:
        lam, vecs = torch.linalg.eigh(gram)
        # descending: s_j^2 and the top-rank v_j (or u_j)
        lam, vecs = lam.flip(-1).clamp_min(0), vecs[..., vecs.shape[-1] - rank:].flip(-1)
        total = float(lam.sum())
        discarded = float(lam[..., rank:].sum())
    # sqrt(s_j), floored at sqrt(eps * s_max) so that (near-)null directions cannot overflow a factor; any positive
    # scale is exact, since the j-th column of left times the j-th row of right is a v_j v_j^T (or u_j u_j^T a)
    root = torch.maximum(lam[..., :rank], lam[..., :1] * torch.finfo(torch.float64).eps ** 2).sqrt().sqrt()
    inv = torch.where(root > 0, 1.0 / root, 0.0)
    # deterministic signs: the largest-magnitude entry of each v_j is positive
    rows = vecs.mT if tall else vecs.mT @ a  # (..., r, n): v_j^T, or u_j^T a = s_j v_j^T
    sign = torch.gather(rows, -1, rows.abs().argmax(dim=-1, keepdim=True)).squeeze(-1).sign()
    sign = torch.where(sign == 0, 1.0, sign)  # (..., r)
    if tall:  # left = a v_j / sqrt(s_j) = sqrt(s_j) u_j, right = sqrt(s_j) v_j^T
        w = vecs * (inv * sign).unsqueeze(-2)
        if not left:
            return w, rows * (root * sign).unsqueeze(-1), discarded, total
        # small ranks: (w^T a^T)^T, the same product, is faster on MKL (a (227, 256, 9) batch, rank 1: 0.12 vs
        # 0.59 ms; rank 9: 1.1 vs 1.6 ms); not at rank ~600 (34 vs 29 ms)
        return ((w.mT @ a.mT).mT if rank <= 16 else a @ w), rows * (root * sign).unsqueeze(-1), discarded, total
    if not left:
        raise ValueError("left=False needs tall matrices (rows >= columns)")
    return vecs * (root * sign).unsqueeze(-2), rows * (inv * sign).unsqueeze(-1), discarded, total


def singular_values(weight: Tensor, *, source_groups: int = 1, groups: int) -> Tensor:
    """Singular values per input group, float64 of shape ``(g, min(O/G, (I/g)*K))``, descending.

    >>> sv = singular_values(torch.eye(4).reshape(4, 4, 1, 1), groups=2)
    >>> sv.tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    with one_thread():
        return torch.linalg.svdvals(group_matrices(weight, source_groups, groups))


def predicted_rel_error(sv: Tensor, rank: int) -> float:
    """Relative Frobenius error of keeping the top ``rank`` singular values of every group.

    ``sv`` is the output of :func:`singular_values`; returns 0.0 when all singular values are zero.

    >>> predicted_rel_error(torch.tensor([[3.0, 4.0]], dtype=torch.float64), 1)
    0.8
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    energy = sv.to(torch.float64).square()
    total = float(energy.sum())
    if total == 0.0:
        return 0.0
    discarded = float(energy[..., rank:].sum())
    return math.sqrt(max(discarded, 0.0) / total)


def grouped_separable(weight: Tensor, *, source_groups: int = 1, groups: int, rank: int) -> SeparableFactors:
    """Best rank-``rank`` factorisation of a conv as ``conv1x1(groups=G) o conv(groups=groups)``.

    Each input group ``i`` gets a truncated SVD of ``A_i`` (see :func:`singular_values`; computed as in
    :func:`_low_rank`); the spatial conv holds ``sqrt(s_j) v_j`` and the pointwise conv ``sqrt(s_j) u_j``.
    ``rel_error`` is the discarded singular-value energy. Signs are fixed so that the largest-magnitude entry of
    each ``v_j`` is positive.

    >>> import torch.nn.functional as F
    >>> w, x = torch.randn(8, 4, 3, 3), torch.randn(1, 4, 6, 6)
    >>> f = grouped_separable(w, groups=2, rank=8)
    >>> f.spatial.shape, f.pointwise.shape, f.exact
    (torch.Size([16, 2, 3, 3]), torch.Size([8, 16, 1, 1]), True)
    >>> y = F.conv2d(F.conv2d(x, f.spatial, groups=2), f.pointwise)
    >>> torch.allclose(y, F.conv2d(x, w), atol=1e-4)
    True
    """
    max_rank = exact_rank(tuple(weight.shape), source_groups=source_groups, groups=groups)
    g, ob = groups, weight.shape[0] // source_groups
    if not 1 <= rank <= max_rank:
        raise ValueError(
            f"rank={rank} must be between 1 and the exact rank {max_rank} = min(O/G={ob}, "
            f"(I/g)*K={weight.shape[1] * source_groups // groups * weight.shape[2] * weight.shape[3]}) for weight "
            f"shape {tuple(weight.shape)}, groups={groups}, source_groups={source_groups}"
        )
    big_g = source_groups
    kh, kw = weight.shape[2], weight.shape[3]
    c = weight.shape[1] * big_g // g
    from_weight = _pointwise_from_weight(weight, source_groups, rank, ob, c * kh * kw)
    lefts, rights, discarded, total = [], [], 0.0, 0.0
    with one_thread():
        for a in group_matrix_chunks(weight, source_groups, groups):
            # (n, O/G, r) or, from_weight, (n, c*K, r); (n, r, c*K)
            left, right, d, t = _low_rank_parts(a, rank, left=not from_weight)
            lefts.append(left)
            rights.append(right)
            discarded, total = discarded + d, total + t
        left, right = (lefts[0], rights[0]) if len(lefts) == 1 else (torch.cat(lefts), torch.cat(rights))
        if from_weight:
            pointwise = _rank_one_pointwise(weight, left)
        else:
            # left: (g, O/G, r) -> (G, g/G, O/G, r) -> (G, O/G, g/G, r) -> (O, (g/G)*r)
            pw = left.reshape(big_g, g // big_g, ob, rank).permute(0, 2, 1, 3)
            pointwise = pw.reshape(big_g * ob, (g // big_g) * rank, 1, 1)
    rel = _relative_error(discarded, total, rank >= max_rank)
    spatial = right.reshape(g * rank, c, kh, kw)

    return SeparableFactors(
        spatial=_contiguous_as(spatial, weight.dtype),
        pointwise=_contiguous_as(pointwise, weight.dtype),
        rank=rank,
        groups=groups,
        rel_error=rel,
        exact=rank >= max_rank,
    )


# the most terms (c*K: one input group's weights) in a pointwise entry formed in float32 by _rank_one_pointwise
_FLOAT32_POINTWISE_MAX_TERMS = 64


def _pointwise_from_weight(weight: Tensor, source_groups: int, rank: int, rows: int, cols: int) -> bool:
    """Whether :func:`grouped_separable` forms the pointwise weight from the weight itself
    (:func:`_rank_one_pointwise`): rank 1 of a dense float32 conv whose matrices are tall (``rows >= cols``), with
    at most ``_FLOAT32_POINTWISE_MAX_TERMS`` terms an entry."""
    return (rank == 1 and source_groups == 1 and weight.dtype == torch.float32 and rows >= cols
            and cols <= _FLOAT32_POINTWISE_MAX_TERMS)


def _rank_one_pointwise(weight: Tensor, v: Tensor) -> Tensor:
    """The ``(O, g, 1, 1)`` pointwise weight of a rank-1 factorisation of a dense float32 conv with ``g`` input
    groups: entry ``(o, i)`` is row ``o`` of group ``i``'s matrix times ``v[i]`` (``(g, c*K, 1)``, float64: the
    top right singular vector over the square root of its singular value, signed).

    Formed in float32 from the weight as it lies, instead of in float64 from the widened copy and then transposed
    into this layout: at most 64 terms an entry, so its rounding is at most ``(terms + 1)`` float32 epsilons of the
    sum of the terms' magnitudes (the float64 result stored in float32: half an epsilon of the entry); on the kxk
    convs of resnet152, mobilenet_v2 and regnet_y_400mf the two differ by at most 2e-7 of a row's norm. resnet152's
    51 3x3 convs at rank 1: 0.87-0.94x of the factorisation's time; rewrite() 0.96x (paired rounds). A product
    with a ones vector sums the terms (a reduction over a short last axis costs ~2x).

    >>> w = torch.arange(8.0).reshape(2, 2, 2, 1)  # O=2, g=2 groups of c*K=2
    >>> _rank_one_pointwise(w, torch.ones(2, 2, 1, dtype=torch.float64)).flatten().tolist()
    [1.0, 5.0, 9.0, 13.0]
    """
    out_ch, (g, terms, _) = weight.shape[0], v.shape
    products = weight.detach().reshape(out_ch, g, terms) * v.squeeze(-1).to(weight.dtype)
    ones = torch.ones(terms, dtype=weight.dtype, device=weight.device)
    return (products.reshape(out_ch * g, terms) @ ones).reshape(out_ch, g, 1, 1)


def _contiguous_as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, contiguous, and not sharing memory with ``t`` unless it is ``t`` (a conv adopts it as its
    parameter without another copy). The dtype is converted in ``t``'s own layout first and the layout reordered
    after: two plain copies, 2-4x faster on CPU than one copy that converts while it transposes (a 512 x 512
    pointwise weight's float64 -> float32 transpose: 180 vs 786 us)."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(dtype).contiguous()


def depthwise_separable(weight: Tensor, *, source_groups: int = 1, rank: int) -> SeparableFactors:
    """Depthwise-separable factorisation (multiplier ``rank``): :func:`grouped_separable` with ``g = I``.

    >>> f = depthwise_separable(torch.randn(8, 4, 3, 3), rank=2)
    >>> f.spatial.shape, f.pointwise.shape
    (torch.Size([8, 1, 3, 3]), torch.Size([8, 8, 1, 1]))
    """
    in_ch = weight.shape[1] * source_groups if weight.dim() == 4 else 0
    return grouped_separable(weight, source_groups=source_groups, groups=in_ch, rank=rank)


def block_diagonal(weight: Tensor, *, source_groups: int = 1, groups: int) -> BlockDiagonal:
    """Keep only the block-diagonal part of the dense weight, as the weight of ``Conv2d(groups=groups)``.

    >>> b = block_diagonal(torch.ones(4, 4, 1, 1), groups=2)
    >>> b.weight.shape, b.kept_energy, b.exact
    (torch.Size([4, 2, 1, 1]), 0.5, False)
    """
    out_ch, in_ch, _ = _check_weight(tuple(weight.shape), source_groups)
    _check_groups(in_ch, source_groups, groups)
    if out_ch % groups != 0:
        raise ValueError(f"groups={groups} does not divide the number of output channels O={out_ch}")
    g = groups
    ob, c = out_ch // g, in_ch // g
    kh, kw = weight.shape[2], weight.shape[3]
    dense = dense_weight(weight.detach().to(torch.float64), source_groups)
    # (O/g, c, kh, kw, g) -> (g, O/g, c, kh, kw)
    kept = torch.diagonal(dense.view(g, ob, g, c, kh, kw), dim1=0, dim2=2).movedim(-1, 0)
    kept = kept.reshape(out_ch, c, kh, kw)
    mask = (torch.arange(out_ch, device=dense.device) // ob)[:, None] == (
        torch.arange(in_ch, device=dense.device) // c
    )[None, :]
    dropped = dense.masked_fill(mask[:, :, None, None], 0.0)
    kept_sq = float(kept.square().sum())
    dropped_sq = float(dropped.square().sum())
    total = kept_sq + dropped_sq
    return BlockDiagonal(
        weight=kept.to(dtype=weight.dtype).contiguous(),
        groups=g,
        kept_energy=1.0 if total == 0.0 else kept_sq / total,
        rel_error=0.0 if total == 0.0 else math.sqrt(dropped_sq / total),
        exact=not bool(dropped.any()),
    )


def channel_shuffle_permutation(channels: int, groups: int) -> Tensor:
    """Permutation ``perm`` with ``shuffle(x)[:, k] == x[:, perm[k]]`` for the usual channel shuffle.

    ``shuffle(x) = x.view(N, groups, C // groups, H, W).transpose(1, 2).reshape(N, C, H, W)``.

    >>> channel_shuffle_permutation(6, 2)
    tensor([0, 3, 1, 4, 2, 5])
    """
    if groups < 1 or channels < 0 or channels % groups != 0:
        raise ValueError(f"groups={groups} does not divide channels={channels}")
    return torch.arange(channels, dtype=torch.long).view(groups, channels // groups).t().reshape(-1)
