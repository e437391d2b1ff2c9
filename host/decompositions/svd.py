"""Truncated SVD of a weight's matricization, at maximal useful rank, rank-major and sorted.

For ``W (m, n) = U diag(s) V^T`` the factors are ``a = sqrt(s) V^T`` (rank, n) and
``b = (U sqrt(s))^T`` (rank, m). Singular values are sorted, so the first ``k`` rows of both are the
best rank-``k`` approximation (Eckart-Young): truncation is a prefix. Splitting ``sqrt(s)`` over
both factors keeps them at the same scale, which matters in float16.
"""
from __future__ import annotations

import math
import time

import numpy as np

from stn_edge.host.decompositions.common import (
    Decomposition, SearchFamily, Trial, as_matrix, break_even_rank, ladder_ranks, left_svd,
)


def svd_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``a (rank, n)``, ``b (rank, m)`` and all singular values of ``matrix (m, n)``.

    Computed in float64; ``a`` and ``b`` come back in ``matrix.dtype``.
    """
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    a = root[:, None] * vt[:rank]
    b = (u[:, :rank] * root[None, :]).T
    return a.astype(matrix.dtype), b.astype(matrix.dtype), s


def decompose_svd(w: np.ndarray, kind: str, layout: str = "conv", levels: int = 32) -> Decomposition:
    """SVD of the ``(out, in * kernel)`` matricization, in the shared shape.

    Factors ``a (r, in, *kernel)`` / ``a (r, in)`` and ``b (r, out)`` as ``svd.svd_factors`` gives them;
    ladder ranks evenly spaced up to the break-even rank (or the numerical rank, if smaller). Computed
    with :func:`left_svd` (Gram route, several times faster on the wide unfoldings of conv kernels).
    Prefix truncation is the best rank-k approximation (Eckart-Young).
    """
    t0 = time.perf_counter()
    mat = as_matrix(w, kind, layout)
    m, n = mat.shape
    u, s, rt = left_svd(mat)
    top = min(break_even_rank(m, n), len(s))
    if top < 1:
        raise ValueError(f"svd: a {m}x{n} matrix saves no bytes at any rank")
    root = np.sqrt(s[:top])
    a = (rt[:top] / root[:, None]).astype(w.dtype)    # sqrt(s) V^T   (r, in * kernel)
    b = (u[:, :top] * root).T.astype(w.dtype)         # (U sqrt(s))^T (r, out)
    if kind == "conv":
        a = a.reshape(top, *w.shape[1:])
    ranks = ladder_ranks(top, levels)
    e2 = s ** 2
    total = float(np.sum(mat.astype(np.float64) ** 2)) or 1.0
    errors = [math.sqrt(max(total - float(e2[:k].sum()), 0.0) / total) for k in ranks]
    structure = {"matricization": "out | in*kernel"}
    d = Decomposition("svd", kind, layout, tuple(w.shape), structure, {"a": a, "b": b},
                      {"a": list(ranks), "b": list(ranks)}, list(ranks), [[r] for r in ranks], int(min(m, n)),
                      errors, time.perf_counter() - t0)
    d.check()
    return d


def _trials(kind: str, shape: tuple[int, ...], layout: str, levels: int, limits) -> list[Trial]:
    return [Trial("svd", lambda w: decompose_svd(w, kind, layout, levels))]


def torch_weight(layer: dict, f: dict) -> "torch.Tensor":
    """The dense weight from torch factors ``a (r, in, *kernel)`` / ``a (r, in)`` and ``b (r, out)``
    (the contract's reconstruct is plain matrix algebra and runs on torch tensors as it is)."""
    from stn_edge import families

    return families.get("svd").reconstruct(layer, f)


#: every layer kind, and the only family that lowers a table lookup (Gather on ``a^T``)
SEARCH = SearchFamily("svd", 0, _trials, torch_weight)
