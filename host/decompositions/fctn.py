"""Fully-connected tensor network of a conv kernel, its edges pruned by their spectra.

The kernel is the 3-mode tensor ``X (C_in, K, C_out)`` (``K`` the flattened kernel). Its FCTN
(Zheng et al., 2021) joins every pair of modes by an edge; with three modes that network is a ring,
so it is realized, ordered, truncated and lowered exactly as :mod:`.tr` does — only the bond ranks
are chosen differently:

* each edge ``(p, q)`` gets the spectrum ``sum over the other mode's index of the singular values of
  the (p, q) slice``; its rank at a threshold ``tau`` is the smallest rank holding ``tau`` of that
  spectrum's energy;
* an edge whose rank falls to 1 is removed (a rank-1 bond carries nothing): with the in-out edge
  removed the ring is a chain ``C_in - K - C_out`` (Tucker-2), with another one removed it is a chain
  through that mode;
* ``tau`` is bisected so that the network's parameters meet ``target`` times the dense size.

What this is not: a general FCTN solver. With more modes (tensorized channels) the pruned network can
be any graph, which needs general contraction orders on the device; only the 3-mode case, where
every pruned network is a ring or a chain, is implemented.
"""
from __future__ import annotations

import math
import time

import numpy as np

from stn_edge.host.decompositions.common import Decomposition, SearchFamily
from stn_edge.host.decompositions.tr import ring_decomposition, ring_tensor, ring_torch_weight, ring_trials

EDGES = ("in-out", "in-kernel", "kernel-out")  # bonds r_0, r_1, r_2 of the ring


def edge_spectra(w: np.ndarray) -> list[np.ndarray]:
    """Summed slice singular values of the edges in :data:`EDGES` order."""
    x = ring_tensor(w.astype(np.float64))                                      # (I, K, O)
    io = np.linalg.svd(x.transpose(1, 0, 2), compute_uv=False).sum(axis=0)     # slices (I, O) over K
    ik = np.linalg.svd(x.transpose(2, 0, 1), compute_uv=False).sum(axis=0)     # slices (I, K) over O
    ko = np.linalg.svd(x.transpose(0, 2, 1), compute_uv=False).sum(axis=0)     # slices (O, K) over I
    return [io, ik, ko]


def edge_ranks(spectra: list[np.ndarray], tau: float) -> tuple[int, int, int]:
    """Smallest ranks holding ``tau`` of each edge spectrum's energy."""
    out = []
    for s in spectra:
        e = np.cumsum(s ** 2) / max(float(np.sum(s ** 2)), 1e-300)
        out.append(int(min(np.searchsorted(e, tau - 1e-12) + 1, len(s))))
    return tuple(out)  # type: ignore[return-value]


def decompose_fctn(w: np.ndarray, levels: int = 32, target: float = 0.5, sweeps: int = 4,
                   seconds: float | None = None) -> Decomposition:
    """FCTN of a conv weight ``(C_out, C_in, *k)`` with edges chosen by spectral pruning at ``target``."""
    if w.ndim < 3:
        raise ValueError(f"fctn needs a conv weight (C_out, C_in, *k), got shape {w.shape}")
    t0 = time.perf_counter()
    o, i = w.shape[:2]
    k = int(math.prod(w.shape[2:]))
    spectra = edge_spectra(w)

    def params(r: tuple[int, int, int]) -> int:
        return r[0] * i * r[1] + r[1] * k * r[2] + r[2] * o * r[0]

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(edge_ranks(spectra, mid)) <= target * w.size else (lo, mid)
    ranks = edge_ranks(spectra, lo)
    structure = {"target": target, "threshold": round(lo, 6),
                 "edges": {name: r for name, r in zip(EDGES, ranks)},
                 "pruned": [name for name, r in zip(EDGES, ranks) if r == 1]}
    return ring_decomposition("fctn", w, ranks, levels, sweeps, seconds, structure, t0)


#: conv kernels larger than 1x1, up to ``SearchLimits.ring_max_size`` weights
SEARCH = SearchFamily("fctn", 60, ring_trials("fctn", decompose_fctn), ring_torch_weight)
