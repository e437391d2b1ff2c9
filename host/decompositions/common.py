"""What every decomposition family returns, and the ladder machinery they share.

A :class:`Decomposition` is one weight factorized at its largest useful ranks, stored so that a device
can truncate it without knowing the math: every factor is a rank-major array whose row prefix
``row_ends[name][j]`` is what ladder level ``j`` keeps. Single-bond factors store one rank component per
row; two-bond cores (Tucker core, TT/TR cores) store one *cell* ``core[p, q]`` per row in nested-shell
order (see :func:`stn_edge.lowering.shell_order`), so that the prefix for bonds ``(a_j, b_j)`` is
exactly ``core[:a_j, :b_j]``.

Multi-bond families build their ladders the same way (:func:`bond_ladder`): the best bond tuple
below the dense size on top, then, for byte targets spaced evenly below it, the best tuple under each
target that nests inside the level above with every factor strictly smaller, as the format requires.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from stn_edge.lowering import shell_order, assemble, reconstruct

class Trial(NamedTuple):
    """One way the structure search tries a family on a layer: ``name`` in the search report
    (``"tt/d2"``), the ``decompose`` function of the weight, or None with why it was ``skipped``."""

    name: str
    decompose: Callable[[np.ndarray], "Decomposition"] | None
    skipped: str = ""


@dataclass(frozen=True)
class SearchFamily:
    """What the structure search needs from a family (each host family module defines ``SEARCH``).

    ``order`` sorts the report and breaks exact ties (lower first); ``trials(kind, shape, layout,
    levels, limits)`` gives the :class:`Trial` s that apply to a layer (none when the family cannot
    factorize it), ``limits`` being a :class:`stn_edge.host.structure.SearchLimits`.
    ``input_rank_kinds`` are the layer kinds whose lowering depends on the rank of the layer's input
    (tt: a Linear fed ``(N, T, in)`` keeps its lead axes); bake records it as ``structure["input_rank"]``.
    ``torch_weight(layer, factors)`` is the torch form the family trains as: the dense weight, in the
    node's layout, rebuilt with differentiable torch ops from factors in their canonical form (as
    :func:`stn_edge.lowering.reconstruct` reads them; :mod:`stn_edge.host.ladder_training`); None when
    the family cannot be trained factorized.
    """

    name: str
    order: int
    trials: Callable[[str, tuple[int, ...], str, int, Any], list[Trial]]
    torch_weight: Callable[[dict[str, Any], dict[str, Any]], Any] | None = None
    input_rank_kinds: frozenset[str] = frozenset()


#: relative energy below which a tail counts as exactly zero (the weight is exactly low-rank there)
EXACT_TAIL = 1e-13


@dataclass
class Decomposition:
    """One weight, factorized at its largest ranks, with a ladder of nested truncation levels.

    Attributes
    ----------
    family, kind : the lowering family (``"svd"``, ``"tucker2"``, ...) and ``"conv"`` or ``"linear"``.
    layout : the node's weight layout (``"conv"``, ``"out_in"`` or ``"in_out"``).
    shape : the dense weight's shape in that layout.
    structure : msgpack-plain description the lowerer needs (modes, which factors are nested shells).
    factors : name -> storage array, rank-major: axis 0 is what a level truncates.
    row_ends : name -> rows kept at each level, strictly increasing, last == ``factors[name].shape[0]``.
    ranks : the label of each level ("rank kept"; the largest driving bond for multi-bond families).
    bonds : the bond ranks of each level.
    max_rank : the largest rank of the untruncated decomposition.
    errors : relative Frobenius error ``||W - W_j|| / ||W||`` of each level.
    seconds : time the decomposition took.
    notes : anything a reader of the search report should know (caps applied, ...).
    """

    family: str
    kind: str
    layout: str
    shape: tuple[int, ...]
    structure: dict[str, Any]
    factors: dict[str, np.ndarray]
    row_ends: dict[str, list[int]]
    ranks: list[int]
    bonds: list[list[int]]
    max_rank: int
    errors: list[float]
    seconds: float = 0.0
    notes: str = ""
    _cache: dict[int, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def levels(self) -> int:
        return len(self.ranks)

    @property
    def dense_bytes(self) -> int:
        itemsize = next(iter(self.factors.values())).dtype.itemsize
        return int(math.prod(self.shape)) * itemsize

    @property
    def level_bytes(self) -> list[int]:
        """Bytes of every factor's row prefix at each level."""
        out = []
        for j in range(self.levels):
            out.append(int(sum(self.row_ends[k][j] * (v.nbytes // max(v.shape[0], 1)) for k, v in self.factors.items())))
        return out

    @property
    def spectral_loss(self) -> list[float]:
        """Relative squared weight error per level (the ``"spectral"`` importance)."""
        return [float(e) ** 2 for e in self.errors]

    def layer(self, name: str = "layer", node: str = "node", weight: str | None = None) -> dict[str, Any]:
        """The msgpack-plain layer fields that lowering and assembly read (no factor data)."""
        return {
            "name": name, "node": node, "weight": weight or name, "kind": self.kind, "family": self.family,
            "layout": self.layout, "structure": self.structure, "max_rank": int(self.max_rank),
            "dense": {"shape": list(self.shape)},
            "ladder": {"ranks": list(self.ranks), "bytes": self.level_bytes, "bonds": [list(b) for b in self.bonds]},
        }

    def rows(self, j: int) -> dict[str, np.ndarray]:
        """The row prefixes a device holds at level ``j``."""
        return {k: v[: self.row_ends[k][j]] for k, v in self.factors.items()}

    def factors_at(self, j: int) -> dict[str, np.ndarray]:
        """The factors the lowerer consumes at level ``j``, as a device holds them (:func:`assemble`:
        nested-shell cores as boxes, factors an op reads with other axes adjacent transposed)."""
        if j not in self._cache:
            self._cache.clear()
            self._cache[j] = assemble(self.layer(), j, self.rows(j))
        return self._cache[j]

    def truncated(self, j: int) -> np.ndarray:
        """The dense weight at level ``j``, in the original shape and layout."""
        return reconstruct(self.layer(), self.factors_at(j))

    def prefix(self, n: int) -> "Decomposition":
        """The same decomposition with only its ``n`` lowest levels (a valid ladder of its own: every
        factor's rows up to level ``n - 1``; nested-shell rows stay in order for the kept pairs)."""
        if not 1 <= n <= self.levels:
            raise ValueError(f"{self.family}: cannot keep {n} of {self.levels} levels")
        if n == self.levels:
            return self
        d = Decomposition(self.family, self.kind, self.layout, self.shape, self.structure,
                          {k: v[: self.row_ends[k][n - 1]].copy() for k, v in self.factors.items()},
                          {k: e[:n] for k, e in self.row_ends.items()}, self.ranks[:n], self.bonds[:n],
                          self.max_rank, self.errors[:n], self.seconds, self.notes)
        d.check()
        return d

    def check(self) -> None:
        """Raise ``ValueError`` unless the contract holds: nested levels, growing bytes, all below dense."""
        n = self.levels
        if not (len(self.bonds) == len(self.errors) == n) or n == 0:
            raise ValueError(f"{self.family}: ranks, bonds and errors must have one entry per level")
        for k, v in self.factors.items():
            ends = self.row_ends[k]
            if len(ends) != n or ends[-1] != v.shape[0] or any(b <= a for a, b in zip([0] + ends, ends)):
                raise ValueError(f"{self.family}: row_ends[{k!r}] = {ends} must rise strictly to {v.shape[0]}")
        if any(b <= a for a, b in zip(self.ranks, self.ranks[1:])) or self.ranks[0] < 1:
            raise ValueError(f"{self.family}: ranks {self.ranks} must be positive and strictly increasing")
        lb = self.level_bytes
        if lb[-1] >= self.dense_bytes:
            raise ValueError(f"{self.family}: top level holds {lb[-1]} bytes, not below the dense {self.dense_bytes}")


# --------------------------------------------------------------------------- linear algebra


def left_svd(m: np.ndarray, tol: float = EXACT_TAIL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U (m, r)`` orthonormal, ``s (r,)`` descending and ``R = U^T M (r, n)`` for ``M (m, n)``.

    ``r`` is the numerical rank (components whose energy is below ``tol`` of the total are dropped).
    Computed in float64 through the Gram matrix of the smaller side, which is several times faster than
    a full SVD for the wide and tall unfoldings of conv kernels; ``R`` has orthogonal rows of norms ``s``
    and ``U R`` is the best rank-``r`` approximation of ``M``.
    """
    m = np.asarray(m, dtype=np.float64)
    rows, cols = m.shape
    if rows <= cols:
        lam, u = np.linalg.eigh(m @ m.T)
        lam, u = lam[::-1], u[:, ::-1]
        keep = _numerical_rank(lam, tol)
        u = u[:, :keep]
        r = u.T @ m
        return u, np.sqrt(np.maximum(lam[:keep], 0.0)), r
    lam, v = np.linalg.eigh(m.T @ m)
    lam, v = lam[::-1], v[:, ::-1]
    keep = _numerical_rank(lam, tol)
    s = np.sqrt(np.maximum(lam[:keep], 0.0))
    v = v[:, :keep]
    # u R = M V V^T exactly (the best rank-r approximation); u is orthonormal up to eps * s_1^2 / s_k^2
    return (m @ v) / s, s, s[:, None] * v.T


def _numerical_rank(lam: np.ndarray, tol: float) -> int:
    total = float(np.sum(np.maximum(lam, 0.0)))
    if total <= 0.0:
        return 1
    tail = np.cumsum(np.maximum(lam, 0.0)[::-1])[::-1]  # tail[k] = energy of components k..
    return max(1, int(np.sum(tail > tol * total)))


def exact_rank(s: np.ndarray, tol: float = EXACT_TAIL) -> int:
    """Number of singular values ``s`` needed for all but ``tol`` of the energy."""
    return _numerical_rank(np.asarray(s, dtype=np.float64) ** 2, tol)


def balanced_factors(n: int, parts: int) -> list[int]:
    """``n`` as a product of ``parts`` factors as equal as possible, largest last (``512, 3 -> [8, 8, 8]``)."""
    best: list[int] | None = None

    def rec(rest: int, k: int, lo: int, acc: list[int]) -> None:
        nonlocal best
        if k == 1:
            cand = acc + [rest]
            if rest >= lo and (best is None or max(cand) / min(cand) < max(best) / min(best)):
                best = cand
            return
        d = lo
        while d ** k <= rest:
            if rest % d == 0:
                rec(rest // d, k - 1, d, acc + [d])
            d += 1

    rec(n, parts, 1, [])
    assert best is not None
    return best


# --------------------------------------------------------------------------- ladders


def bond_ladder(
    full: Sequence[int],
    value: Callable[..., np.ndarray],
    params: Callable[..., np.ndarray],
    dense_params: int,
    total: float,
    levels: int,
    drivers: Sequence[int],
) -> list[tuple[int, ...]]:
    """The bonds of each ladder level, chosen top-down over the whole box of bond tuples.

    ``value(*bonds)`` (captured energy, higher is better) and ``params(*bonds)`` (numbers stored) take
    broadcast integer arrays, one per bond. The top level is the best tuple with fewer parameters than
    the dense weight (the cheapest one once the weight is captured to :data:`EXACT_TAIL`). Each level
    below is the best tuple under its byte target — targets evenly spaced up to the top — among those
    whose driver bonds are all strictly smaller, and other bonds no larger, than the level above (and
    large enough to leave room for the levels still below). There are ``min(levels, smallest top
    driver bond)`` levels. Every family picks drivers so that each factor holds one: every factor then strictly grows from one
    level to the next, as the format requires.
    """
    shape = tuple(int(f) for f in full)
    axes = np.ix_(*[np.arange(1, f + 1) for f in shape])  # broadcast views, never a full meshgrid
    val = np.broadcast_to(np.asarray(value(*axes), dtype=np.float64), shape)
    cost = np.broadcast_to(np.asarray(params(*axes), dtype=np.float64), shape)

    def at(flat: int) -> tuple[int, ...]:
        return tuple(int(i) + 1 for i in np.unravel_index(flat, shape))

    def best(mask: np.ndarray) -> tuple[int, ...] | None:
        if not mask.any():
            return None
        top = float(np.max(val[mask]))
        near = mask & (val >= top - EXACT_TAIL * total)
        return at(int(np.argmin(np.where(near, cost, np.inf))))

    chosen = best(cost < dense_params)
    if chosen is None:
        return []
    out = [chosen]
    count = min(levels, min(chosen[k] for k in drivers))
    top_cost = float(cost[tuple(b - 1 for b in chosen)])
    targets = np.linspace(top_cost / count, top_cost, count)[:-1][::-1]
    for below, target in zip(range(count - 2, -1, -1), targets):
        cur = out[-1]
        mask = np.ones(shape, dtype=bool)
        for k, g in enumerate(axes):
            # drivers leave room for the levels still to come below this one
            mask &= ((g < cur[k]) & (g > below)) if k in drivers else (g <= cur[k])
        nxt = best(mask & (cost <= target))
        if nxt is None:  # nothing nests under the target: the cheapest tuple that does
            nxt = at(int(np.argmin(np.where(mask, cost, np.inf))))
        out.append(nxt)
    return out[::-1]


def shell_rows(core: np.ndarray, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Storage form of a two-bond core ``(A, B, *rest)``: its cells in nested-shell order for ``pairs``."""
    p, q = shell_order([tuple(x) for x in pairs])
    a, b = pairs[-1]
    return np.ascontiguousarray(core[:a, :b][p, q])


def energy_table(cells: np.ndarray) -> np.ndarray:
    """``F[a-1, b-1] = sum(cells[:a, :b])`` for a 2-D array of non-negative cell energies."""
    return np.cumsum(np.cumsum(cells, axis=0), axis=1)


def build(
    family: str,
    kind: str,
    layout: str,
    shape: tuple[int, ...],
    structure: dict[str, Any],
    rank_major: dict[str, tuple[int, np.ndarray]],
    shells: dict[str, tuple[tuple[int, int], np.ndarray]],
    bonds: list[tuple[int, ...]],
    drivers: Sequence[int],
    errors: Sequence[float],
    max_rank: int,
    dtype: np.dtype,
    seconds: float,
    notes: str = "",
) -> Decomposition:
    """Assemble a :class:`Decomposition` from full factors and the bonds of each level.

    ``rank_major[name] = (bond index, array (R, ...))`` and ``shells[name] = ((bond i, bond k), core
    (A, B, ...))``; arrays are cut to the top level and stored in ``dtype``.
    """
    top = bonds[-1]
    factors: dict[str, np.ndarray] = {}
    row_ends: dict[str, list[int]] = {}
    for name, (i, arr) in rank_major.items():
        factors[name] = np.ascontiguousarray(arr[: top[i]]).astype(dtype)
        row_ends[name] = [int(b[i]) for b in bonds]
    structure = dict(structure)
    structure["shells"] = {}
    for name, ((i, k), core) in shells.items():
        pairs = [(int(b[i]), int(b[k])) for b in bonds]
        factors[name] = shell_rows(core, pairs).astype(dtype)
        row_ends[name] = [a * b for a, b in pairs]
        structure["shells"][name] = [i, k]
    if not structure["shells"]:
        del structure["shells"]
    ranks = [int(max(b[k] for k in drivers)) for b in bonds]
    d = Decomposition(family, kind, layout, tuple(int(s) for s in shape), structure, factors, row_ends, ranks,
                      [[int(x) for x in b] for b in bonds], int(max_rank), [float(e) for e in errors], seconds, notes)
    d.check()
    return d


# --------------------------------------------------------------------------- the svd family


def as_matrix(w: np.ndarray, kind: str, layout: str) -> np.ndarray:
    """The weight as ``(out, in * kernel)``, as :meth:`Candidate.matrix` does (an embedding table
    ``(vocab, dim)`` has layout ``in_out``)."""
    if layout == "in_out":
        return w.T
    return w.reshape(w.shape[0], -1)


def break_even_rank(m: int, n: int) -> int:
    """Largest rank whose two factors ``r*(m+n)`` hold fewer numbers than the dense ``m*n``."""
    return max((m * n - 1) // (m + n), 0)


def ladder_ranks(max_rank: int, levels: int) -> list[int]:
    """At most ``levels`` strictly increasing ranks ending at ``max_rank``, evenly spaced in bytes."""
    if max_rank <= levels:
        return list(range(1, max_rank + 1))
    ranks = np.unique(np.round(np.linspace(max_rank / levels, max_rank, levels)).astype(int))
    return [int(r) for r in ranks if r >= 1]
