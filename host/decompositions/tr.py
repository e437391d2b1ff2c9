"""Tensor ring of a conv kernel: ``(C_in) - (kernel) - (C_out) - back to (C_in)``.

``W[o, i, k] = sum_{alpha, beta, gamma} G1[alpha, i, beta] G2[beta, k, gamma] G3[gamma, o, alpha]``
with bonds ``r_0`` (alpha, the ring closure between C_out and C_in), ``r_1`` (beta) and ``r_2`` (gamma).
With ``r_0 = 1`` it is Tucker-2; with ``r_0 > 1`` the kernel core is shared by ``r_0`` channel groups.

Fitting (:func:`ring_fit`): a TR-SVD start (Zhao et al., 2016) — the in-unfolding's leading
``r_0*r_1`` singular vectors split as ``component = beta*r_0 + alpha`` so that a prefix on ``r_1``
keeps the strongest components, then an SVD of the remainder for ``r_2`` — then a few ring ALS
sweeps where every least-squares system is small enough (``max_system``).

Ordering: each bond is put in SVD gauge by merging its two cores (QR of both sides, SVD of the small
``r x r`` middle), sweeping the ring twice; every bond's components are then sorted by the singular
values of that local merge. In a ring this is a heuristic (re-gauging one bond disturbs its
neighbours' order slightly), so prefix errors are measured by rebuilding each level, not estimated.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from stn_edge.host.decompositions.common import Decomposition, SearchFamily, Trial, bond_ladder, build, left_svd

#: ALS updates whose least-squares system is larger than this are skipped (the TR-SVD start is kept)
MAX_SYSTEM = 768


def ring_tensor(w: np.ndarray) -> np.ndarray:
    """``X (C_in, K, C_out)`` with ``K`` the flattened kernel."""
    return np.moveaxis(w, 0, -1).reshape(w.shape[1], -1, w.shape[0])


def tr_svd(x: np.ndarray, r0: int, r1: int, r2: int) -> list[np.ndarray]:
    """TR-SVD start at bonds at most ``(r0, r1, r2)``: cores ``(r0, I, r1), (r1, K, r2), (r2, O, r0)``."""
    i, k, o = x.shape
    u, _, rest = left_svd(x.reshape(i, k * o))
    r0 = max(1, min(r0, u.shape[1]))
    r1 = max(1, min(r1, u.shape[1] // r0))
    n = r0 * r1
    g1 = u[:, :n].reshape(i, r1, r0).transpose(2, 0, 1)                   # component beta*r0 + alpha
    z = rest[:n].reshape(r1, r0, k, o).transpose(0, 2, 3, 1).reshape(r1 * k, o * r0)
    u2, _, rest2 = left_svd(z)
    r2 = max(1, min(r2, u2.shape[1]))
    return [g1, u2[:, :r2].reshape(r1, k, r2), rest2[:r2].reshape(r2, o, r0)]


def _unfold(x: np.ndarray, m: int) -> np.ndarray:
    """Mode ``m`` first, then the next two modes around the ring: ``(n_m, n_{m+1} n_{m+2})``."""
    return np.transpose(x, [(m + s) % 3 for s in range(3)]).reshape(x.shape[m], -1)


def _others(cores: list[np.ndarray], m: int) -> np.ndarray:
    """The ring without core ``m`` as a matrix ``((r_m, r_{m+1}), n_{m+1} n_{m+2})``."""
    a, b = cores[(m + 1) % 3], cores[(m + 2) % 3]                      # (r_{m+1}, n1, r_{m+2}), (r_{m+2}, n2, r_m)
    z = np.tensordot(a, b, axes=(2, 0))                                # (r_{m+1}, n1, n2, r_m)
    return z.transpose(3, 0, 1, 2).reshape(a.shape[0] * b.shape[2], -1)


def ring_als(x: np.ndarray, cores: list[np.ndarray], sweeps: int, deadline: float,
             max_system: int = MAX_SYSTEM) -> list[np.ndarray]:
    """Alternating least squares over the three cores (skipping systems above ``max_system``)."""
    cores = list(cores)
    for _ in range(sweeps):
        for m in range(3):
            if time.perf_counter() > deadline:
                return cores
            rl, n, rr = cores[m].shape
            if rl * rr > max_system:
                continue
            z = _others(cores, m)                                          # ((rl, rr), rest)
            g = z @ z.T
            rhs = _unfold(x, m) @ z.T                                      # (n, rl*rr)
            sol = np.linalg.solve(g + 1e-10 * np.trace(g) / len(g) * np.eye(len(g)), rhs.T).T
            cores[m] = sol.reshape(n, rl, rr).transpose(1, 0, 2)
    return cores


def ring_gauge(cores: list[np.ndarray], sweeps: int = 2) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Put every bond in SVD gauge (sorted, trimmed to its numerical rank); return cores and each
    bond's singular values (bond m sits between core m-1 and core m)."""
    cores = list(cores)
    spectra: list[np.ndarray] = [np.ones(c.shape[0]) for c in cores]
    for _ in range(sweeps):
        for m in (1, 2, 0):
            left, right = cores[m - 1], cores[m]
            a = left.reshape(-1, left.shape[2])
            b = right.reshape(right.shape[0], -1)
            qa, ra = np.linalg.qr(a)
            qb, rb = np.linalg.qr(b.T)
            u, s, vt = np.linalg.svd(ra @ rb.T)
            keep = max(1, int(np.sum(s > s[0] * 1e-10))) if s.size and s[0] > 0 else 1
            root = np.sqrt(s[:keep])
            cores[m - 1] = (qa @ (u[:, :keep] * root)).reshape(left.shape[0], left.shape[1], keep)
            cores[m] = ((root[:, None] * vt[:keep]) @ qb.T).reshape(keep, right.shape[1], right.shape[2])
            spectra[m] = s[:keep]
    return cores, spectra


def ring_contract(cores: Sequence[np.ndarray]) -> np.ndarray:
    """The ring's tensor ``X (C_in, K, C_out)``."""
    return np.einsum("aib,bkg,goa->iko", *cores, optimize=True)


def ring_decomposition(family: str, w: np.ndarray, ranks: tuple[int, int, int], levels: int,
                       sweeps: int, seconds: float | None, structure: dict, t0: float, notes: str = "") -> Decomposition:
    """Fit a ring at bonds ``ranks = (r0, r1, r2)``, order it, and build its ladder."""
    x = ring_tensor(w.astype(np.float64))
    deadline = math.inf if seconds is None else time.perf_counter() + seconds  # None: reproducible
    cores = ring_als(x, tr_svd(x, *ranks), sweeps, deadline)
    cores, spectra = ring_gauge(cores)
    full = tuple(c.shape[0] for c in cores)                                 # (r0, r1, r2)
    i, k, o = x.shape
    fractions = [np.concatenate([[0.0], np.cumsum(s ** 2) / max(float(np.sum(s ** 2)), 1e-300)]) for s in spectra]

    def params(b0: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
        return b0 * i * b1 + b1 * k * b2 + b2 * o * b0

    drivers = max(((0, 1), (0, 2), (1, 2)), key=lambda p: (min(full[q] for q in p), p == (1, 2)))
    bonds = bond_ladder(full, lambda b0, b1, b2: fractions[0][b0] + fractions[1][b1] + fractions[2][b2], params, x.size, 3.0,
                        levels, drivers)
    if not bonds:
        raise ValueError(f"{family}: no ring bonds of a {w.shape} kernel are smaller than the dense weight")
    total = float(np.linalg.norm(x)) or 1.0
    errors = []
    for b0, b1, b2 in bonds:
        cut = [cores[0][:b0, :, :b1], cores[1][:b1, :, :b2], cores[2][:b2, :, :b0]]
        errors.append(float(np.linalg.norm(ring_contract(cut) - x)) / total)
    kshape = tuple(w.shape[2:])
    a = cores[0].transpose(0, 2, 1)                                         # (r0, r1, C_in)
    core = cores[1].transpose(0, 2, 1).reshape(full[1], full[2], *kshape)   # (r1, r2, *k)
    b = cores[2].transpose(0, 2, 1)                                         # (r2, r0, C_out)
    structure = dict(structure, ring="C_in - kernel - C_out", drivers=list(drivers))
    return build(family, "conv", "conv", w.shape, structure, {}, {"a": ((0, 1), a), "core": ((1, 2), core), "b": ((2, 0), b)},
                 bonds, drivers, errors, max(full), w.dtype, time.perf_counter() - t0, notes)


def decompose_tr(w: np.ndarray, levels: int = 32, r0: int = 2, target: float = 0.5, sweeps: int = 4,
                 seconds: float | None = None) -> Decomposition:
    """Tensor ring of a conv weight ``(C_out, C_in, *k)`` with closure bond ``r0`` and top level at about
    ``target`` of the dense bytes (``r_1``, ``r_2`` scaled together from the exact TR-SVD ranks)."""
    if w.ndim < 3:
        raise ValueError(f"tr needs a conv weight (C_out, C_in, *k), got shape {w.shape}")
    t0 = time.perf_counter()
    o, i = w.shape[:2]
    k = int(math.prod(w.shape[2:]))
    r0 = max(1, min(r0, i, o))
    r1_full = max(1, min(i, k * o) // r0)
    r2_full = max(1, min(r1_full * k, o * r0))

    def params(c: float) -> float:
        r1, r2 = max(1, round(c * r1_full)), max(1, round(c * r2_full))
        return r0 * i * r1 + r1 * k * r2 + r2 * o * r0

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(mid) <= target * w.size else (lo, mid)
    ranks = (r0, max(1, round(lo * r1_full)), max(1, round(lo * r2_full)))
    return ring_decomposition("tr", w, ranks, levels, sweeps, seconds, {"target": target}, t0)


def ring_trials(name: str, decompose) -> Callable[..., list[Trial]]:
    """The search's trials of a ring family (``tr``, ``fctn``): conv kernels larger than 1x1, up to
    ``SearchLimits.ring_max_size`` weights; ``decompose(w, levels, seconds=...)``."""
    def trials(kind: str, shape: tuple[int, ...], layout: str, levels: int, limits) -> list[Trial]:
        if kind != "conv" or math.prod(shape[2:]) == 1:
            return []
        size = math.prod(shape)
        skip = f"kernel of {size} weights is above ring_max_size={limits.ring_max_size}" if size > limits.ring_max_size else ""
        return [Trial(name, lambda w: decompose(w, levels, seconds=limits.ring_seconds), skip)]
    return trials


def ring_torch_weight(layer: dict, f: dict) -> "torch.Tensor":
    """The kernel from torch ring cores ``a (r0, r1, C_in)``, ``core (r1, r2, *k)``, ``b (r2, r0, C_out)``
    (shared with ``fctn``)."""
    import torch

    core = f["core"]
    w = torch.einsum("abi,bgk,gao->oik", f["a"], core.reshape(core.shape[0], core.shape[1], -1), f["b"])
    return w.reshape(tuple(layer["dense"]["shape"]))


#: conv kernels larger than 1x1, up to ``SearchLimits.ring_max_size`` weights
SEARCH = SearchFamily("tr", 50, ring_trials("tr", decompose_tr), ring_torch_weight)
