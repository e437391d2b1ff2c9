"""CP (canonical polyadic) decomposition of a 2-D conv kernel, sorted for prefix truncation.

``W[o, i, y, x] ~= sum_r B[o, r] A[i, r] H[y, r] V[x, r]`` (Lebedev et al., 2015): a 1x1 conv
``C_in -> R``, a depthwise ``(kh x 1)`` conv, a depthwise ``(1 x kw)`` conv, a 1x1 conv ``R -> C_out``.

Fitting: an SVD-based start (the ``out | in*kernel`` SVD, each right vector split again by an SVD of
its ``(C_in, kh*kw)`` reshape and the spatial part made rank-1; the heaviest terms are kept), then
alternating least squares with an iteration and time cap. Each ALS sweep costs two contractions of
the kernel with the rank (``~4 |W| R`` flops), so the rank is capped by ``max_work`` (``|W| * R``).

Ordering (``order``): ``"nested"`` (default) fits the components block by block along the ladder,
each block an ALS fit of the residual of the earlier ones, so every prefix is a fit in its own right
and the prefix error never rises; ``"lambda"`` fits all components jointly and sorts them by weight
``lambda_r``; ``"greedy"`` fits jointly and orders by exact error reduction. CP components are not
orthogonal, so a jointly fitted rank-R CP cut to its first k components is far from a rank-k fit (the
components of an over-complete fit cancel each other); measured on a 32x16x3x3 kernel of exact CP
rank 6 (mean relative error over the 32 levels): nested 0.022, greedy 0.185, lambda 0.196; on a
128x128x3x3 kernel with decaying spectra: 0.25 / 0.46 / 0.48. Factors are balanced: column ``r`` of
every factor has norm ``lambda_r ** (1/4)``.
"""
from __future__ import annotations

import math
import time

import numpy as np

from stn_edge.host.decompositions.common import Decomposition, SearchFamily, Trial, build, ladder_ranks, left_svd

#: default cap on |W| * R: the rank a search gives CP on a big kernel (~20 ms per ALS sweep)
MAX_WORK = 4e7


def cp_break_even(shape: tuple[int, ...]) -> int:
    """Largest CP rank whose factors hold fewer numbers than the kernel."""
    return max((math.prod(shape) - 1) // sum(shape), 0)


def _svd_start(x: np.ndarray, rank: int, rng: np.random.Generator) -> list[np.ndarray]:
    o, i, kh, kw = x.shape
    u, s, rt = left_svd(x.reshape(o, -1))
    n = min(len(s), rank)
    vt = rt[:n] / s[:n, None]
    u2, s2, vt2 = np.linalg.svd(vt[:n].reshape(n, i, kh * kw), full_matrices=False)  # (n, i, t), (n, t), (n, t, K)
    weight = s[:n, None] * s2                                                        # (n, t)
    order = np.argsort(-weight.ravel())[:rank]
    comp, term = np.unravel_index(order, weight.shape)
    b = u[:, comp] * weight[comp, term]                              # (o, R) carries the weight
    a = u2[comp, :, term].T                                          # (i, R)
    hs, ss, vs = np.linalg.svd(vt2[comp, term].reshape(-1, kh, kw))  # spatial part made rank-1
    h = (hs[:, :, 0] * np.sqrt(ss[:, :1])).T                         # (kh, R)
    v = (vs[:, 0, :] * np.sqrt(ss[:, :1])).T                         # (kw, R)
    factors = [b, a, h, v]
    if len(order) < rank:  # fewer SVD terms than the rank (tiny kernels): random small extra terms
        extra = rank - len(order)
        scale = 1e-3 * float(np.abs(b).max() if b.size else 1.0)
        factors = [np.concatenate([f, scale * rng.standard_normal((f.shape[0], extra))], axis=1) for f in factors]
    return factors


def _khatri_rao(a: np.ndarray, h: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(i * kh * kw, R)``: column ``r`` is ``a[:, r] (x) h[:, r] (x) v[:, r]``, so ``B @ kr.T`` is the
    kernel ``(o, i * kh * kw)`` of the CP factors ``[B, A, H, V]``."""
    return (a[:, None, None, :] * h[None, :, None, :] * v[None, None, :, :]).reshape(-1, a.shape[1])


def _als(x: np.ndarray, factors: list[np.ndarray], iters: int, deadline: float, ridge: float) -> list[np.ndarray]:
    """ALS sweeps on ``[B (o,R), A (i,R), H (kh,R), V (kw,R)]`` until ``iters`` or ``deadline``.

    Every least-squares solve adds ``ridge * mean(diag(G))`` to the diagonal of its Gram ``G``: without
    it, a rank above the tensor's CP rank drifts into huge components that cancel each other, which
    ruins every prefix (and float32 storage).
    """
    o, i, kh, kw = x.shape
    b, a, h, v = factors
    x_o = x.reshape(o, -1)
    for _ in range(iters):
        if time.perf_counter() > deadline:
            break
        grams = [f.T @ f for f in (b, a, h, v)]
        # B: X_(o) @ khatri-rao(A, H, V)
        kr = _khatri_rao(a, h, v)
        g = grams[1] * grams[2] * grams[3]
        b = np.linalg.solve(g + ridge * np.trace(g) / len(g) * np.eye(len(g)), (x_o @ kr).T).T
        t = (b.T @ x_o).reshape(-1, i, kh, kw)                              # (R, i, kh, kw)
        gb = b.T @ b
        for which in range(3):
            # the three contractions as batched matmuls over the rank (einsum's path search per
            # call cost more than the arithmetic on these small kernels)
            if which == 0:
                hv = (h[:, None, :] * v[None, :, :]).reshape(kh * kw, -1)                # (K, R)
                m = np.matmul(t.reshape(len(t), i, kh * kw), hv.T[:, :, None])[..., 0].T   # (i, R)
                g = gb * (h.T @ h) * (v.T @ v)
            else:
                ta = np.matmul(a.T[:, None, :], t.reshape(len(t), i, kh * kw))[:, 0, :].reshape(-1, kh, kw)  # (R, kh, kw)
                if which == 1:
                    m = np.matmul(ta, v.T[:, :, None])[..., 0].T                          # (kh, R)
                    g = gb * (a.T @ a) * (v.T @ v)
                else:
                    m = np.matmul(h.T[:, None, :], ta)[:, 0, :].T                         # (kw, R)
                    g = gb * (a.T @ a) * (h.T @ h)
            new = np.linalg.solve(g + ridge * np.trace(g) / len(g) * np.eye(len(g)), m.T).T
            norms = np.linalg.norm(new, axis=0)
            norms[norms == 0] = 1.0
            new = new / norms
            b = b * norms  # keep the scale on B so the next solves are well conditioned
            t = t * norms[:, None, None, None]
            gb = b.T @ b
            if which == 0:
                a = new
            elif which == 1:
                h = new
            else:
                v = new
    return [b, a, h, v]


def prefix_errors(x: np.ndarray, factors: list[np.ndarray], ranks: list[int]) -> list[float]:
    """Exact ``||X - X_k|| / ||X||`` for the first ``k`` components, for every ``k`` in ``ranks``.

    Uses ``||X_k||^2 = sum_{r,s<k} prod_f (F^T F)[r, s]`` and ``<X, X_k> = sum_{r<k} <X, term_r>``,
    so no prefix is ever rebuilt densely.
    """
    b, a, h, v = factors
    o = x.shape[0]
    t = (b.T @ x.reshape(o, -1)).reshape(-1, *x.shape[1:])
    inner = np.einsum("riyx,ir,yr,xr->r", t, a, h, v, optimize=True)
    had = (b.T @ b) * (a.T @ a) * (h.T @ h) * (v.T @ v)
    norm2 = np.cumsum(np.cumsum(had, axis=0), axis=1)
    cum_inner = np.cumsum(inner)
    total = float(np.sum(x ** 2)) or 1.0
    return [math.sqrt(max(total - 2 * cum_inner[k - 1] + norm2[k - 1, k - 1], 0.0) / total) for k in ranks]


def greedy_order(x: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """Component order in which each next component lowers the prefix's error the most.

    Exact, from the same Gram quantities as :func:`prefix_errors`: adding ``r`` to the set ``S`` changes
    the squared error by ``-2 <X, t_r> + ||t_r||^2 + 2 sum_{s in S} <t_r, t_s>``.
    """
    b, a, h, v = factors
    t = (b.T @ x.reshape(x.shape[0], -1)).reshape(-1, *x.shape[1:])
    inner = np.einsum("riyx,ir,yr,xr->r", t, a, h, v, optimize=True)
    had = (b.T @ b) * (a.T @ a) * (h.T @ h) * (v.T @ v)
    gain = -2 * inner + np.diag(had)
    left = np.ones(len(inner), dtype=bool)
    order = []
    for _ in range(len(inner)):
        r = int(np.argmin(np.where(left, gain, np.inf)))
        order.append(r)
        left[r] = False
        gain = gain + 2 * had[r]
    return np.asarray(order)


def _deadline(seconds: float | None) -> float:
    """``perf_counter`` time to stop at: ``seconds`` from now, or never (None)."""
    return math.inf if seconds is None else time.perf_counter() + seconds


def fit_cp(w: np.ndarray, rank: int, iters: int = 30, seconds: float | None = None, ridge: float = 1e-4,
           order: str = "greedy", seed: int = 0) -> list[np.ndarray]:
    """Rank-``rank`` CP of ``w (C_out, C_in, kh, kw)``: ``[B (o,R), A (i,R), H (kh,R), V (kw,R)]`` in float64.

    Components come in ``order``: ``"greedy"`` (each next one lowers the error most, see
    :func:`greedy_order`) or ``"lambda"`` (by weight). Columns are balanced: column ``r`` of every
    factor has norm ``lambda_r ** (1/4)``. ``seconds`` caps the ALS sweeps by wall-clock time (the
    result then depends on the machine's load); None runs all ``iters``, reproducibly.
    """
    x = w.astype(np.float64)
    deadline = _deadline(seconds)
    factors = _als(x, _svd_start(x, rank, np.random.default_rng(seed)), iters, deadline, ridge)
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])      # (4, R)
    lam = np.prod(norms, axis=0)
    safe = np.where(norms > 0, norms, 1.0)
    root = lam ** 0.25
    factors = [f / s * root for f, s in zip(factors, safe)]
    idx = greedy_order(x, factors) if order == "greedy" else np.argsort(-lam, kind="stable")
    return [f[:, idx] for f in factors]


def fit_cp_nested(w: np.ndarray, ranks: list[int], iters: int = 30, seconds: float | None = None,
                  ridge: float = 1e-4, seed: int = 0) -> list[np.ndarray]:
    """CP fitted block by block along the ladder: components ``[r_{j-1}, r_j)`` are an ALS fit of the
    residual left by the earlier ones, which stay fixed. Nested by construction, and every prefix
    error is at most the previous one (each block's first least-squares step can only lower it)."""
    x = w.astype(np.float64)
    rng = np.random.default_rng(seed)
    t_end = _deadline(seconds)
    residual = x.copy()
    blocks: list[list[np.ndarray]] = []
    start = 0
    for n, r in enumerate(ranks):
        if math.isinf(t_end):
            deadline = t_end
        else:
            left = max(t_end - time.perf_counter(), 0.0)
            deadline = time.perf_counter() + left * (r - start) / max(ranks[-1] - start, 1)
        f = _als(residual, _svd_start(residual, r - start, rng), iters, deadline, ridge)
        residual -= (f[0] @ _khatri_rao(*f[1:]).T).reshape(residual.shape)
        blocks.append(f)
        start = r
    factors = [np.concatenate([blk[k] for blk in blocks], axis=1) for k in range(4)]
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])
    safe = np.where(norms > 0, norms, 1.0)
    root = np.prod(norms, axis=0) ** 0.25
    return [f / s * root for f, s in zip(factors, safe)]


def decompose_cp(w: np.ndarray, levels: int = 32, max_rank: int | None = None, max_work: float = MAX_WORK,
                 iters: int = 30, seconds: float | None = None, order: str = "nested") -> Decomposition:
    """CP of a 2-D conv weight at rank ``min(break-even, max_rank, max_work / |W|)`` (at least 8)."""
    if w.ndim != 4:
        raise ValueError(f"cp needs a 2-D conv weight (C_out, C_in, kh, kw), got shape {w.shape}")
    t0 = time.perf_counter()
    top = cp_break_even(w.shape)
    cap = max(8, int(max_work // w.size))
    notes = ""
    if max_rank is not None:
        cap = min(cap, max_rank)
    if cap < top:
        notes = f"rank capped at {cap} of break-even {top} (max_work={max_work:g})"
        top = cap
    if top < 1:
        raise ValueError(f"cp: no rank of a {w.shape} kernel is smaller than the dense weight")
    ranks = ladder_ranks(top, levels)
    if order == "nested":
        b, a, h, v = fit_cp_nested(w, ranks, iters, seconds)
    else:
        b, a, h, v = fit_cp(w, top, iters, seconds, order=order)
    errors = prefix_errors(w.astype(np.float64), [b, a, h, v], ranks)
    return build("cp", "conv", "conv", w.shape, {"order": order, "balanced": True},
                 {"a": (0, a.T), "h": (0, h.T), "w": (0, v.T), "b": (0, b.T)}, {}, [(r,) for r in ranks], [0],
                 errors, top, w.dtype, time.perf_counter() - t0, notes)


def _trials(kind: str, shape: tuple[int, ...], layout: str, levels: int, limits) -> list[Trial]:
    spatial = shape[2:] if kind == "conv" else ()
    if len(spatial) != 2 or math.prod(spatial) == 1:
        return []
    size = math.prod(shape)
    skip = f"kernel of {size} weights is above cp_max_size={limits.cp_max_size}" if size > limits.cp_max_size else ""
    return [Trial("cp", lambda w: decompose_cp(w, levels, max_work=limits.cp_max_work, seconds=limits.cp_seconds), skip)]


def torch_weight(layer: dict, f: dict) -> "torch.Tensor":
    """The kernel from torch factors ``a (R, C_in)``, ``h (R, kh)``, ``w (R, kw)``, ``b (R, C_out)``."""
    import torch

    return torch.einsum("ro,ri,ry,rx->oiyx", f["b"], f["a"], f["h"], f["w"])


#: 2-D conv kernels up to ``SearchLimits.cp_max_size`` weights
SEARCH = SearchFamily("cp", 30, _trials, torch_weight)
