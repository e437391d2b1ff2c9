"""Structure search: which decomposition suits a layer, judged over the whole range of budgets.

Every family that applies to a layer (and each tensorization it offers) is decomposed at its largest
useful ranks; its ladder gives a curve of relative weight error against bytes. A device may be given
any budget, so a family is judged by its whole curve, not one point:

* ``err(B)`` is the error of the family's best level holding at most ``B`` bytes (a step function),
  and 1 where even its smallest level does not fit;
* the score is the mean of ``err(B)`` over ``log B`` from the smallest level any candidate offers up
  to the dense size (the planner's zero-loss option), i.e. the area under error-vs-log(bytes),
  normalized; the lowest score wins.

The error is ``||W - W_j||_F / ||W||_F``, or, given a ``gram`` of the layer's input activations
(``(in*kernel, in*kernel)`` with the im2col ordering ``(in, *kernel)`` for a conv), the output-weighted
``sqrt(tr(D G D^T) / tr(W G W^T))`` with ``D = W - W_j`` (this rebuilds every level, so it is slower).

Costs are capped so that a ResNet-18-sized model is searched in seconds: CP and the ring families
(TR, FCTN) run only on kernels up to :attr:`SearchLimits.cp_max_size` /
:attr:`SearchLimits.ring_max_size` numbers (at most ~0.5 s each), with a fixed number of ALS sweeps
and no wall-clock cap, so the chosen structures do not depend on the machine's load; the report says
when a family was skipped and why.

Memory levels are never cut for speed. Every level a family offers stays in its ladder: speed is a
load-time choice (the device's planner picks dense or a cheaper level when the budget allows and a
latency limit asks for it, :mod:`stn_edge.cost`). Removing levels at bake cost up to 47 points of
accuracy at 10% of the bytes on ResNet-20 (issue "Memory levels are never cut for speed").

Speed breaks ties. Each family's compute is its multiply-adds over the dense layer's, averaged over
the same log-bytes grid (the level a budget would hold; 1 where none fits and the layer runs dense),
with a fixed cost per extra op (:attr:`SearchLimits.op_cost_macs`, 5e5 multiply-adds by default:
onnxruntime's ~10 us per op on an x86 core, spread over the layer's output positions;
:func:`stn_edge.cost.extra_ops`). Among the families whose score is within
:attr:`SearchLimits.speed_tie` (relative) of the best, the one with the least compute wins. The report
gives ``macs_ratio`` (the top level's compute over the dense layer's) and ``compute`` (the mean).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from stn_edge.cost import extra_ops
from stn_edge.host import decompositions
from stn_edge.host.decompositions.common import Decomposition, as_matrix
from stn_edge.host.decompositions.macs import dense_macs, level_macs
from stn_edge.host.layers import Candidate

@dataclass(frozen=True)
class SearchLimits:
    """Caps that keep the search fast (sizes are numbers of weights)."""

    cp_max_size: int = 300_000
    cp_seconds: float | None = None  # a wall-clock cap makes the chosen structure depend on machine load
    cp_max_work: float = 4e7
    ring_max_size: int = 300_000
    ring_seconds: float | None = None
    spatial_both: bool = False  # also try the horizontal-first spatial SVD (costs a second big eigensolve)
    grid: int = 256  # points of the log-bytes grid the score averages over
    # what one op costs beyond its multiply-adds, in multiply-adds, at batch 1 (None: ops are free);
    # the default stands for onnxruntime on an x86 core (~10 us per op). Needs the layer's output
    # positions (bake passes them from the recorded shapes). Used to rank families by speed.
    op_cost_macs: float | None = 5e5
    # families scoring within this relative margin of the best are ranked by compute instead
    speed_tie: float = 0.02
    # removed: levels are never cut for speed (kept so that passing it says why)
    max_macs_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.max_macs_ratio is not None:
            raise ValueError(
                "SearchLimits(max_macs_ratio=...) is gone: bake keeps every memory level, and speed is chosen "
                "at load time (Runtime.load(..., latency_limit_ms=...) with the engine's cost model or a profile)")


def candidates(kind: str, shape: tuple[int, ...], layout: str, levels: int, limits: SearchLimits,
               families: Sequence[str] | None = None) -> list[tuple[str, str, Callable[[np.ndarray], Decomposition] | None, str]]:
    """``(name, family, decompose, why skipped)`` for every registered family/tensorization that applies
    (:func:`stn_edge.host.decompositions.search_families`, in their order)."""
    want = set(families or decompositions.names())
    return [(t.name, f.name, None if t.skipped else t.decompose, t.skipped)
            for f in decompositions.search_families() if f.name in want
            for t in f.trials(kind, tuple(shape), layout, levels, limits)]


def weighted_errors(d: Decomposition, w: np.ndarray, gram: np.ndarray) -> list[float]:
    """Output-weighted relative errors of every level (see module doc)."""
    m = as_matrix(w, d.kind, d.layout).astype(np.float64)
    ref = float(np.einsum("ij,jk,ik->", m, gram, m)) or 1.0
    out = []
    for j in range(d.levels):
        diff = m - as_matrix(d.truncated(j), d.kind, d.layout)
        out.append(math.sqrt(max(float(np.einsum("ij,jk,ik->", diff, gram, diff)), 0.0) / ref))
    return out


def error_at(level_bytes: Sequence[int], errors: Sequence[float], budget: float) -> float:
    """Error of the best level holding at most ``budget`` bytes (1 when none fits)."""
    fit = [e for b, e in zip(level_bytes, errors) if b <= budget]
    return min(fit) if fit else 1.0


def choose_structure(
    candidate: Candidate,
    weight: np.ndarray,
    levels: int = 32,
    families: Sequence[str] | None = None,
    *,
    gram: np.ndarray | None = None,
    limits: SearchLimits = SearchLimits(),
    positions: int | None = None,
) -> tuple[Decomposition, list[dict[str, Any]]]:
    """Decompose ``weight`` with every applicable family; return the best and a report of all.

    Parameters
    ----------
    candidate : the layer (its ``kind`` and ``layout`` say how to read ``weight``).
    weight : the dense weight, in the node's layout.
    levels : ladder levels per family (at most).
    families : restrict the search to these family names (default: every registered one, :func:`stn_edge.host.decompositions.names`).
    gram : optional input-activation Gram matrix for output-weighted errors.
    limits : size and time caps (see :class:`SearchLimits`).
    positions : output positions per sample (pixels of a conv's output, rows of a linear layer's):
        with :attr:`SearchLimits.op_cost_macs`, each level's extra ops are charged per sample.

    Returns
    -------
    best : the :class:`Decomposition` with the lowest score (the least compute among those within
        :attr:`SearchLimits.speed_tie` of it), with every level it offers.
    report : one dict per candidate, best first: ``name, family, structure, score, err@10%, err@25%,
        err@50%, levels, min_bytes, max_bytes, dense_bytes, seconds, chosen, macs_ratio, compute`` (or
        ``skipped`` with why: a size cap, or a shape the family cannot save bytes on).
    """
    done: list[tuple[str, Decomposition, list[float], list[float] | None]] = []
    report: list[dict[str, Any]] = []
    for name, family, fn, skip in candidates(candidate.kind, tuple(weight.shape), candidate.layout, levels, limits, families):
        if fn is None:
            report.append({"name": name, "family": family, "skipped": skip})
            continue
        t0 = time.perf_counter()
        try:
            d = fn(weight)
        except ValueError as exc:  # the family cannot save bytes on this shape
            report.append({"name": name, "family": family, "skipped": str(exc)})
            continue
        errs = d.errors if gram is None else weighted_errors(d, weight, gram)
        d.seconds = time.perf_counter() - t0
        op_cost = limits.op_cost_macs / positions if limits.op_cost_macs and positions else 0.0
        done.append((name, d, errs, _compute(candidate, d, op_cost)))
    if not done:
        raise ValueError(f"no decomposition family saves bytes on {candidate.weight!r} {tuple(weight.shape)}")
    dense = done[0][1].dense_bytes
    lo = min(d.level_bytes[0] for _, d, _, _ in done)
    grid = np.geomspace(lo, dense, limits.grid, endpoint=False) if lo < dense else np.array([float(lo)])
    scored = []
    for name, d, errs, ratios in done:
        lb = d.level_bytes
        curve = [error_at(lb, errs, b) for b in grid]
        compute = None if ratios is None else float(np.mean([_ratio_at(lb, ratios, b) for b in grid]))
        scored.append((float(np.mean(curve)), name, d, errs, ratios, compute))
    scored.sort(key=lambda s: s[0])
    tie = scored[0][0] * (1 + limits.speed_tie) + 1e-12
    fastest = min((s for s in scored if s[0] <= tie), key=lambda s: (s[5] if s[5] is not None else 0.0, s[0]))
    scored.remove(fastest)
    scored.insert(0, fastest)
    rows = []
    for rank, (score, name, d, errs, ratios, compute) in enumerate(scored):
        lb = d.level_bytes
        rows.append({
            "name": name, "family": d.family,
            "structure": {k: v for k, v in d.structure.items() if k != "shells"},
            "score": round(score, 6),
            **{f"err@{p}%": round(error_at(lb, errs, dense * p / 100), 6) for p in (10, 25, 50)},
            "levels": d.levels, "min_bytes": lb[0], "max_bytes": lb[-1], "dense_bytes": dense,
            "seconds": round(d.seconds, 4), "chosen": rank == 0,
            **({"macs_ratio": round(ratios[-1], 3), "compute": round(compute, 3)} if ratios is not None else {}),
            **({"notes": d.notes} if d.notes else {}),
        })
    return scored[0][2], rows + report


def _compute(candidate: Candidate, d: Decomposition, op_cost: float = 0.0) -> list[float] | None:
    """Every level's multiply-adds per output position over the dense layer's, each extra op
    (:func:`~stn_edge.cost.extra_ops`) charged ``op_cost``; None for an embedding (a lookup does none)."""
    if candidate.kind == "embedding":
        return None
    strides = candidate.node.attrs.get("strides") if candidate.kind == "conv" else None
    dense = max(dense_macs(d), 1)
    extra = extra_ops(d.family) * op_cost
    return [(level_macs(d, j, strides) + extra) / dense for j in range(d.levels)]


def _ratio_at(level_bytes: Sequence[int], ratios: Sequence[float], budget: float) -> float:
    """Compute ratio of the best level holding at most ``budget`` bytes (1: the layer runs dense)."""
    fit = [r for b, r in zip(level_bytes, ratios) if b <= budget]
    return fit[-1] if fit else 1.0
