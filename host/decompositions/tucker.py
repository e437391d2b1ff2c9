"""Tucker-2 of a conv kernel: channel modes factorized, spatial modes kept.

``W (C_out, C_in, *k) = core ×_out U_out ×_in U_in`` with ``U_out (C_out, r_out)`` and ``U_in (C_in, r_in)``
the leading left singular vectors of the out- and in-unfoldings (HOSVD) and
``core = W ×_out U_out^T ×_in U_in^T``. Because the factors are orthonormal, truncating to
``(a, b)`` is an orthogonal projection and its error is exact from the core:
``||W - W_ab||^2 = ||W||^2 - ||core[:a, :b]||^2``. A prefix of the HOSVD is the HOSVD at the smaller
ranks, so prefix truncation equals a fresh (HOSVD) decomposition; it is not HOOI-optimal.

Storage: ``a = U_in^T (r_in, C_in)``, ``b = U_out^T (r_out, C_out)`` rank-major; ``core`` nested-shell
over bonds ``[r_out, r_in]``. Lowered as 1x1 conv, kernel conv, 1x1 conv (Kim et al., 2016).
"""
from __future__ import annotations

import math
import time

import numpy as np

from stn_edge.host.decompositions.common import (
    Decomposition, SearchFamily, Trial, bond_ladder, build, energy_table, left_svd,
)


def decompose_tucker2(w: np.ndarray, levels: int = 32) -> Decomposition:
    """Tucker-2 (HOSVD) of a conv weight ``(C_out, C_in, *k)`` with a ladder along a greedy bond path."""
    if w.ndim < 3:
        raise ValueError(f"tucker2 needs a conv weight (C_out, C_in, *k), got shape {w.shape}")
    t0 = time.perf_counter()
    x = w.astype(np.float64)
    o, i = x.shape[:2]
    k = int(math.prod(x.shape[2:]))
    u_out, _, _ = left_svd(x.reshape(o, -1))
    u_in, _, _ = left_svd(x.transpose(1, 0, *range(2, x.ndim)).reshape(i, -1))
    ro, ri = u_out.shape[1], u_in.shape[1]
    core = np.tensordot(u_out.T, x, axes=(1, 0))                      # (ro, C_in, *k)
    core = np.tensordot(u_in.T, core, axes=(1, 1)).swapaxes(0, 1)     # (ro, ri, *k)
    table = energy_table(np.sum(core.reshape(ro, ri, k) ** 2, axis=2))
    total = float(np.sum(x ** 2)) or 1.0

    def params(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a * o + b * i + a * b * k

    bonds = bond_ladder((ro, ri), lambda a, b: table[a - 1, b - 1], params, o * i * k, total, levels, drivers=(0, 1))
    if not bonds:
        raise ValueError(f"tucker2: no rank of a {w.shape} kernel is smaller than the dense weight")
    errors = [math.sqrt(max(total - float(table[a - 1, b - 1]), 0.0) / total) for a, b in bonds]
    return build("tucker2", "conv", "conv", w.shape, {"modes": "out, in; kernel kept"},
                 {"a": (1, u_in.T), "b": (0, u_out.T)}, {"core": ((0, 1), core)}, bonds, (0, 1), errors,
                 max(ro, ri), w.dtype, time.perf_counter() - t0)


def _trials(kind: str, shape: tuple[int, ...], layout: str, levels: int, limits) -> list[Trial]:
    if kind != "conv" or math.prod(shape[2:]) == 1:
        return []
    return [Trial("tucker2", lambda w: decompose_tucker2(w, levels))]


def torch_weight(layer: dict, f: dict) -> "torch.Tensor":
    """The kernel from torch factors ``a (r_in, C_in)``, ``core (r_out, r_in, *k)``, ``b (r_out, C_out)``."""
    import torch

    return torch.einsum("po,pq...,qi->oi...", f["b"], f["core"], f["a"])


#: conv kernels larger than 1x1
SEARCH = SearchFamily("tucker2", 20, _trials, torch_weight)
