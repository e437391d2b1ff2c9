"""Truncated SVD of a weight's matricization, at maximal useful rank, rank-major and sorted.

For ``W (m, n) = U diag(s) V^T`` the factors are ``a = sqrt(s) V^T`` (rank, n) and
``b = (U sqrt(s))^T`` (rank, m). Singular values are sorted, so the first ``k`` rows of both are the
best rank-``k`` approximation (Eckart-Young): truncation is a prefix. Splitting ``sqrt(s)`` over
both factors keeps them at the same scale, which matters in float16.
"""
from __future__ import annotations

import numpy as np


def svd_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``a (rank, n)``, ``b (rank, m)`` and all singular values of ``matrix (m, n)``.

    Computed in float64; ``a`` and ``b`` come back in ``matrix.dtype``.
    """
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    a = root[:, None] * vt[:rank]
    b = (u[:, :rank] * root[None, :]).T
    return a.astype(matrix.dtype), b.astype(matrix.dtype), s


def break_even_rank(m: int, n: int) -> int:
    """Largest rank whose two factors ``r*(m+n)`` hold fewer numbers than the dense ``m*n``."""
    return max((m * n - 1) // (m + n), 0)


def ladder_ranks(max_rank: int, levels: int) -> list[int]:
    """At most ``levels`` strictly increasing ranks ending at ``max_rank``, evenly spaced in bytes."""
    if max_rank <= levels:
        return list(range(1, max_rank + 1))
    ranks = np.unique(np.round(np.linspace(max_rank / levels, max_rank, levels)).astype(int))
    return [int(r) for r in ranks if r >= 1]
