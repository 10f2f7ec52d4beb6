"""Singular-value spectra of a conv weight's per-group slices and what they say about truncations: the spectra of
several group counts at once (``group_spectra``), the relative weight error of keeping the top ``r`` singular values
of every group (``tail_errors``), and the Pareto front of candidates with several costs (``pareto_mask``).

>>> import torch
>>> w = torch.eye(4).reshape(4, 4, 1, 1) * 2  # a 1x1 conv, 4 -> 4 channels
>>> spectra = group_spectra(w, source_groups=1, levels=[1, 4])
>>> spectra[1].tolist()  # one group: the squared singular values of the 4 x 4 weight
[[4.0, 4.0, 4.0, 4.0]]
>>> tail_errors(spectra[1], float(w.square().sum())).round(4).tolist()  # keep r = 0 .. 4 of them
[1.0, 0.866, 0.7071, 0.5, 0.0]
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from fxrewrite.maths import factorize

__all__ = ["group_spectra", "pareto_mask", "tail_errors"]


def tail_errors(energies: Tensor, total: float) -> np.ndarray:
    """``errors[r]`` = sqrt(energy discarded when every group keeps its top ``r`` singular values / total), for
    ``energies`` the squared singular values (``(groups, n)`` or ``(n,)``, descending) and ``total`` the weight's
    squared norm; ``r`` runs from 0 to ``n`` (the last entry is 0).

    >>> tail_errors(torch.tensor([3.0, 1.0], dtype=torch.float64), 4.0).tolist()
    [1.0, 0.5, 0.0]
    """
    per_index = energies.sum(dim=0) if energies.dim() > 1 else energies  # groups share the rank index
    tail = torch.flip(torch.cumsum(torch.flip(per_index, [0]), 0), [0])  # tail[r] = sum_{j >= r}
    tail = torch.cat([tail, tail.new_zeros(1)]).clamp_min(0.0)
    if total <= 0.0:
        return np.zeros(tail.numel())
    return np.sqrt(np.minimum(tail.numpy() / total, 1.0))


def group_spectra(weight: Tensor, source_groups: int, levels: Iterable[int]) -> dict[int, Tensor]:
    """Squared singular values of the per-group ``O/G x (I/g)K`` slices for each group count ``g`` in ``levels``
    (float64, ``(g, min(O/G, (I/g)K))``, descending), from each slice's small Gram matrix as ``factorize``
    computes the factors. Gram matrices are shared between levels: a coarser level's ``O x O`` Grams are sums of a
    finer level's, a finer level's ``(I/g)K`` square Grams are diagonal blocks of a coarser level's.

    >>> {g: ev.tolist() for g, ev in group_spectra(torch.eye(4).reshape(4, 4, 1, 1) * 2, 1, [2, 4]).items()}
    {2: [[4.0, 4.0], [4.0, 4.0]], 4: [[4.0], [4.0], [4.0], [4.0]]}
    """
    w = weight.detach().to(torch.float64)
    o, i, k = int(w.shape[0]), int(w.shape[1]) * source_groups, int(w.shape[2] * w.shape[3])
    m = o // source_groups
    levels = sorted(set(levels))
    grams: dict[int, Tensor] = {}
    wide = [g for g in levels if m <= (i // g) * k]
    for g in sorted(wide, reverse=True):  # finest first: O x O Grams of coarser groups are sums of finer ones
        finer = next((f for f in sorted(grams) if f % g == 0), None)
        if finer is not None:
            grams[g] = grams[finer].reshape(g, finer // g, m, m).sum(dim=1)
        else:
            a = factorize.group_matrices(w, source_groups, g)
            grams[g] = a @ a.mT
    tall: dict[int, Tensor] = {}
    for g in sorted(set(levels) - set(wide)):  # coarsest first: finer (I/g)K Grams are diagonal blocks
        coarser = next((c for c in sorted(tall) if g % c == 0), None)
        n = (i // g) * k
        if coarser is not None:
            q = g // coarser
            blocks = torch.diagonal(tall[coarser].reshape(coarser, q, n, q, n), dim1=1, dim2=3)  # (c, n, n, q)
            tall[g] = blocks.permute(0, 3, 1, 2).reshape(g, n, n)
        else:
            a = factorize.group_matrices(w, source_groups, g)
            tall[g] = a.mT @ a
    grams |= tall
    return {g: torch.linalg.eigvalsh(grams[g]).flip(-1).clamp_min(0.0) for g in levels}


def pareto_mask(a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` (each column a quantity to minimise) that no other row dominates; of equal rows, the first.

    >>> pareto_mask(np.array([[1.0, 3.0], [2.0, 2.0], [2.0, 3.0], [1.0, 3.0]])).tolist()
    [True, True, False, False]
    """
    keep = np.zeros(len(a), dtype=bool)
    if not len(a):
        return keep
    _, first = np.unique(a, axis=0, return_index=True)
    first = np.sort(first)
    b = a[first]
    dominated = np.zeros(len(b), dtype=bool)
    step = 1024
    for lo in range(0, len(b), step):  # chunks of the pairwise comparison bound the memory
        c = b[lo:lo + step]
        le = np.ones((len(b), len(c)), dtype=bool)  # le[i, j]: b[i] <= c[j] everywhere, one column at a time
        for col in range(b.shape[1]):
            le &= b[:, col, None] <= c[None, :, col]
        le[lo + np.arange(len(c)), np.arange(len(c))] = False  # rows are distinct: any other row <= dominates
        dominated[lo:lo + step] = le.any(axis=0)
    keep[first[~dominated]] = True
    return keep

