"""Channel groupings for the grouped rewrite: which channels share a group so the block diagonal keeps most energy.

Pure tensor maths: no ``nn.Module`` and no ``torch.fx``. A *grouping* (an assignment) of ``C`` channels into ``g``
groups gives each channel a group in ``0..g-1``, ``C/g`` channels per group. It stands for the permutation that
lists the channels group by group (ascending within a group), ``assignment_permutation``: position ``p`` of the
permuted tensor holds channel ``perm[p]``, whose group is ``p // (C/g)``. For a conv weight W (O x I x kh x kw)
with energy matrix ``E[o, i] = ||W[o, i]||^2``, a grouping of the outputs and one of the inputs keep the energy
``sum E[o, i] over a_out(o) == a_in(i)``: the block diagonal of ``W[perm_out][:, perm_in]``.

Channel spaces can be shared: one tensor is the output of one conv and the input of the next, or several convs read
it. ``search`` chooses the groupings of several spaces at once for several weights (*terms*), each term reading one
space and writing another. It maximises the sum of the terms' kept energy fractions by alternating balanced
assignments: for one free space at a time, with every other grouping fixed, each channel's gain for each group is
linear (``E^T onehot(a_out)`` for a space a term reads, ``E onehot(a_in)`` for one it writes), and
``balanced_assignment`` maximises the total gain from the better of the current grouping and a greedy one, by exact
two-group re-splits (for a pair of groups, sorting their channels by the gain difference puts the best ``C/g`` in
the first) until no pair improves. A space's new grouping is accepted only when the summed kept fraction of the
terms touching it grows by ``MIN_GAIN`` and no term falls below its kept energy in the natural order (channel ``c``
in group ``c // (C/g)``): every term keeps at least its natural energy. A space is revisited when a space sharing a
term with it changed. The search runs twice, from the natural grouping and from a balanced clustering of the
channels' energy profiles (which recovers a weight that is block-diagonal under a hidden permutation), and keeps the
better result. Energies and gains are float64 (the clustering, which only seeds the search, is float32); the result
is deterministic (stable sorts, lowest index wins ties).

>>> w = torch.zeros(4, 4, 1, 1)
>>> w[0::2, 1::2] = 1.0; w[1::2, 0::2] = 1.0
>>> g = best_grouping(w, groups=2)
>>> g.kept, g.kept_natural, g.perm_out.tolist(), g.perm_in.tolist()
(1.0, 0.5, [1, 3, 0, 2], [0, 2, 1, 3])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fxrewrite.maths.factorize import dense_weight, one_thread

__all__ = [
    "Grouping",
    "Search",
    "Space",
    "Term",
    "assignment_permutation",
    "balanced_assignment",
    "best_grouping",
    "energy_matrix",
    "kept_fraction",
    "natural_assignment",
    "search",
]

MAX_SWEEPS = 30  # alternating sweeps over the free spaces (each accepted step raises the total by MIN_GAIN)
MAX_SPLIT_SWEEPS = 50  # sweeps over group pairs in one balanced assignment
SPLIT_TOL = 1e-7  # ... which stop when a sweep gains less than this fraction of the total |gain|
CLUSTER_ITERS = 8  # balanced k-means iterations of the clustering start
TOL = 1e-12  # rounding slack when comparing kept fractions
MIN_GAIN = 1e-4  # a grouping step must raise the summed kept fraction of its terms by this much


@dataclass(frozen=True)
class Space:
    """A channel space: ``channels`` split in ``groups``; ``free`` when its order may be chosen."""

    channels: int
    groups: int
    free: bool = True


@dataclass(frozen=True)
class Term:
    """A weight's energy matrix ``energy`` (O x I) writing space ``out_space`` and reading space ``in_space``."""

    energy: Tensor
    out_space: int
    in_space: int


@dataclass(frozen=True)
class Search:
    """Chosen groupings (one per space), each term's kept energy fraction with them and in the natural order."""

    assignments: tuple[Tensor, ...]
    kept: tuple[float, ...]
    kept_natural: tuple[float, ...]


@dataclass(frozen=True)
class Grouping:
    """One weight's best grouping: the permutations of its outputs and inputs and the kept energy fractions."""

    perm_out: Tensor
    perm_in: Tensor
    kept: float
    kept_natural: float


def energy_matrix(weight: Tensor, source_groups: int = 1) -> Tensor:
    """``E[o, i] = ||W[o, i]||^2`` of the dense form of a conv weight, float64 on the weight's device.

    >>> energy_matrix(torch.ones(2, 1, 3, 3), source_groups=2).tolist()
    [[9.0, 0.0], [0.0, 9.0]]
    """
    return dense_weight(weight.detach().to(torch.float64), source_groups).square().sum(dim=(2, 3))


def natural_assignment(channels: int, groups: int, device: torch.device | str | None = None) -> Tensor:
    """The grouping of the natural order: channel ``c`` in group ``c // (channels / groups)``.

    >>> natural_assignment(6, 3).tolist()
    [0, 0, 1, 1, 2, 2]
    """
    if groups < 1 or channels % groups:
        raise ValueError(f"groups={groups} does not divide channels={channels}")
    return torch.arange(channels, device=device) // (channels // groups)


def assignment_permutation(assignment: Tensor) -> Tensor:
    """The permutation listing channels group by group, ascending within a group (a stable sort by group).

    >>> assignment_permutation(torch.tensor([1, 0, 1, 0])).tolist()
    [1, 3, 0, 2]
    """
    return torch.sort(assignment, stable=True).indices


def kept_fraction(energy: Tensor, out_assignment: Tensor, in_assignment: Tensor) -> float:
    """The fraction of ``energy`` (O x I) on pairs in the same group (1.0 for a zero matrix).

    >>> kept_fraction(torch.ones(2, 2, dtype=torch.float64), torch.tensor([0, 1]), torch.tensor([1, 0]))
    0.5
    """
    total = float(energy.sum())
    if total == 0.0:
        return 1.0
    groups = int(max(int(out_assignment.max()), int(in_assignment.max()))) + 1
    same = _onehot(out_assignment, groups) * (energy @ _onehot(in_assignment, groups))
    return float(same.sum()) / total


def balanced_assignment(gain: Tensor, start: Tensor) -> Tensor:
    """A balanced assignment of channels to groups with a large total ``gain[c, a(c)]``, improving on ``start``.

    ``gain`` is C x g; ``start`` a balanced assignment (each group C/g channels). It starts from the better of
    ``start`` and a greedy assignment by regret; each step then re-splits the channels of two groups optimally
    (sorted by their gain difference) until no pair improves. Exact for g = 2.

    >>> balanced_assignment(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]),
    ...                     torch.tensor([0, 0, 1, 1])).tolist()
    [1, 0, 1, 0]
    """
    groups = gain.shape[1]
    size = gain.shape[0] // groups
    greedy = _greedy(gain)
    if float(gain.gather(1, greedy[:, None]).sum()) > float(gain.gather(1, start[:, None]).sum()):
        start = greedy
    members = [torch.nonzero(start == b).squeeze(1) for b in range(groups)]
    scale = float(gain.abs().sum())
    for _ in range(MAX_SPLIT_SWEEPS):
        improved = 0.0
        for b1 in range(groups):
            for b2 in range(b1 + 1, groups):
                pair = torch.cat((members[b1], members[b2]))
                diff = gain[pair, b1] - gain[pair, b2]  # what moving a channel from b2 to b1 gains
                order = torch.sort(diff, descending=True, stable=True).indices
                best, current = float(diff[order[:size]].sum()), float(diff[:size].sum())
                if best > current + TOL * scale:
                    members[b1], members[b2] = pair[order[:size]], pair[order[size:]]
                    improved += best - current
        if improved <= SPLIT_TOL * scale:
            break
    a = torch.empty_like(start)
    for b, idx in enumerate(members):
        a[idx] = b
    return a


def _greedy(gain: Tensor) -> Tensor:
    """A balanced assignment by regret: channels that lose most by missing their best group choose first."""
    channels, groups = gain.shape
    top = torch.topk(gain, min(2, groups), dim=1).values
    regret = top[:, 0] - top[:, -1]
    order = torch.sort(regret, descending=True, stable=True).indices.tolist()
    preferences = torch.sort(gain, dim=1, descending=True, stable=True).indices.tolist()
    room = [channels // groups] * groups
    out = [0] * channels
    for c in order:
        b = next(b for b in preferences[c] if room[b])
        room[b] -= 1
        out[c] = b
    return torch.tensor(out, device=gain.device)


def _onehot(assignment: Tensor, groups: int) -> Tensor:
    return torch.nn.functional.one_hot(assignment, groups).to(torch.float64)


def _kept_all(terms: Sequence[Term], assignments: Sequence[Tensor]) -> list[float]:
    return [kept_fraction(t.energy, assignments[t.out_space], assignments[t.in_space]) for t in terms]


class _Descent:
    """One alternating descent from ``start``: balanced assignments of one free space at a time, revisiting a space
    only when a space sharing a term with it changed. A step is accepted when the summed kept fraction of the terms
    touching the space grows by ``MIN_GAIN`` and no term drops below ``min(its current value, floor)``; a step that
    lowers a term too far is retried with that term's weight doubled (a few times)."""

    def __init__(self, spaces: Sequence[Space], terms: Sequence[Term], start: Sequence[Tensor],
                 floor: Sequence[float]) -> None:
        self.spaces, self.terms, self.floor = spaces, terms, floor
        self.assignments = list(start)
        self.kept = _kept_all(terms, self.assignments)
        self.totals = [float(t.energy.sum()) for t in terms]
        self.touching = [[j for j, t in enumerate(terms) if k in (t.in_space, t.out_space)]
                         for k in range(len(spaces))]
        self.versions = [0] * len(spaces)
        self.cache: dict[tuple[int, int], tuple[int, Tensor]] = {}

    def side_gain(self, j: int, k: int) -> Tensor | None:
        """Term ``j``'s energy per channel of space ``k`` and group, its other side's grouping fixed (None for a
        term reading and writing ``k``: its kept energy is not linear in ``k``'s grouping)."""
        t = self.terms[j]
        if t.in_space == t.out_space:
            return None
        other = t.out_space if t.in_space == k else t.in_space
        cached = self.cache.get((j, k))
        if cached is not None and cached[0] == self.versions[other]:
            return cached[1]
        onehot = _onehot(self.assignments[other], self.spaces[k].groups)
        gain = t.energy.t() @ onehot if t.in_space == k else t.energy @ onehot
        self.cache[(j, k)] = (self.versions[other], gain)
        return gain

    def step(self, k: int) -> bool:
        space, js = self.spaces[k], self.touching[k]
        sides = [self.side_gain(j, k) for j in js]
        weights = [1.0 / self.totals[j] if self.totals[j] > 0.0 else 0.0 for j in js]
        current = self.assignments[k]
        for _retry in range(4):
            gain = torch.zeros(space.channels, space.groups, dtype=torch.float64, device=current.device)
            for j, side, w in zip(js, sides, weights, strict=True):
                if side is None:  # reads and writes k: the gain with the current grouping on the other side
                    onehot = _onehot(current, space.groups)
                    side = self.terms[j].energy.t() @ onehot + self.terms[j].energy @ onehot
                gain += w * side
            cand = balanced_assignment(gain, current)
            if torch.equal(cand, current):
                return False
            new = [1.0 if self.totals[j] == 0.0
                   else kept_fraction(self.terms[j].energy, cand, cand) if side is None
                   else float(side.gather(1, cand[:, None]).sum()) / self.totals[j]
                   for j, side in zip(js, sides, strict=True)]
            low = [i for i, j in enumerate(js) if new[i] < min(self.kept[j], self.floor[j]) - TOL]
            if not low:
                if math.fsum(new) <= math.fsum(self.kept[j] for j in js) + MIN_GAIN:
                    return False
                self.assignments[k] = cand
                self.versions[k] += 1
                for i, j in enumerate(js):
                    self.kept[j] = new[i]
                return True
            for i in low:
                weights[i] *= 2.0
        return False

    def run(self) -> tuple[list[Tensor], list[float]]:
        neighbours = [{s for j in self.touching[k] for s in (self.terms[j].in_space, self.terms[j].out_space)}
                      - {k} for k in range(len(self.spaces))]
        dirty = {k for k, space in enumerate(self.spaces) if space.free and self.touching[k]}
        for _ in range(MAX_SWEEPS):
            if not dirty:
                break
            for k in sorted(dirty):
                dirty.discard(k)
                if self.step(k):
                    dirty |= {n for n in neighbours[k] if self.spaces[n].free}
        return self.assignments, self.kept


def _cluster_start(k: int, space: Space, terms: Sequence[Term]) -> Tensor:
    """A balanced clustering of space ``k``'s channels by their (normalised) energy profiles in every term touching
    it: farthest-point seeds, then balanced k-means on cosine similarity."""
    parts = []
    for t in terms:
        total = float(t.energy.sum())
        if total == 0.0:
            continue
        if t.in_space == k:
            parts.append(t.energy.t() / total)
        if t.out_space == k:
            parts.append(t.energy / total)
    if not parts:
        return natural_assignment(space.channels, space.groups)
    natural = natural_assignment(space.channels, space.groups, device=parts[0].device)
    profile = torch.cat(parts, dim=1).to(torch.float32)  # only guides the start: single precision halves the cost
    norms = profile.norm(dim=1, keepdim=True)
    unit = profile / norms.clamp_min(1e-30)
    seeds = [int(torch.argmax(norms.squeeze(1)))]
    closest = unit @ unit[seeds[0]]
    for _ in range(1, space.groups):
        seeds.append(int(torch.argmin(closest)))
        closest = torch.maximum(closest, unit @ unit[seeds[-1]])
    centroids = unit[seeds]
    assignment = balanced_assignment(unit @ centroids.t(), natural)
    for _ in range(CLUSTER_ITERS):
        centroids = _onehot(assignment, space.groups).to(unit.dtype).t() @ unit
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-30)
        new = balanced_assignment(unit @ centroids.t(), assignment)
        if torch.equal(new, assignment):
            break
        assignment = new
    return assignment


@one_thread()
def search(spaces: Sequence[Space], terms: Sequence[Term]) -> Search:
    """Groupings of ``spaces`` that keep the most summed energy fraction of ``terms``; fixed spaces keep the natural
    grouping and every term keeps at least its natural energy (see the module docstring)."""
    for j, t in enumerate(terms):
        o, i = t.energy.shape
        if spaces[t.out_space].channels != o or spaces[t.in_space].channels != i:
            raise ValueError(f"term {j}: energy {tuple(t.energy.shape)} does not match spaces {t.out_space} "
                             f"({spaces[t.out_space].channels} channels) and {t.in_space} "
                             f"({spaces[t.in_space].channels} channels)")
    device = terms[0].energy.device if terms else None
    natural = [natural_assignment(s.channels, s.groups, device=device) for s in spaces]
    kept_natural = _kept_all(terms, natural)
    best, kept = _Descent(spaces, terms, natural, kept_natural).run()
    clustered = [_cluster_start(k, s, terms) if s.free else natural[k] for k, s in enumerate(spaces)]
    other, other_kept = _Descent(spaces, terms, clustered, kept_natural).run()
    if (all(v >= n - TOL for v, n in zip(other_kept, kept_natural, strict=True))
            and math.fsum(other_kept) > math.fsum(kept) + TOL):
        best, kept = other, other_kept
    return Search(tuple(best), tuple(kept), tuple(kept_natural))


@one_thread()
def best_grouping(weight: Tensor, *, groups: int, source_groups: int = 1, permute_out: bool = True,
                  permute_in: bool = True) -> Grouping:
    """The output and input permutations of one conv weight that keep the most energy in ``groups`` diagonal
    blocks (a side with ``permute_*=False`` keeps the natural order)."""
    energy = energy_matrix(weight, source_groups)
    o, i = energy.shape
    found = search([Space(o, groups, permute_out), Space(i, groups, permute_in)], [Term(energy, 0, 1)])
    return Grouping(assignment_permutation(found.assignments[0]), assignment_permutation(found.assignments[1]),
                    found.kept[0], found.kept_natural[0])
