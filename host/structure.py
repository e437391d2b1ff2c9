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

Compute guard (:attr:`SearchLimits.max_macs_ratio`, 1.0 by default): a level is eligible only if its
multiply-adds per output position (per sample for a linear layer, per output pixel for a conv; see
:mod:`stn_edge.host.decompositions.macs`) are at most ``max_macs_ratio`` times the dense layer's. MACs
grow with the level (bonds nest), so the eligible levels are a prefix of the ladder: the family is
scored, and baked, on that prefix only (its error curve stays flat above the last eligible level's
bytes), and skipped when not even its smallest level qualifies. A level that computes more than the
dense layer would be slower than running dense at any budget that holds it, so it is no real option
for the planner; dropping levels instead of whole families keeps a family whose small levels are
cheap (a tensor train at very low ranks) in the running, judged fairly on what it can offer. The
report says how many levels were dropped (``notes``) or why the family was skipped, and gives
``macs_ratio`` (the top kept level's MACs over the dense layer's).

Op cost (:attr:`SearchLimits.op_cost_macs`, 5e5 by default): each op a factorized layer runs beyond
the dense layer's one (:data:`EXTRA_OPS`: 1 for SVD, 3 for CP...) is charged that many multiply-adds
per sample, spread over the layer's output positions, before the guard compares with the dense
layer. It stands for onnxruntime's fixed ~10 us per op on an x86 core; on small layers (few pixels,
few channels) it keeps four-op CP layers out and cuts the high levels where even SVD's second op
does not pay. Measured on ResNet-20 at batch 1 on onnxruntime: 1.35/1.09/1.01x dense at 75/50/25%
without it, 0.99/0.86/0.76x with it (docs/BENCHMARKS.md). ``None`` makes ops free.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from stn_edge.host.decompositions.common import Decomposition, as_matrix, decompose_svd
from stn_edge.host.decompositions.cp import decompose_cp
from stn_edge.host.decompositions.fctn import decompose_fctn
from stn_edge.host.decompositions.macs import dense_macs, level_macs
from stn_edge.host.decompositions.spatial import decompose_spatial
from stn_edge.host.decompositions.tr import decompose_tr
from stn_edge.host.decompositions.tt import decompose_tt
from stn_edge.host.decompositions.tucker import decompose_tucker2
from stn_edge.host.layers import Candidate

#: families the search knows, in report order
FAMILIES = ("svd", "svd-spatial", "tucker2", "cp", "tt", "tr", "fctn")


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
    # levels may do at most this many times the dense layer's multiply-adds per output position
    # (None: no compute guard, accuracy per byte only); see the module doc
    max_macs_ratio: float | None = 1.0
    # what one op costs beyond its multiply-adds, in multiply-adds, at batch 1 (None: ops are free;
    # the default stands for onnxruntime on an x86 core, see the module doc).
    # A factorized layer runs EXTRA_OPS more ops than the dense one; on engines with a fixed cost per
    # op (onnxruntime ~10 us on an x86 core, ~5e5 multiply-adds there) those ops dominate small
    # layers. Needs the layer's output positions (bake passes them from the recorded shapes).
    op_cost_macs: float | None = 5e5


def candidates(kind: str, shape: tuple[int, ...], layout: str, levels: int, limits: SearchLimits,
               families: Sequence[str] | None = None) -> list[tuple[str, str, Callable[[np.ndarray], Decomposition] | None, str]]:
    """``(name, family, decompose, why skipped)`` for every family/tensorization that applies."""
    want = set(families or FAMILIES)
    size = math.prod(shape)
    out: list[tuple[str, str, Any, str]] = []

    def add(name: str, family: str, fn: Any, skip: str = "") -> None:
        if family in want:
            out.append((name, family, None if skip else fn, skip))

    add("svd", "svd", lambda w: decompose_svd(w, kind, layout, levels))
    if kind == "embedding":  # only svd lowers a table lookup (Gather on a^T)
        return out
    if kind == "linear":
        add("tt/d2", "tt", lambda w: decompose_tt(w, kind, layout, levels, d=2))
        add("tt/d3", "tt", lambda w: decompose_tt(w, kind, layout, levels, d=3))
        return out
    spatial = shape[2:]
    kernel = math.prod(spatial)
    if len(spatial) == 2 and kernel > 1:
        add("svd-spatial/h", "svd-spatial", lambda w: decompose_spatial(w, levels, "h"))
        if limits.spatial_both or spatial[0] != spatial[1]:
            add("svd-spatial/w", "svd-spatial", lambda w: decompose_spatial(w, levels, "w"))
    if kernel > 1:
        add("tucker2", "tucker2", lambda w: decompose_tucker2(w, levels))
    if len(spatial) == 2 and kernel > 1:
        skip = f"kernel of {size} weights is above cp_max_size={limits.cp_max_size}" if size > limits.cp_max_size else ""
        add("cp", "cp", lambda w: decompose_cp(w, levels, max_work=limits.cp_max_work, seconds=limits.cp_seconds), skip)
    if len(spatial) == 2:
        add("tt", "tt", lambda w: decompose_tt(w, kind, layout, levels))
    if kernel > 1:
        skip = f"kernel of {size} weights is above ring_max_size={limits.ring_max_size}" if size > limits.ring_max_size else ""
        add("tr", "tr", lambda w: decompose_tr(w, levels, seconds=limits.ring_seconds), skip)
        add("fctn", "fctn", lambda w: decompose_fctn(w, levels, seconds=limits.ring_seconds), skip)
    return out


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
    families : restrict the search to these family names (default: all of :data:`FAMILIES`).
    gram : optional input-activation Gram matrix for output-weighted errors.
    limits : size and time caps (see :class:`SearchLimits`).
    positions : output positions per sample (pixels of a conv's output, rows of a linear layer's):
        with :attr:`SearchLimits.op_cost_macs`, each level's extra ops are charged per sample.

    Returns
    -------
    best : the :class:`Decomposition` with the lowest score.
    report : one dict per candidate, best first: ``name, family, structure, score, err@10%, err@25%,
        err@50%, levels, min_bytes, max_bytes, dense_bytes, seconds, chosen, macs_ratio`` (or ``skipped``
        with why; a family skipped or cut by the compute guard says so, see the module doc).
    """
    done: list[tuple[str, Decomposition, list[float]]] = []
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
        macs_ratio = None
        if candidate.kind != "embedding":  # a dense table lookup does no multiply-adds: nothing to compare
            op_cost = limits.op_cost_macs / positions if limits.op_cost_macs and positions else 0.0
            d, errs, macs_ratio, skip = _compute_guard(candidate, d, errs, limits.max_macs_ratio, op_cost)
            if skip:
                report.append({"name": name, "family": family, "skipped": skip, "macs_ratio": macs_ratio})
                continue
        done.append((name, d, errs, macs_ratio))
    if not done:
        raise ValueError(f"no decomposition family saves bytes on {candidate.weight!r} {tuple(weight.shape)}")
    dense = done[0][1].dense_bytes
    lo = min(d.level_bytes[0] for _, d, _, _ in done)
    grid = np.geomspace(lo, dense, limits.grid, endpoint=False) if lo < dense else np.array([float(lo)])
    scored = []
    for name, d, errs, macs_ratio in done:
        lb = d.level_bytes
        curve = [error_at(lb, errs, b) for b in grid]
        scored.append((float(np.mean(curve)), name, d, errs, macs_ratio))
    scored.sort(key=lambda s: s[0])
    rows = []
    for rank, (score, name, d, errs, macs_ratio) in enumerate(scored):
        lb = d.level_bytes
        rows.append({
            "name": name, "family": d.family,
            "structure": {k: v for k, v in d.structure.items() if k != "shells"},
            "score": round(score, 6),
            **{f"err@{p}%": round(error_at(lb, errs, dense * p / 100), 6) for p in (10, 25, 50)},
            "levels": d.levels, "min_bytes": lb[0], "max_bytes": lb[-1], "dense_bytes": dense,
            "seconds": round(d.seconds, 4), "chosen": rank == 0,
            **({"macs_ratio": macs_ratio} if macs_ratio is not None else {}), **({"notes": d.notes} if d.notes else {}),
        })
    return scored[0][2], rows + report


#: ops a factorized layer runs beyond the dense layer's one (Conv/MatMul/Gemm, plus the Reshape and
#: Transpose of activations that the tensor-network lowerings need)
EXTRA_OPS = {"svd": 1, "svd-spatial": 1, "tucker2": 2, "cp": 3, "tt": 3, "tr": 4, "fctn": 4}


def _compute_guard(candidate: Candidate, d: Decomposition, errs: list[float], ratio: float | None,
                   op_cost: float = 0.0) -> tuple[Decomposition, list[float], float, str]:
    """``(d cut to its eligible levels, their errors, top kept level's MACs / dense MACs, why skipped)``.

    ``op_cost``: multiply-adds one extra op costs per output position; the family's extra ops
    (:data:`EXTRA_OPS`) are added to every level's MACs (and the report says so)."""
    strides = candidate.node.attrs.get("strides") if candidate.kind == "conv" else None
    dense = dense_macs(d)
    extra = EXTRA_OPS.get(d.family, 1) * op_cost
    macs = [level_macs(d, j, strides) + extra for j in range(d.levels)]
    where = "per output pixel" if candidate.kind == "conv" else "per sample"
    if extra:
        where += f", {EXTRA_OPS.get(d.family, 1)} extra op(s) at {op_cost:,.0f} each"
    if ratio is None:
        return d, errs, round(macs[-1] / dense, 3), ""
    keep = 0
    while keep < d.levels and macs[keep] <= ratio * dense:
        keep += 1
    if keep == 0:
        return d, errs, round(macs[0] / dense, 3), (
            f"compute: even its smallest level needs {macs[0] / dense:.2f}x the dense layer's multiply-adds "
            f"{where} ({macs[0]:,.0f} vs {dense:,}), above max_macs_ratio={ratio:g}")
    if keep < d.levels:
        top_bytes = d.level_bytes[keep - 1]
        note = (f"compute: kept the {keep} lowest of {d.levels} levels (up to {top_bytes:,} bytes); the ones above "
                f"need up to {macs[-1] / dense:.2f}x the dense layer's multiply-adds {where} (max_macs_ratio={ratio:g})")
        d = d.prefix(keep)
        d.notes = f"{d.notes}; {note}" if d.notes else note
        errs = list(errs[:keep])
    return d, errs, round(macs[keep - 1] / dense, 3), ""
