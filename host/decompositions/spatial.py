"""SVD of the spatial matricization of a conv kernel: a vertical conv then a horizontal one.

For ``W (C_out, C_in, kh, kw)`` the matrix ``M[(i, y), (o, x)] = W[o, i, y, x]`` of shape
``(C_in*kh, C_out*kw)`` has rank ``r`` exactly when the conv splits into a ``(kh x 1)`` conv
``C_in -> r`` followed by a ``(1 x kw)`` conv ``r -> C_out`` (Jaderberg et al., 2014, scheme 2).
Its truncated SVD gives ``a (r, C_in, kh)`` and ``b (r, C_out, kw)``; prefixes are optimal
(Eckart-Young). ``first="w"`` matricizes the other way round (horizontal conv first).
"""
from __future__ import annotations

import math
import time

import numpy as np

from stn_edge.host.decompositions.common import (
    Decomposition, SearchFamily, Trial, break_even_rank, build, exact_rank, ladder_ranks, left_svd,
)


def spatial_matrix(w: np.ndarray, first: str = "h") -> np.ndarray:
    """``(C_in*k1, C_out*k2)`` with ``k1`` the kernel axis of the first conv."""
    o, i, kh, kw = w.shape
    if first == "h":
        return w.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)
    return w.transpose(1, 3, 0, 2).reshape(i * kw, o * kh)


def decompose_spatial(w: np.ndarray, levels: int = 32, first: str = "h") -> Decomposition:
    """Factor a 2-D conv weight ``(C_out, C_in, kh, kw)`` as (k1 x 1) then (1 x k2) convs.

    Ladder ranks are evenly spaced up to the smaller of the break-even rank and the numerical rank.
    """
    if w.ndim != 4:
        raise ValueError(f"svd-spatial needs a 2-D conv weight (C_out, C_in, kh, kw), got shape {w.shape}")
    t0 = time.perf_counter()
    o, i, kh, kw = w.shape
    k1, k2 = (kh, kw) if first == "h" else (kw, kh)
    mat = spatial_matrix(w, first)
    u, s, rt = left_svd(mat)
    top = min(break_even_rank(*mat.shape), len(s))
    if top < 1:
        raise ValueError(f"svd-spatial: a {mat.shape[0]}x{mat.shape[1]} matricization saves no bytes")
    top = min(top, exact_rank(s))
    root = np.sqrt(s[:top])
    a = (u[:, :top] * root).T.reshape(top, i, k1)
    b = (rt[:top] / root[:, None]).reshape(top, o, k2)
    ranks = ladder_ranks(top, levels)
    e2 = s.astype(np.float64) ** 2
    total = float(np.sum(w.astype(np.float64) ** 2)) or 1.0
    errors = [math.sqrt(max(total - float(e2[:r].sum()), 0.0) / total) for r in ranks]
    return build("svd-spatial", "conv", "conv", w.shape, {"first": first, "matricization": f"in*k{first} | out*k"},
                 {"a": (0, a), "b": (0, b)}, {}, [(r,) for r in ranks], [0], errors, min(mat.shape), w.dtype,
                 time.perf_counter() - t0)


def _trials(kind: str, shape: tuple[int, ...], layout: str, levels: int, limits) -> list[Trial]:
    spatial = shape[2:] if kind == "conv" else ()
    if len(spatial) != 2 or math.prod(spatial) == 1:
        return []
    out = [Trial("svd-spatial/h", lambda w: decompose_spatial(w, levels, "h"))]
    if limits.spatial_both or spatial[0] != spatial[1]:
        out.append(Trial("svd-spatial/w", lambda w: decompose_spatial(w, levels, "w")))
    return out


def torch_weight(layer: dict, f: dict) -> "torch.Tensor":
    """The kernel ``(C_out, C_in, kh, kw)`` from torch factors ``a (r, C_in, k1)``, ``b (r, C_out, k2)``."""
    import torch

    first = layer["structure"].get("first", "h")
    return torch.einsum("riy,rox->oiyx" if first == "h" else "rix,roy->oiyx", f["a"], f["b"])


#: 2-D conv kernels larger than 1x1; the width-first split too when the kernel is not square
SEARCH = SearchFamily("svd-spatial", 10, _trials, torch_weight)
